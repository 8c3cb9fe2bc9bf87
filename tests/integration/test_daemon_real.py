"""The daemon (`slurm-triage run --once`) against the real cluster and a Slack stand-in.

A sweep fails: a rate limit, a network error, a code bug. One tick resubmits the
two retryable tasks as one real array job (the code bug never), and Slack gets a
digest. The retries succeed on the real cluster; the next tick marks both tasks
recovered, answers in the digest's thread and submits nothing more.

The testbed is shared and every job there belongs to root, so this only asserts
on its own job ids; other users' failures may appear in the same digest.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from slurm_it import JOBS_DIR, run, sacct_rows, sbatch, triage, wait_finished

from daemon.ledger import read_ledger
from tests.slackstub import TOKEN, SlackStub

pytestmark = pytest.mark.slurm


@pytest.fixture
def stub() -> Iterator[SlackStub]:
    s = SlackStub().start()
    yield s
    s.stop()


def _text(posted: Any) -> str:
    return json.dumps(posted.blocks) + posted.text


def _jobs_named(name: str, since: str) -> set[str]:
    """Array job ids with this name: squeue knows a new job at once, sacct a moment later."""
    acct = run(["sacct", "-X", "-n", "-P", "--name", name, "-S", since, "-o", "JobID"])
    queue = run(["squeue", "-h", "--states=all", "-n", name, "-o", "%F"])
    return {line.split("_")[0] for line in acct.stdout.split() + queue.stdout.split()}


def test_tick_resubmits_retryable_tasks_once_and_reports_recovery(
    slurm_cluster: None, tmp_path: Path, stub: SlackStub
) -> None:
    work = tmp_path / "exp"
    logs = work / "logs"
    logs.mkdir(parents=True)
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 5))
    name = f"flaky-{uuid.uuid4().hex[:8]}"  # unique per run on a shared cluster
    job = sbatch(
        ["--chdir", str(work), "--array=1-3", "--mem=100M", "-J", name,
         "-o", f"logs/{name}_%A_%a.out", "-e", f"logs/{name}_%A_%a.err"],
        JOBS_DIR / "flaky.py", cwd=work,
    )  # fmt: skip
    submitted = [job]
    try:
        wait_finished([f"{job}_1", f"{job}_2", f"{job}_3"], timeout=120)
        state = tmp_path / "state"
        config = tmp_path / "settings.toml"
        config.write_text(
            f"""
state_dir = "{state}"
[watch]
log_dirs = ["{logs}"]
initial_lookback_s = 600
[slack]
mode = "bot"
bot_token = "{TOKEN}"
channel = "C0ALERTS"
base_url = "{stub.base_url}"
timeout_s = 5
min_interval_s = 0.1
[resubmit]
enabled = true
jitter_fraction = 0
[resubmit.types.rate_limit]
enabled = true
base_delay_s = 1
[resubmit.types.network]
enabled = true
base_delay_s = 1
"""
        )

        first = triage("run", "--once", "--config", str(config))
        assert first.returncode == 0, first.stderr
        new_jobs = _jobs_named(name, since) - {job}
        submitted.extend(new_jobs)
        assert len(new_jobs) == 1, f"expected one resubmitted array job, got {new_jobs}"
        (new_job,) = new_jobs
        ours = [p for p in stub.posted if job in _text(p)]
        assert len(ours) == 1, [p.text for p in stub.posted]
        digest = ours[0]
        assert f"resubmitted as job {new_job}" in _text(digest)
        assert "code_error" in _text(digest)

        # Only the retryable tasks come back, on the real cluster, and they succeed.
        rows = wait_finished([f"{new_job}_1", f"{new_job}_2"], timeout=120)
        assert {r["State"] for r in rows.values()} == {"COMPLETED"}
        assert set(sacct_rows([new_job])) == {f"{new_job}_1", f"{new_job}_2"}

        second = triage("run", "--once", "--config", str(config))
        assert second.returncode == 0, second.stderr
        ledger = read_ledger(state / "ledger.json")
        assert ledger.jobs[f"{job}_1"].recovered_by == f"{new_job}_1"
        assert ledger.jobs[f"{job}_2"].recovered_by == f"{new_job}_2"
        assert ledger.jobs[f"{job}_3"].recovered_by is None
        assert ledger.jobs[f"{job}_3"].error_type == "code_error"
        thread = [p for p in stub.posted if p.thread_ts == digest.ts]
        assert any("recovered" in _text(p).lower() for p in thread), [p.text for p in thread]
        # Nothing is submitted twice.
        assert _jobs_named(name, since) == {job, new_job}
    finally:
        run(["scancel", *submitted], check=False)


def test_kill_after_sbatch_then_restart_submits_once_with_backoff_held_by_slurm(
    slurm_cluster: None, tmp_path: Path
) -> None:
    """The daemon is killed right after sbatch accepted the retry, before it recorded the
    new job id. The restarted daemon finds the job by its tag (real squeue/sacct Comment)
    and does not submit again; Slurm itself holds the backoff (--begin)."""
    import os

    work = tmp_path / "exp"
    logs = work / "logs"
    logs.mkdir(parents=True)
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 5))
    name = f"crashy-{uuid.uuid4().hex[:8]}"
    job = sbatch(
        ["--chdir", str(work), "--array=1-2", "--mem=100M", "-J", name,
         "-o", f"logs/{name}_%A_%a.out", "-e", f"logs/{name}_%A_%a.err"],
        JOBS_DIR / "flaky.py", cwd=work,
    )  # fmt: skip
    submitted = [job]
    delay_s = 20
    try:
        wait_finished([f"{job}_1", f"{job}_2"], timeout=120)
        state = tmp_path / "state"
        config = tmp_path / "settings.toml"
        config.write_text(
            f"""
state_dir = "{state}"
[watch]
log_dirs = ["{logs}"]
initial_lookback_s = 600
[resubmit]
enabled = true
jitter_fraction = 0
[resubmit.types.rate_limit]
enabled = true
base_delay_s = {delay_s}
[resubmit.types.network]
enabled = true
base_delay_s = {delay_s}
"""
        )
        env = dict(os.environ, SLURM_TRIAGE_CRASH_AT="resubmit.after_sbatch")
        killed = triage("run", "--once", "--config", str(config), env=env)
        assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
        new_jobs = _jobs_named(name, since) - {job}
        submitted.extend(new_jobs)
        assert len(new_jobs) == 1, new_jobs  # sbatch did accept it before the kill
        (new_job,) = new_jobs

        again = triage("run", "--once", "--config", str(config))
        assert again.returncode == 0, again.stderr
        third = triage("run", "--once", "--config", str(config))
        assert third.returncode == 0, third.stderr
        assert _jobs_named(name, since) == {job, new_job}, "resubmitted twice after a crash"
        ledger = read_ledger(state / "ledger.json")
        intents = [i for i in ledger.intents.values() if i.origin_job_id == job]
        assert [i.new_job_id for i in intents] == [new_job]
        assert ledger.jobs[f"{job}_1"].retried_as == f"{new_job}_1"

        # the backoff is Slurm's: the retry became eligible no sooner than the delay
        rows = wait_finished([f"{new_job}_1", f"{new_job}_2"], timeout=180)
        assert {r["State"] for r in rows.values()} == {"COMPLETED"}
        times = run(
            ["sacct", "-X", "-n", "-P", "-j", new_job, "-o", "JobID,Submit,Eligible,Start"]
        ).stdout.split()

        def epoch(text: str) -> float:
            return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))

        for line in times:
            _jid, submit, eligible, start = line.split("|")
            assert epoch(eligible) - epoch(submit) >= delay_s - 1, line
            assert epoch(start) >= epoch(eligible), line
    finally:
        run(["scancel", *submitted], check=False)
