"""Helpers for the integration tests against a real Slurm cluster (tests/testbed/start.sh).

One session fixture submits every job at the start — the time-limit job first,
because it needs ~90 s of wall time — so the slow job runs while the other
tests proceed. Tests then poll sacct (with timeouts) for the rows they need.
Without a reachable cluster every test here is skipped, unless
SLURM_TESTBED_REQUIRED=1 (set by .ci/run), where that is an error instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

JOBS_DIR = Path(__file__).parent / "jobs"
TESTBED_DIR = Path(__file__).parents[1] / "testbed"
CMD_TIMEOUT_S = 30.0
# States after which sacct will not change any more (besides a late-filled row).
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "CANCELLED",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}
SACCT_FIELDS = ("JobID", "JobIDRaw", "JobName", "State", "ExitCode", "SubmitLine", "WorkDir")


def _default_conf() -> None:
    # Find the testbed's config when the caller did not export SLURM_CONF.
    if "SLURM_CONF" not in os.environ:
        base = Path(os.environ.get("SLURM_TESTBED_DIR", "/tmp/slurm-testbed"))
        conf = base / "etc" / "slurm.conf"
        if conf.is_file():
            os.environ["SLURM_CONF"] = str(conf)


def run(
    argv: Sequence[str],
    *,
    timeout: float = CMD_TIMEOUT_S,
    check: bool = True,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command (never a shell) with a timeout; on failure show its stderr."""
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}"
        )
    return proc


def memory_mode() -> str:
    """How the testbed limits memory: "cgroup" (OUT_OF_MEMORY) or "overmemorykill" (FAILED 0:9)."""
    base = Path(os.environ.get("SLURM_TESTBED_DIR", "/tmp/slurm-testbed"))
    try:
        return (base / "memory_mode").read_text().strip()
    except OSError:
        return "cgroup"  # not our testbed: assume a real cluster with cgroups


def cluster_problem() -> str | None:
    """None when sinfo shows a usable node and sacct answers; else why not."""
    _default_conf()
    for tool in ("sinfo", "sacct", "sbatch", "squeue", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} not on PATH"
    try:
        info = run(["sinfo", "-h", "-N", "-o", "%T"], timeout=10, check=False)
        if info.returncode != 0:
            return f"sinfo failed: {info.stderr.strip()[:200]}"
        states = info.stdout.split()
        if not any(s.rstrip("*~#").startswith(("idle", "mix", "alloc")) for s in states):
            return f"no usable node (sinfo: {' '.join(states) or 'nothing'})"
        acct = run(["sacct", "-n", "-X", "-S", "now-1minute"], timeout=15, check=False)
        if acct.returncode != 0:
            return f"sacct failed: {acct.stderr.strip()[:200]}"
    except subprocess.TimeoutExpired as e:
        return f"{e.cmd[0]} did not answer within {e.timeout:.0f}s"
    return None


def sbatch(args: Sequence[str], script: Path, *, cwd: Path) -> str:
    proc = run(["sbatch", "--parsable", *args, str(script)], cwd=cwd)
    return proc.stdout.strip().split(";")[0]


def sacct_rows(job_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """JobID -> row for the given jobs (array jobs expand to one row per task)."""
    proc = run(
        [
            "sacct",
            "-X",
            "--parsable2",
            "--noheader",
            "-j",
            ",".join(job_ids),
            f"--format={','.join(SACCT_FIELDS)}",
        ],
        check=False,
    )
    if proc.returncode != 0:
        return {}
    rows: dict[str, dict[str, str]] = {}
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) != len(SACCT_FIELDS):
            continue
        row = dict(zip(SACCT_FIELDS, parts, strict=True))
        rows[row["JobID"]] = row
    return rows


def _complete(row: dict[str, str] | None) -> bool:
    # Short jobs reach sacct with State/ExitCode first and a placeholder for the
    # rest (JobName "allocation", no SubmitLine) for a few seconds.
    if row is None:
        return False
    state = row["State"].split()[0]
    return state in TERMINAL and row["JobName"] != "allocation" and bool(row["SubmitLine"])


def wait_finished(job_ids: Sequence[str], *, timeout: float) -> dict[str, dict[str, str]]:
    """Poll sacct until every JobID is terminal with a complete row."""
    deadline = time.monotonic() + timeout
    rows: dict[str, dict[str, str]] = {}
    while time.monotonic() < deadline:
        rows = sacct_rows(sorted({j.split("_")[0] for j in job_ids}))
        if all(_complete(rows.get(j)) for j in job_ids):
            return rows
        time.sleep(0.5)
    pending = {
        j: rows.get(j, {}).get("State", "missing") for j in job_ids if not _complete(rows.get(j))
    }
    raise AssertionError(f"jobs not finished in sacct after {timeout:.0f}s: {pending}")


def wait_state(job_id: str, state: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "?"
    while time.monotonic() < deadline:
        proc = run(["squeue", "-h", "-r", "-j", job_id.split("_")[0], "-o", "%i %T"], check=False)
        for line in proc.stdout.splitlines():
            jid, _, st = line.partition(" ")
            if jid == job_id:
                last = st
                if st == state:
                    return
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not {state} after {timeout:.0f}s (last: {last})")


def wait_left_queue(job_id: str, *, timeout: float) -> None:
    """Poll until squeue no longer lists the job as pending/running/completing.

    A job killed at its time limit is TIMEOUT in sacct at once but stays COMPLETING
    in squeue for up to KillWait seconds, and analyze counts COMPLETING as active.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False)
        # Once purged from slurmctld (MinJobAge), squeue -j rejects the id instead.
        gone = proc.returncode == 0 or "Invalid job id" in proc.stderr
        if gone and not proc.stdout.strip():
            return
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still in squeue after {timeout:.0f}s")


@dataclass
class Submitted:
    """The jobs of this session and where their logs go."""

    log_dir: Path
    results_dir: Path
    timeout_job: str
    sweep: str  # array job id; tasks 1..5
    oom_job: str
    cancel_job: str
    extra: list[str] = field(default_factory=list)

    def task(self, n: int) -> str:
        return f"{self.sweep}_{n}"

    @property
    def finished_fast(self) -> list[str]:
        """Jobs that end within seconds (all but the time-limit and running ones)."""
        return [
            self.task(1),
            self.task(2),
            self.task(3),
            self.task(4),
            self.oom_job,
            self.cancel_job,
        ]

    @property
    def all_ids(self) -> list[str]:
        return [self.timeout_job, self.sweep, self.oom_job, self.cancel_job, *self.extra]


def write_configs(results_dir: Path, tasks: Sequence[int]) -> None:
    """Experiment configs as the seed workflow lays them out: configs/config_NNNN.json."""
    configs = results_dir / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    for n in tasks:
        cfg = {
            "reasoning_model": "claude-sonnet" if n % 2 else "o3-mini",
            "baseline_model": "gpt-4o",
            "model_order": "reasoning_first" if n < 3 else "baseline_first",
            "reasoning_token_budget": 1024 * n,
            "competition_level": n,
        }
        (configs / f"config_{n:04d}.json").write_text(json.dumps(cfg, indent=2))


def triage(
    *args: str, timeout: float = 120.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed console script, as a user runs it."""
    exe = shutil.which("slurm-triage")
    assert exe is not None, "slurm-triage console script not installed (pip install -e .)"
    return run([exe, *args], timeout=timeout, check=False, env=env)
