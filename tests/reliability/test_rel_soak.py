"""Soak: the daemon ticking for days of simulated time against tens of thousands of jobs,
with churn. Memory (RSS, or tracemalloc) and the ledger file must stay flat over the second half.

Size by env: SOAK_TICKS (default 30), SOAK_ACTIVE (jobs pending/running at any time,
default 15000), SOAK_CHURN (tasks finishing per tick, default 300). SOAK_TRACEMALLOC=1
measures traced Python memory instead of RSS (exact, ~5x slower).
"""

from __future__ import annotations

import gc
import os
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from daemon import service
from daemon.ledger import LedgerStore
from daemon.settings import Settings
from tests.reliability.conftest import env_int
from tests.reliability.soakcluster import SoakCluster

TICK = timedelta(minutes=30)
# finished records leave the ledger after 3 h = 6 ticks: long before the second half
RETENTION_DAYS = 0.125


def run_soak(tmp_path: Path, ticks: int, active: int, churn: int) -> dict[str, list[int]]:
    now = datetime(2026, 3, 1, tzinfo=timezone.utc)
    cluster = SoakCluster(user="alice", now=now)
    work = tmp_path / "exp"
    work.mkdir(exist_ok=True)
    arrays = 0
    while cluster.active() < active:
        cluster.submit_array(f"sweep{arrays}", 100, work)
        arrays += 1
    settings = Settings(
        state_dir=tmp_path / "state",
        slurm={"user": "alice"},
        watch={
            "retention_days": RETENTION_DAYS,
            "sacct_overlap_s": 600,
            "initial_lookback_s": 3600,
        },
    )
    clock = [now]
    curve: dict[str, list[int]] = {"mem": [], "ledger": [], "jobs": [], "sacct_rows": []}
    store = LedgerStore(settings.ledger_path, retention_days=settings.watch.retention_days)
    with store:
        ctx = service.TickContext(
            settings=settings,
            store=store,
            ledger=store.load(),
            runner=cluster,
            user="alice",
            clock=lambda: clock[0],
        )
        for _ in range(ticks):
            finished = cluster.churn(finish=churn, start=churn)
            while cluster.active() < active:  # new sweeps keep arriving
                cluster.submit_array(f"sweep{arrays}", 100, work)
                arrays += 1
            report = service.tick(ctx)
            assert not report.errors, report.errors
            assert report.sacct_rows is not None
            # every task that finished this tick was judged in this tick
            done = {f"{j['array_job_id']}_{j['array_task']}" for j in finished}
            assert done <= set(report.classified), sorted(done - set(report.classified))[:5]
            cluster.forget_older_than(2 * 86400)
            clock[0] += TICK
            cluster.set_now(clock[0])
            gc.collect()
            curve["mem"].append(_memory_now())
            curve["ledger"].append(settings.ledger_path.stat().st_size)
            curve["jobs"].append(len(ctx.ledger.jobs))
            curve["sacct_rows"].append(report.sacct_rows)
    return curve


def _memory_now() -> int:
    """Traced bytes when tracemalloc runs (SOAK_TRACEMALLOC=1: exact, ~2x slower), else the
    resident set size now (not the peak), which a leak grows just the same."""
    if tracemalloc.is_tracing():
        return tracemalloc.get_traced_memory()[0]
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _flat(series: list[int], tolerance: float) -> tuple[bool, int, int]:
    half = series[len(series) // 2 :]
    lo, hi = min(half), max(half)
    return hi <= lo * (1 + tolerance), lo, hi


@pytest.mark.slow
def test_soak_memory_and_ledger_stay_flat(tmp_path: Path) -> None:
    ticks = env_int("SOAK_TICKS", 30)
    active = env_int("SOAK_ACTIVE", 15000)
    churn = env_int("SOAK_CHURN", 300)
    assert ticks >= 24, "the retention period (6 ticks) must pass well before the second half"
    if env_int("SOAK_TRACEMALLOC", 0):
        tracemalloc.start()
    try:
        curve = run_soak(tmp_path, ticks, active, churn)
    finally:
        tracemalloc.stop()
    assert max(curve["sacct_rows"]) >= active  # tens of thousands of rows every tick
    ok, lo, hi = _flat(curve["ledger"], 0.15)
    assert ok, f"ledger grew over the second half: {lo} -> {hi} bytes ({curve['ledger']})"
    ok, lo, hi = _flat(curve["jobs"], 0.15)
    assert ok, f"records grew over the second half: {lo} -> {hi}"
    ok, lo, hi = _flat(curve["mem"], 0.15)
    assert ok, f"memory grew over the second half: {lo} -> {hi} ({curve['mem']})"
