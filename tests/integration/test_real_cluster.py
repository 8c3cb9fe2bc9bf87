"""`slurm-triage analyze` and `classify` on logs and accounting from real Slurm jobs.

The jobs (tests/integration/jobs/) end the ways real sweeps end: API rate
limit, network error, a code bug, success, a memory kill, scancel, a time
limit, and one task still running. Each test states what Slurm itself
recorded first, so a broken testbed is told apart from a broken classifier.
"""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
from slurm_it import Submitted, memory_mode, run, triage

pytestmark = pytest.mark.slurm


def _analyze(sub: Submitted, tmp_path: Path, *extra: str) -> dict[str, Any]:
    csv_path = tmp_path / "failed_jobs.csv"
    proc = triage(
        "analyze", str(sub.log_dir), str(sub.results_dir), "--json", "--csv", str(csv_path), *extra
    )
    assert proc.returncode == 0, f"analyze exited {proc.returncode}: {proc.stderr}"
    data: dict[str, Any] = json.loads(proc.stdout)
    data["_csv"] = csv_path
    return data


def _by_key(failures: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f["key"]: f for f in failures}


def test_slurm_records_the_real_endings(
    submitted: Submitted, fast_rows: dict[str, dict[str, str]]
) -> None:
    """Precondition for the rest: the testbed produces what real clusters do."""
    state = {j: fast_rows[j]["State"].split()[0] for j in submitted.finished_fast}
    assert state[submitted.task(1)] == "FAILED"
    assert state[submitted.task(2)] == "FAILED"
    assert state[submitted.task(3)] == "FAILED"
    assert state[submitted.task(4)] == "COMPLETED"
    assert state[submitted.cancel_job] == "CANCELLED"
    expected_oom = {"OUT_OF_MEMORY"}
    if memory_mode() != "cgroup":
        expected_oom = {"FAILED"}  # OverMemoryKill fallback: FAILED 0:9
    assert state[submitted.oom_job] in expected_oom
    assert fast_rows[submitted.task(1)]["ExitCode"] == "1:0"


def test_analyze_classifies_real_failures_and_skips_running_task(
    submitted: Submitted, fast_rows: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    data = _analyze(submitted, tmp_path)
    fails = _by_key(data["failures"])
    got = {k: f["error_type"] for k, f in fails.items()}
    assert got.get(submitted.task(1)) == "rate_limit", got
    assert got.get(submitted.task(2)) == "network", got
    assert got.get(submitted.task(3)) == "code_error", got
    assert got.get(submitted.oom_job) == "oom", got
    assert got.get(submitted.cancel_job) == "cancelled", got
    # The success (after a recovered 429) and the still-running task are not failures.
    assert submitted.task(4) not in fails
    assert submitted.task(5) not in fails
    assert data["summary"]["excluded_active"] >= 1
    assert data["summary"]["successful"] >= 1
    assert fails[submitted.task(1)]["retryable"] is True
    assert fails[submitted.task(2)]["retryable"] is True
    assert fails[submitted.task(3)]["retryable"] is False
    assert fails[submitted.cancel_job]["retryable"] is False
    # Evidence is the deciding line, quoted from the log.
    ev1 = json.dumps(fails[submitted.task(1)]["evidence"])
    assert "RateLimitError" in ev1 or "429" in ev1, ev1
    ev2 = json.dumps(fails[submitted.task(2)]["evidence"])
    assert "APIConnectionError" in ev2 or "ConnectError" in ev2, ev2
    ev3 = json.dumps(fails[submitted.task(3)]["evidence"])
    assert "KeyError" in ev3, ev3
    # Array task N maps to configs/config_N.json.
    assert fails[submitted.task(3)]["config_file"].endswith("config_0003.json")
    assert fails[submitted.task(3)]["config"]["reasoning_budget"] == str(3 * 1024)


def test_analyze_csv_and_rerun_command_cover_retryable_sweep_tasks(
    submitted: Submitted, fast_rows: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    data = _analyze(submitted, tmp_path)
    with data["_csv"].open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    keyed = {(r["job_id"], r["array_id"]): r for r in rows}
    assert keyed[(submitted.sweep, "1")]["error_type"] == "rate_limit"
    assert keyed[(submitted.sweep, "3")]["error_type"] == "code_error"
    assert (submitted.sweep, "4") not in keyed
    assert (submitted.sweep, "5") not in keyed
    assert list(rows[0])[:4] == ["job_id", "job_name", "array_id", "error_type"]
    # A re-run command for the sweep covers the retryable tasks 1 and 2 only.
    sweep_cmds = [c for c in data["commands"] if c.get("job_id") == submitted.sweep]
    assert len(sweep_cmds) == 1, data["commands"]
    assert sweep_cmds[0]["array"] == "1-2"


def test_rerun_command_resubmits_exactly_the_retryable_tasks(
    submitted: Submitted, fast_rows: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    """The printed command, run as printed (held, so nothing executes), makes tasks 1-2 only."""
    data = _analyze(submitted, tmp_path)
    (cmd,) = [c["command"] for c in data["commands"] if c.get("job_id") == submitted.sweep]
    cwd = None
    if cmd.startswith("cd "):
        cd, _, cmd = cmd.partition(" && ")
        cwd = Path(shlex.split(cd)[1])
    argv = shlex.split(cmd)
    assert argv[0] == "sbatch", cmd
    # sbatch keeps the last --array it is given; a stale one would re-run every task.
    arrays = [a for a in argv if a.startswith(("--array", "-a"))]
    assert len(arrays) == 1, f"more than one --array in the re-run command: {cmd}"
    proc = run([*argv, "--hold", "--parsable"], cwd=cwd)
    new_id = proc.stdout.strip().split(";")[0]
    submitted.extra.append(new_id)
    try:
        q = run(["squeue", "-h", "-r", "-j", new_id, "-o", "%K"])
        assert sorted(q.stdout.split()) == ["1", "2"]
    finally:
        run(["scancel", new_id], check=False)


def test_classify_reads_real_logs(
    submitted: Submitted, fast_rows: dict[str, dict[str, str]]
) -> None:
    d = submitted.log_dir
    files = {
        "rate": d / f"sweep_{submitted.sweep}_1.err",
        "net": d / f"sweep_{submitted.sweep}_2.err",
        "code": d / f"sweep_{submitted.sweep}_3.err",
        "oom": d / f"hog_{submitted.oom_job}.err",
        "cancel": d / f"cancelme_{submitted.cancel_job}.err",
        "running": d / f"sweep_{submitted.sweep}_5.err",
    }
    for f in files.values():
        assert f.is_file(), f"Slurm did not write {f}"
    proc = triage("classify", "--json", *map(str, files.values()))
    assert proc.returncode in (0, 1), proc.stderr
    out = {Path(o["path"]).name: o for o in json.loads(proc.stdout)}
    res = {k: out[f.name] for k, f in files.items()}
    assert res["rate"]["error_type"] == "rate_limit"
    assert res["net"]["error_type"] == "network"
    assert res["code"]["error_type"] == "code_error"
    assert res["cancel"]["error_type"] == "cancelled"
    assert res["oom"]["error_type"] == "oom"
    if memory_mode() == "cgroup":
        assert "oom-kill" in (res["oom"]["evidence"] or "")
    # A running task's log has no ending yet: never a failure.
    assert res["running"]["outcome"] != "failure"
    assert res["running"]["error_type"] is None


def test_time_limit_job(submitted: Submitted, timeout_row: dict[str, str], tmp_path: Path) -> None:
    assert timeout_row["State"].split()[0] == "TIMEOUT"
    err = submitted.log_dir / f"train_long_{submitted.timeout_job}.err"
    assert "DUE TO TIME LIMIT" in err.read_text()
    proc = triage("classify", "--json", str(err))
    assert json.loads(proc.stdout)[0]["error_type"] == "time_limit"
    data = _analyze(submitted, tmp_path, "--jobs", submitted.timeout_job)
    fails = _by_key(data["failures"])
    assert fails[submitted.timeout_job]["error_type"] == "time_limit"
    assert fails[submitted.timeout_job]["retryable"] is False
