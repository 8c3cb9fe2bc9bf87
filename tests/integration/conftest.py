"""Fixtures for the integration tests against a real Slurm cluster (tests/testbed/start.sh).

One session fixture submits every job at the start — the time-limit job first,
because it needs ~90 s of wall time — so the slow job runs while the other
tests proceed. Tests then poll sacct (with timeouts) for the rows they need.
Without a reachable cluster every test here is skipped, unless
SLURM_TESTBED_REQUIRED=1 (set by .ci/run), where that is an error instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from slurm_it import (
    JOBS_DIR,
    Submitted,
    cluster_problem,
    run,
    sbatch,
    wait_finished,
    wait_left_queue,
    wait_state,
    write_configs,
)


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    problem = cluster_problem()
    if problem is None:
        return
    if os.environ.get("SLURM_TESTBED_REQUIRED") == "1":
        pytest.fail(f"SLURM_TESTBED_REQUIRED=1 but the cluster is not usable: {problem}")
    pytest.skip(f"no Slurm cluster reachable: run tests/testbed/start.sh ({problem})")


@pytest.fixture(scope="session")
def submitted(slurm_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Submitted]:
    root = tmp_path_factory.mktemp("slurm-it")
    log_dir = root / "logs"
    results_dir = root / "results"
    log_dir.mkdir()
    write_configs(results_dir, range(1, 6))
    common = ["--chdir", str(log_dir), "--mem=200M", "-c", "1"]
    ids: list[str] = []
    try:
        # First: the time limit (rounded up to 1 min; ends 20-30 s after that).
        timeout_job = sbatch(
            [
                *common,
                "--time=1",
                "-J",
                "train_long",
                "-o",
                "train_long_%j.out",
                "-e",
                "train_long_%j.err",
            ],
            JOBS_DIR / "sleeper.sh",
            cwd=log_dir,
        )
        ids.append(timeout_job)
        sweep = sbatch(
            [
                *common,
                "--array=1-5",
                "-J",
                "sweep",
                "-o",
                "sweep_%A_%a.out",
                "-e",
                "sweep_%A_%a.err",
            ],
            JOBS_DIR / "sweep.py",
            cwd=log_dir,
        )
        ids.append(sweep)
        oom_job = sbatch(
            [
                "--chdir",
                str(log_dir),
                "--mem=64M",
                "-c",
                "1",
                "-J",
                "hog",
                "-o",
                "hog_%j.out",
                "-e",
                "hog_%j.err",
            ],
            JOBS_DIR / "hog.py",
            cwd=log_dir,
        )
        ids.append(oom_job)
        cancel_job = sbatch(
            [*common, "-J", "cancelme", "-o", "cancelme_%j.out", "-e", "cancelme_%j.err"],
            JOBS_DIR / "sleeper.sh",
            cwd=log_dir,
        )
        ids.append(cancel_job)
        # Cancel it only once it runs, so Slurm writes its CANCELLED line in the log.
        wait_state(cancel_job, "RUNNING", timeout=60)
        run(["scancel", cancel_job])
        yield Submitted(log_dir, results_dir, timeout_job, sweep, oom_job, cancel_job)
    finally:
        # The running task (and the time-limit job, if a test failed early).
        if ids:
            run(["scancel", *ids], check=False)


@pytest.fixture(scope="session")
def fast_rows(submitted: Submitted) -> dict[str, dict[str, str]]:
    """sacct rows of the jobs that end quickly, once complete; task 5 is RUNNING."""
    rows = wait_finished(submitted.finished_fast, timeout=120)
    wait_state(submitted.task(5), "RUNNING", timeout=60)
    return rows


@pytest.fixture(scope="session")
def timeout_row(submitted: Submitted) -> dict[str, str]:
    """The time-limit job's sacct row (waits up to ~3 min, usually ~90 s)."""
    row = wait_finished([submitted.timeout_job], timeout=200)[submitted.timeout_job]
    wait_left_queue(submitted.timeout_job, timeout=60)
    return row
