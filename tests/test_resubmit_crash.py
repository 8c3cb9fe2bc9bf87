"""Kill -9 at every step of the submit protocol; restart; count what reached sbatch.

Each run is a separate Python process (the daemon's tick: reconcile, then policy +
protocol) against a real ledger file and the fake Slurm. ``SLURM_TRIAGE_CRASH_AT`` makes
it SIGKILL itself at a named point; restarts run without it, with the clock moving on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fakeslurm.controller import FakeSlurm
from test_resubmit_helpers import NOW, USER, failed, ledger_of, settings

from daemon.errors import LedgerLocked
from daemon.ledger import LedgerStore, read_ledger
from daemon.model import expand_ranges
from daemon.resubmit import run_manual

DRIVER = """
import random, sys
from datetime import datetime, timedelta
from daemon.errors import SlurmError
from daemon.ledger import LedgerStore
from daemon.resubmit import process_tick, reconcile
from daemon.settings import Settings
from daemon.slurm import SlurmRunner, query_sacct, query_squeue

path, now = sys.argv[1], datetime.fromisoformat(sys.argv[2])
st = Settings(
    resubmit={"enabled": True, "jitter_fraction": 0.0},
    slurm={"user": sys.argv[3], "sbatch_timeout_s": 2.0},
)
runner = SlurmRunner()
with LedgerStore(path) as store:
    led = store.load()
    try:
        sq = query_squeue(runner, st.slurm, user=st.slurm.user)
    except SlurmError:
        sq = None
    try:
        sa = query_sacct(runner, st.slurm, user=st.slurm.user, start=now - timedelta(hours=2))
    except SlurmError:
        sa = None
    reconcile(led, sa, sq, now)
    process_tick(led, st, runner, now, lambda: store.save(led, now=now), rng=random.Random(1))
    store.save(led, now=now)
"""

RETRYABLE = {"100_1", "100_2", "100_5", "200"}
NEVER = {"100_3": "code_error", "100_4": "cancelled", "300_1": "unknown"}


@pytest.fixture
def fake(tmp_path: Path) -> FakeSlurm:
    return FakeSlurm(tmp_path, user=USER, now=NOW)


def seed(tmp_path: Path, *extra: Any) -> tuple[Path, Path]:
    work = tmp_path / "exp"
    work.mkdir(exist_ok=True)
    (work / "run.sh").write_text("#!/bin/bash\necho sweep\n")
    (work / "train.sh").write_text("#!/bin/bash\necho train\n")
    w = str(work)
    recs = [failed(k, work_dir=w) for k in ("100_1", "100_2", "100_5")]
    recs.append(failed("200", "network", work_dir=w, submit_line="sbatch -t 10 train.sh --lr 3"))
    recs += [failed(k, t, work_dir=w) for k, t in NEVER.items()]
    led = ledger_of(*recs, *extra)
    led.mark_dirty()
    path = tmp_path / "state" / "ledger.json"
    with LedgerStore(path) as store:
        store.save(led, now=NOW)
    return path, work


def run_driver(
    fake: FakeSlurm, path: Path, now: datetime, crash: str | None = None, after: int = 0
) -> int:
    env = fake.env()
    env.pop("SLURM_TRIAGE_CRASH_AT", None)
    if crash:
        env["SLURM_TRIAGE_CRASH_AT"] = crash
        env["SLURM_TRIAGE_CRASH_AFTER"] = str(after)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(path), now.isoformat(), USER],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode in (0, -9), proc.stderr
    return proc.returncode


def submitted_tasks(fake: FakeSlurm) -> list[str]:
    """Original task keys each accepted sbatch call carried (run.sh = job 100, train.sh = 200)."""
    keys: list[str] = []
    for sub in fake.submissions():
        if sub["job_id"] is None:
            continue
        argv = sub["argv"]
        if "train.sh" in argv:
            keys.append("200")
            continue
        (spec,) = [a.removeprefix("--array=") for a in argv if a.startswith("--array=")]
        keys += [f"100_{i}" for i in expand_ranges(spec)]
    return keys


def settle(fake: FakeSlurm, path: Path, runs: int = 6) -> None:
    for k in range(1, runs + 1):
        assert run_driver(fake, path, NOW + timedelta(seconds=100 * k)) == 0


CASES = [
    ("resubmit.before_sbatch", 0),
    ("resubmit.before_sbatch", 1),
    ("resubmit.after_sbatch", 0),
    ("resubmit.after_sbatch", 1),
    ("ledger.before_rename", 0),
    ("ledger.before_rename", 1),
    ("ledger.before_rename", 2),
    ("ledger.before_rename", 3),
    ("ledger.after_rename", 0),
    ("ledger.after_rename", 1),
    ("ledger.after_rename", 3),
]


@pytest.mark.slow
@pytest.mark.parametrize(("point", "after"), CASES, ids=[f"{p}+{a}" for p, a in CASES])
def test_kill_at_each_step_never_duplicates_or_loses(
    fake: FakeSlurm, tmp_path: Path, point: str, after: int
) -> None:
    path, _ = seed(tmp_path)
    assert run_driver(fake, path, NOW, crash=point, after=after) == -9
    settle(fake, path)
    tasks = submitted_tasks(fake)
    assert sorted(tasks) == sorted(RETRYABLE), f"each retryable task exactly once: {tasks}"
    assert len(fake.submissions()) == len([s for s in fake.submissions() if s["job_id"]])
    led = read_ledger(path)
    assert [i.state for i in led.intents.values()].count("intent") == 0
    for key in RETRYABLE:
        child = led.jobs[led.jobs[key].retried_as or "missing"]
        assert (child.origin, child.parent, child.attempt) == (key, key, 2)
    for key in NEVER:
        assert led.jobs[key].resubmit == "not_retryable" and not led.jobs[key].retried_as


def test_sbatch_accepting_then_hanging_past_timeout_is_not_duplicated(
    fake: FakeSlurm, tmp_path: Path
) -> None:
    path, _ = seed(tmp_path)
    fake.sbatch_hang_after_submit(8.0, times=None)  # every sbatch hangs after accepting
    assert run_driver(fake, path, NOW) == 0
    fake.clear_faults()
    settle(fake, path)
    assert sorted(submitted_tasks(fake)) == sorted(RETRYABLE)
    assert len(fake.submissions()) == 2
    led = read_ledger(path)
    assert sorted(i.state for i in led.intents.values()) == ["submitted", "submitted"]


def test_no_task_beyond_its_cap_across_restarts(fake: FakeSlurm, tmp_path: Path) -> None:
    path, _ = seed(tmp_path)
    cap = settings().resubmit.types["rate_limit"].max_attempts  # type: ignore[index]
    for round_ in range(cap + 2):
        run_driver(fake, path, NOW + timedelta(minutes=10 * round_))
        # every child fails again with the same type, as the daemon would classify it
        with LedgerStore(path) as store:
            led = store.load()
            for rec in list(led.jobs.values()):
                if rec.outcome == "pending":
                    rec.outcome, rec.error_type, rec.state = "failure", rec.error_type, "FAILED"
                    rec.error_type = "rate_limit" if rec.job_id != "200" else "network"
                    rec.finished_at = rec.classified_at = (
                        NOW + timedelta(minutes=10 * round_)
                    ).isoformat()
                    led.mark_dirty()
            store.save(led, now=NOW + timedelta(minutes=10 * round_))
    led = read_ledger(path)
    for origin in RETRYABLE:
        attempts = [r.attempt for r in led.jobs.values() if r.origin_key == origin]
        assert max(attempts) == cap, (origin, attempts)
    per_task: dict[str, int] = {}
    for key in submitted_tasks(fake):
        per_task[key] = per_task.get(key, 0) + 1
    assert set(per_task) == RETRYABLE
    assert all(n == cap - 1 for n in per_task.values()), per_task


def test_billing_pause_stops_everything_until_resume(
    fake: FakeSlurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = seed(tmp_path, failed("400_1", "billing"))
    for k in range(3):
        run_driver(fake, path, NOW + timedelta(minutes=k))
    assert fake.submissions() == []
    led = read_ledger(path)
    assert led.resubmit.paused and "400_1" in (led.resubmit.paused_reason or "")
    assert {led.jobs[k].resubmit for k in RETRYABLE} == {"paused"}

    fake.install(monkeypatch)
    st = settings()
    st.state_dir = path.parent
    dry = run_manual(st, dry_run=True, types=None, jobs=None, resume=True, now=NOW)
    assert fake.submissions() == [] and dry.exit_code == 0
    assert read_ledger(path).resubmit.paused  # a dry run saves nothing
    res = run_manual(st, dry_run=False, types=None, jobs=["100"], resume=True, now=NOW)
    assert res.resumed and res.exit_code == 0
    assert sorted(submitted_tasks(fake)) == ["100_1", "100_2", "100_5"]
    assert "resubmitted 100_1" in res.render_text()
    led = read_ledger(path)
    assert not led.resubmit.paused and led.jobs["200"].resubmit == "paused"


def test_manual_command_fails_clearly_while_the_daemon_holds_the_lock(
    fake: FakeSlurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = seed(tmp_path)
    fake.install(monkeypatch)
    st = settings()
    st.state_dir = path.parent
    with LedgerStore(path), pytest.raises(LedgerLocked, match="another slurm-triage daemon"):
        run_manual(st, dry_run=False, types=None, jobs=None, resume=False)
    assert fake.submissions() == []


def test_cli_resubmit_dry_run_and_bad_type(
    fake: FakeSlurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = seed(tmp_path)
    env = fake.env()
    env["SLURM_TRIAGE_STATE_DIR"] = str(path.parent)
    env["SLURM_TRIAGE_SLURM__USER"] = USER
    env.pop("SLURM_TRIAGE_CRASH_AT", None)
    cli = [sys.executable, "-m", "daemon", "resubmit"]
    out = subprocess.run(
        [*cli, "--dry-run"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "would resubmit 100_1, 100_2, 100_5: sbatch --parsable" in out.stdout
    assert "not resubmitted 100_3: code_error failures are never resubmitted" in out.stdout
    bad = subprocess.run(
        [*cli, "--type", "billing"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "never resubmitted" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert fake.submissions() == []
    assert os.path.exists(path)
