"""The daemon's tick against the stateful fake Slurm (real subprocesses, real files)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import main
from daemon.ledger import read_ledger
from tests.fakeslurm.controller import FakeSlurm

RATE_LIMIT_TB = """\
Traceback (most recent call last):
  File "/home/u/exp/run.py", line 88, in <module>
    main()
  File "/home/u/exp/run.py", line 80, in main
    resp = client.messages.create(**req)
anthropic.RateLimitError: Error code: 429 - {'type': 'error', 'error': {'type': 'rate_limit_error', 'message': 'Number of request tokens has exceeded your per-minute rate limit'}}
"""
KEY_ERROR_TB = """\
Traceback (most recent call last):
  File "/home/u/exp/run.py", line 12, in <module>
    budget = cfg["reasoning_budget"]
KeyError: 'reasoning_budget'
"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSlurm:
    fake = FakeSlurm(tmp_path)
    fake.install(monkeypatch)
    return fake


@pytest.fixture
def setup(tmp_path: Path, fake: FakeSlurm) -> dict[str, Any]:
    logs = tmp_path / "logs"
    logs.mkdir()
    state = tmp_path / "state"
    config = tmp_path / "settings.toml"
    config.write_text(
        f"""
state_dir = "{state}"
[watch]
log_dirs = ["{logs}"]
interval_s = 1
jitter_s = 0
[slurm]
timeout_s = 10
"""
    )
    return {"logs": logs, "state": state, "config": config, "tmp": tmp_path}


def _array(fake: FakeSlurm, logs: Path, tasks: str = "0-3") -> str:
    return fake.add_job(
        "ttc_claude",
        array=tasks,
        work_dir=logs.parent,
        script="run.sh",
        output=f"{logs}/ttc_claude_%A_%a.out",
        error=f"{logs}/ttc_claude_%A_%a.err",
    )


def _once(config: Path) -> int:
    return main(["run", "--once", "--config", str(config)])


def _ledger(setup: dict[str, Any]) -> Any:
    return read_ledger(setup["state"] / "ledger.json")


def test_tick_classifies_finished_tasks_once_with_one_sacct_and_one_squeue(
    fake: FakeSlurm, setup: dict[str, Any]
) -> None:
    job = _array(fake, setup["logs"])
    fake.finish(f"{job}_0", "COMPLETED", out="step 1\n✅ Experiment results saved\n", err="")
    fake.finish(f"{job}_1", "FAILED", err=RATE_LIMIT_TB)
    fake.finish(f"{job}_2", "FAILED", err=KEY_ERROR_TB)
    fake.start(f"{job}_3")

    assert _once(setup["config"]) == 0
    assert len(fake.calls("sacct")) == 1
    assert len(fake.calls("squeue")) == 1
    jobs = _ledger(setup).jobs
    assert jobs[f"{job}_0"].outcome == "success"
    assert jobs[f"{job}_1"].outcome == "failure"
    assert jobs[f"{job}_1"].error_type == "rate_limit"
    assert jobs[f"{job}_1"].retryable is True
    assert "RateLimitError" in jobs[f"{job}_1"].evidence["text"]
    assert jobs[f"{job}_1"].evidence["line_no"] == 6
    assert jobs[f"{job}_2"].error_type == "code_error"
    assert jobs[f"{job}_2"].retryable is False
    assert jobs[f"{job}_3"].outcome == "running"
    first_classified = jobs[f"{job}_1"].classified_at

    # the running task finishes; the others must not be classified again
    fake.finish(f"{job}_3", "FAILED", err=KEY_ERROR_TB)
    time.sleep(1.1)
    assert _once(setup["config"]) == 0
    jobs = _ledger(setup).jobs
    assert jobs[f"{job}_3"].error_type == "code_error"
    assert jobs[f"{job}_1"].classified_at == first_classified
    assert len(fake.calls("sacct")) == 2


def test_unchanged_tick_does_not_rewrite_the_ledger(fake: FakeSlurm, setup: dict[str, Any]) -> None:
    job = _array(fake, setup["logs"], "0-1")
    fake.finish(f"{job}_0", "FAILED", err=KEY_ERROR_TB)
    fake.finish(f"{job}_1", "FAILED", err=KEY_ERROR_TB)
    assert _once(setup["config"]) == 0
    ledger_file = setup["state"] / "ledger.json"
    before = ledger_file.stat().st_mtime_ns, ledger_file.read_bytes()
    assert _once(setup["config"]) == 0
    assert (ledger_file.stat().st_mtime_ns, ledger_file.read_bytes()) == before
    # yet status knows about the second tick, through the heartbeat
    beat = json.loads((setup["state"] / "health.json").read_text())
    assert beat["ticks"] >= 2


def test_sacct_failure_is_recorded_and_the_next_tick_recovers(
    fake: FakeSlurm, setup: dict[str, Any]
) -> None:
    job = _array(fake, setup["logs"], "0")
    fake.finish(f"{job}_0", "FAILED", err=RATE_LIMIT_TB)
    fake.fail_next(
        "sacct", rc=1, stderr="sacct: error: Problem talking to the database: Connection refused"
    )
    assert _once(setup["config"]) == 1
    ledger = _ledger(setup)
    assert f"{job}_0" not in ledger.jobs or ledger.jobs[f"{job}_0"].classified_at is None
    assert any("sacct" in e and "database" in e for e in ledger.health.last_tick_errors)
    assert _once(setup["config"]) == 0
    assert _ledger(setup).jobs[f"{job}_0"].error_type == "rate_limit"


def test_sacct_garbage_keeps_previous_state(fake: FakeSlurm, setup: dict[str, Any]) -> None:
    job = _array(fake, setup["logs"], "0")
    fake.finish(f"{job}_0", "FAILED", err=KEY_ERROR_TB)
    assert _once(setup["config"]) == 0
    before = _ledger(setup).jobs[f"{job}_0"].to_json()
    fake.garbage("sacct", "<html>proxy error</html>\nnot|a|row\n")
    assert _once(setup["config"]) == 1
    assert _ledger(setup).jobs[f"{job}_0"].to_json() == before


def test_placeholder_row_is_not_judged_until_complete(
    fake: FakeSlurm, setup: dict[str, Any]
) -> None:
    job = _array(fake, setup["logs"], "0")
    fake.finish(f"{job}_0", "FAILED", err=RATE_LIMIT_TB)
    fake.placeholder_rows(job, True)
    assert _once(setup["config"]) == 0
    record = _ledger(setup).jobs.get(f"{job}_0")
    assert record is None or record.classified_at is None
    fake.placeholder_rows(job, False)
    assert _once(setup["config"]) == 0
    assert _ledger(setup).jobs[f"{job}_0"].error_type == "rate_limit"


def test_grown_log_is_read_from_its_offset(fake: FakeSlurm, setup: dict[str, Any]) -> None:
    job = _array(fake, setup["logs"], "0")
    fake.start(f"{job}_0")
    err = setup["logs"] / f"ttc_claude_{job}_0.err"
    err.write_text("loading\n" * 1000)
    assert _once(setup["config"]) == 0
    cursor = _ledger(setup).cursors[str(err)]
    assert cursor.offset == err.stat().st_size
    with open(err, "a") as fh:
        fh.write(KEY_ERROR_TB)
    fake.finish(f"{job}_0", "FAILED")
    assert _once(setup["config"]) == 0
    ledger = _ledger(setup)
    record = ledger.jobs[f"{job}_0"]
    assert record.error_type == "code_error"
    assert record.evidence["line_no"] == 1004  # numbering continues across reads


@pytest.mark.parametrize(
    "point", ["tick.after_sacct", "tick.mid_scan", "ledger.before_rename", "ledger.after_rename"]
)
def test_kill_at_any_tick_step_never_classifies_twice(
    fake: FakeSlurm, setup: dict[str, Any], point: str
) -> None:
    job = _array(fake, setup["logs"], "0-2")
    for t in range(3):
        fake.finish(f"{job}_{t}", "FAILED", err=KEY_ERROR_TB)
    env = fake.env()
    env["SLURM_TRIAGE_CRASH_AT"] = point
    cmd = [sys.executable, "-m", "daemon", "run", "--once", "--config", str(setup["config"])]
    crashed = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
    assert crashed.returncode == -signal.SIGKILL
    del env["SLURM_TRIAGE_CRASH_AT"]
    again = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
    assert again.returncode == 0, again.stderr
    jobs = _ledger(setup).jobs
    stamps = {jobs[f"{job}_{t}"].classified_at for t in range(3)}
    assert None not in stamps
    third = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
    assert third.returncode == 0
    assert {k: r.classified_at for k, r in _ledger(setup).jobs.items()} == {
        k: r.classified_at for k, r in jobs.items()
    }


def test_second_daemon_is_refused_clearly(fake: FakeSlurm, setup: dict[str, Any]) -> None:
    env = fake.env()
    cmd = [sys.executable, "-m", "daemon", "run", "--config", str(setup["config"])]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (setup["state"] / "health.json").exists():
            assert time.monotonic() < deadline, "daemon did not tick"
            time.sleep(0.1)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert "another slurm-triage daemon" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0


def test_sigterm_finishes_and_exits_zero_with_systemd_notify(
    fake: FakeSlurm, setup: dict[str, Any], tmp_path: Path
) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(20)
    env = fake.env()
    env["NOTIFY_SOCKET"] = str(sock_path)
    env["WATCHDOG_USEC"] = "1500000"
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "--config", str(setup["config"])],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 20
        while not ({"READY=1", "WATCHDOG=1"} <= set(seen)) and time.monotonic() < deadline:
            seen.extend(sock.recv(4096).decode().splitlines())
        assert "READY=1" in seen
        assert "WATCHDOG=1" in seen
        assert any(s.startswith("STATUS=") for s in seen)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        sock.close()
    assert rc == 0
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    # not a terminal: JSON lines for journald
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(entry.get("event") == "stopped" for entry in lines)


def test_status_json_has_a_stable_shape(
    fake: FakeSlurm, setup: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    job = _array(fake, setup["logs"], "0-1")
    fake.finish(f"{job}_0", "FAILED", err=RATE_LIMIT_TB)
    fake.finish(f"{job}_1", "FAILED", err=KEY_ERROR_TB)
    assert _once(setup["config"]) == 0
    capsys.readouterr()
    assert main(["status", "--json", "--config", str(setup["config"])]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {
        "ledger_path",
        "daemon_running",
        "jobs_watched",
        "jobs_active",
        "failures_last_day",
        "last_tick",
        "outbox",
        "resubmit",
    }
    assert set(data["last_tick"]) == {"started_at", "finished_at", "duration_s", "errors"}
    assert data["failures_last_day"] == {"rate_limit": 1, "code_error": 1}
    assert data["daemon_running"] is False
    assert main(["status", "--config", str(setup["config"])]) == 0
    text = capsys.readouterr().out
    assert "1 rate_limit" in text and "last tick:" in text


def test_status_without_a_ledger_says_never(
    setup: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--config", str(setup["config"])]) == 0
    assert "last tick: never" in capsys.readouterr().out


def test_missing_sacct_binary_is_an_error_not_a_crash(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("SLURM_TRIAGE_SLURM__SACCT", "/nonexistent/sacct")
    monkeypatch.setenv("SLURM_TRIAGE_SLURM__SQUEUE", "/nonexistent/squeue")
    assert _once(setup["config"]) == 1
    errors = _ledger_or_beat(setup)
    assert any("sacct" in e for e in errors)


def _ledger_or_beat(setup: dict[str, Any]) -> list[str]:
    beat = json.loads((setup["state"] / "health.json").read_text())
    return list(beat["last_tick_errors"])


def test_help_is_fast_because_heavy_imports_are_lazy() -> None:
    code = "import sys, daemon.cli; daemon.cli.build_parser(); print(sorted(m for m in sys.modules if m.split('.')[0] in {'apscheduler','slack_sdk','structlog','pydantic','pydantic_settings'}))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ),
    )
    assert out.stdout.strip() == "[]"


def test_requeued_job_is_judged_again_from_its_rewritten_log(
    fake: FakeSlurm, setup: dict[str, Any]
) -> None:
    job = _array(fake, setup["logs"], "0")
    fake.finish(f"{job}_0", "FAILED", err=RATE_LIMIT_TB)
    assert _once(setup["config"]) == 0
    assert _ledger(setup).jobs[f"{job}_0"].error_type == "rate_limit"
    # scontrol requeue: same job id, running again, and Slurm truncates the log
    fake.set_state(f"{job}_0", "RUNNING")
    err = setup["logs"] / f"ttc_claude_{job}_0.err"
    err.write_text("")
    time.sleep(0.01)
    assert _once(setup["config"]) == 0
    assert _ledger(setup).jobs[f"{job}_0"].outcome == "running"
    fake.finish(f"{job}_0", "FAILED", err=KEY_ERROR_TB)
    assert _once(setup["config"]) == 0
    record = _ledger(setup).jobs[f"{job}_0"]
    # judged from the new run's log, with line numbers of the rewritten file
    assert record.error_type == "code_error"
    assert record.evidence["line_no"] == 4
