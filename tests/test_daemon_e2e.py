"""The whole loop in real processes: fake Slurm → tick → resubmission → Slack stand-in.

A sweep fails at night: rate limits, a network error, a code bug. One tick later the
retryable tasks are back in the queue as ONE array job, the user has ONE digest in Slack
saying what was done, and when the retried tasks succeed the digest's thread says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.ledger import read_ledger
from tests.fakeslurm.controller import FakeSlurm
from tests.slackstub import TOKEN, SlackStub

RATE_LIMIT = """\
Traceback (most recent call last):
  File "/home/u/exp/run.py", line 88, in <module>
    main()
openai.RateLimitError: Error code: 429 - {'error': {'message': 'Rate limit reached for o3 in organization org-x on tokens per min (TPM)', 'type': 'tokens', 'code': 'rate_limit_exceeded'}}
"""
NETWORK = """\
Traceback (most recent call last):
  File "/home/u/exp/run.py", line 88, in <module>
    main()
httpx.ConnectError: [Errno 111] Connection refused
"""
CODE_BUG = """\
Traceback (most recent call last):
  File "/home/u/exp/run.py", line 12, in <module>
    budget = cfg["reasoning_budget"]
KeyError: 'reasoning_budget'
"""
BILLING = """\
Traceback (most recent call last):
  File "/home/u/exp/run.py", line 88, in <module>
    main()
anthropic.BadRequestError: Error code: 400 - {'type': 'error', 'error': {'type': 'invalid_request_error', 'message': 'Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.'}}
"""
SUCCESS = "round 1\n✅ Experiment results saved to results/ttc/round_503.json\n"


@pytest.fixture
def stub() -> Any:
    s = SlackStub().start()
    yield s
    s.stop()


@pytest.fixture
def world(tmp_path: Path, stub: SlackStub) -> dict[str, Any]:
    fake = FakeSlurm(tmp_path)
    exp = tmp_path / "exp"
    logs = exp / "logs"
    logs.mkdir(parents=True)
    (exp / "run.sh").write_text("#!/bin/bash\npython run.py\n")
    state = tmp_path / "state"
    config = tmp_path / "settings.toml"
    config.write_text(
        f"""
state_dir = "{state}"
[watch]
log_dirs = ["{logs}"]
[slack]
mode = "bot"
bot_token = "{TOKEN}"
channel = "C0ALERTS"
base_url = "{stub.base_url}"
timeout_s = 5
min_interval_s = 0.2
[resubmit]
enabled = true
"""
    )
    return {"fake": fake, "exp": exp, "logs": logs, "state": state, "config": config}


def _sweep(world: dict[str, Any], tasks: str) -> str:
    exp = world["exp"]
    line = f"sbatch --array={tasks}%4 --output=logs/ttc_%A_%a.out --error=logs/ttc_%A_%a.err run.sh"
    return world["fake"].add_job(
        "ttc",
        array=tasks,
        work_dir=exp,
        script="run.sh",
        submit_line=line,
        output=str(world["logs"] / "ttc_%A_%a.out"),
        error=str(world["logs"] / "ttc_%A_%a.err"),
    )


def _tick(world: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--once", "--config", str(world["config"])],
        env=world["fake"].env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _all_text(posted: Any) -> str:
    return json.dumps(posted.blocks) + posted.text


def test_night_of_failures_is_resubmitted_once_and_reported_once(
    world: dict[str, Any], stub: SlackStub
) -> None:
    fake: FakeSlurm = world["fake"]
    job = _sweep(world, "0-4")
    fake.finish(f"{job}_0", "COMPLETED", err="", out=SUCCESS)
    fake.finish(f"{job}_1", "FAILED", err=RATE_LIMIT)
    fake.finish(f"{job}_2", "FAILED", err=RATE_LIMIT)
    fake.finish(f"{job}_3", "FAILED", err=CODE_BUG)
    fake.finish(f"{job}_4", "FAILED", err=NETWORK)

    first = _tick(world)
    assert first.returncode == 0, first.stderr

    # exactly one sbatch: the retryable indices of the original job, as one array
    subs = fake.submissions()
    assert len(subs) == 1
    argv = subs[0]["argv"]
    assert "--array=1-2,4%4" in argv
    assert any(a.startswith("--begin=now+") for a in argv)
    assert any(a.startswith("--comment=slurm-triage:") for a in argv)
    assert argv[-1].endswith("run.sh")
    assert Path(subs[0]["cwd"]) == world["exp"]
    new_job = subs[0]["job_id"]

    # exactly one digest, naming every failure group and what was done
    assert len(stub.posted) == 1
    digest = stub.posted[0]
    text = _all_text(digest)
    assert "rate_limit" in text and "code_error" in text and "network" in text
    assert f"{job}" in text and "1-2" in text
    assert f"resubmitted as job {new_job}" in text
    assert "KeyError" in text

    # a second tick with nothing new: no sbatch, no message
    again = _tick(world)
    assert again.returncode == 0, again.stderr
    assert len(fake.submissions()) == 1
    assert len(stub.posted) == 1

    # the retries succeed: the lineage is recovered and the digest's thread says so
    for t in (1, 2, 4):
        fake.finish(f"{new_job}_{t}", "COMPLETED", err="", out=SUCCESS)
    third = _tick(world)
    assert third.returncode == 0, third.stderr
    ledger = read_ledger(world["state"] / "ledger.json")
    for t in (1, 2, 4):
        assert ledger.jobs[f"{job}_{t}"].recovered_by == f"{new_job}_{t}"
    assert ledger.jobs[f"{job}_3"].recovered_by is None
    followups = [p for p in stub.posted[1:] if p.thread_ts == digest.ts]
    assert len(followups) == 1
    assert "recovered" in _all_text(followups[0]).lower()
    assert len(fake.submissions()) == 1


def test_billing_failure_alerts_and_pauses_every_resubmission(
    world: dict[str, Any], stub: SlackStub
) -> None:
    fake: FakeSlurm = world["fake"]
    job = _sweep(world, "0-2")
    fake.finish(f"{job}_0", "FAILED", err=RATE_LIMIT)
    fake.finish(f"{job}_1", "FAILED", err=BILLING)
    fake.finish(f"{job}_2", "FAILED", err=NETWORK)
    result = _tick(world)
    assert result.returncode == 0, result.stderr
    assert fake.submissions() == []
    ledger = read_ledger(world["state"] / "ledger.json")
    assert ledger.resubmit.paused is True
    texts = [_all_text(p).lower() for p in stub.posted]
    assert any("billing" in t or "credit" in t for t in texts[:1]), "billing alert must come first"
    assert len(stub.posted) == 2  # the alert and the digest, not one message per task
