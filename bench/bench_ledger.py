"""Ledger save/load cost at scale.

    python bench/bench_ledger.py [--records 100000] [--repeat 3]

Target (issue 3): saving 100,000 job records takes under 0.5 s. Prints the best of
``--repeat`` runs for each step, the file size and what the per-record row cache costs
in memory.

The save lines:

- steady state (the headline): the daemon keeps its ledger in memory between ticks, so
  a save follows a previous save. Before each timed save ~1% of the jobs change a few
  fields (state, notified, updated_at), ~100 jobs are new and ~1% of the cursors moved
  their offset; only those rows are encoded again.
- right after load: the daemon's first save after a start. The loader seeds each
  record's cached row from its line in the file, so only what changed since is encoded
  (the same 1% churn as above).
- after load, nothing cached: every row encoded, as after loading a file the loader
  cannot seed from (a migration, a file written before rows had their own lines).

Memory: RSS a loaded ledger holds (records plus the seeded rows) and the peak while
loading, and what the first save after the load adds.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from daemon import ledger as ledger_mod
from daemon.ledger import Ledger, LedgerStore, iso, read_ledger
from daemon.records import LogCursor


def fill(rec: object, key: str, now: datetime) -> str:
    """Make ``rec`` a classified rate-limit failure; returns its log path."""
    log = f"/home/alice/logs/negotiation_sweep_{key}.err"
    values = {
        "job_name": "negotiation_sweep",
        "user": "alice",
        "state": "FAILED",
        "outcome": "failure",
        "error_type": "rate_limit",
        "retryable": True,
        "evidence": {
            "text": "openai.RateLimitError: Error code: 429 - Rate limit reached for o3",
            "line_no": 812,
            "source": log,
        },
        "log_file": log,
        "config": {"reasoning_model": "o3", "baseline_model": "gpt-4o", "model_order": "ab"},
        "work_dir": "/home/alice/exp",
        "submit_line": "sbatch --array=0-999 run.sbatch",
        "exit_code": 1,
        "elapsed_s": 1234,
        "finished_at": iso(now),
        "classified_at": iso(now),
    }
    for name, value in values.items():
        setattr(rec, name, value)
    return log


def build(n: int) -> Ledger:
    now = datetime.now(timezone.utc)
    led = Ledger.empty(now)
    for i in range(n):
        key = f"{1_000_000 + i // 1000}_{i % 1000}"
        log = fill(led.get_or_create_job(key, now=now), key, now)
        led.cursors[log] = LogCursor(
            path=log, key=key, dev=2049, inode=10_000 + i, size=90211, offset=90211, done=True
        )
    return led


class Churn:
    """One tick's worth of changes: ~1% of jobs and cursors touched, ~100 jobs new."""

    def __init__(self, led: Ledger) -> None:
        self.led = led
        self.jobs = list(led.jobs.values())
        self.cursors = list(led.cursors.values())
        self.round = 0
        self.new = 0

    def __call__(self) -> None:
        self.round += 1
        now = datetime.now(timezone.utc)
        stamp = iso(now)
        step = 100  # every 100th record, shifted per round: 1%
        for rec in self.jobs[self.round % step :: step]:
            rec.state = "COMPLETED" if rec.state != "COMPLETED" else "FAILED"
            rec.notified = not rec.notified
            rec.updated_at = stamp
        for cur in self.cursors[self.round % step :: step]:
            cur.offset += 100
            cur.size += 100
        for _ in range(100):
            self.new += 1
            key = f"9000000_{self.new}"
            fill(self.led.get_or_create_job(key, now=now), key, now)
        self.led.mark_dirty()


def best(repeat: int, fn: Callable[[], object], setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def cache_bytes(led: Ledger) -> int:
    """Bytes held by the cached rows (the bytes objects themselves)."""
    size = sys.getsizeof
    total = 0
    for rec in (*led.jobs.values(), *led.cursors.values()):
        row = getattr(rec, "_row", None)
        if row is not None:
            total += size(row)
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory", type=Path, help=argparse.SUPPRESS)  # the child's job
    args = ap.parse_args()
    if args.memory is not None:
        memory_report(args.memory)
        return
    led = build(args.records)
    encoder = "orjson" if ledger_mod._orjson is not None else "json (stdlib)"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state" / "ledger.json"
        with LedgerStore(path) as store:
            store.save(led)  # the first save runs retention (hourly) and creates the file
            churn = Churn(led)
            t_steady = best(args.repeat, lambda: store.save(led), setup=churn)
            t_noop = best(args.repeat, lambda: store.save(led))
            t_encode = best(args.repeat, lambda: ledger_mod.encode_ledger(led), setup=churn)
            t_retention = best(
                args.repeat,
                lambda: ledger_mod.apply_retention(led, datetime.now(timezone.utc), 14.0),
            )
            t_load = best(args.repeat, store.load)
            t_read = best(args.repeat, lambda: read_ledger(path))

            # right after load: rows seeded from the file, 1% changed since
            loaded: list[Ledger] = []

            def load_fresh() -> None:
                loaded.clear()
                gc.collect()
                loaded.append(store.load())

            def load_and_churn() -> None:
                load_fresh()
                Churn(loaded[0])()

            def load_uncached() -> None:
                load_fresh()
                for rec in (*loaded[0].jobs.values(), *loaded[0].cursors.values()):
                    object.__setattr__(rec, "_row", None)
                loaded[0].mark_dirty()

            t_after_load = best(args.repeat, lambda: store.save(loaded[0]), setup=load_and_churn)
            t_full = best(args.repeat, lambda: store.save(loaded[0]), setup=load_uncached)

            size = path.stat().st_size
        # in a fresh interpreter (memory this one freed would hide what a load takes),
        # once this one has let go of the lock
        memory = subprocess.run(
            [sys.executable, __file__, "--memory", str(path)],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        ).stdout
    n = args.records
    print(f"records: {n} jobs + {n} cursors, encoder: {encoder}, file: {size / 1e6:.1f} MB")
    print(f"save, steady state (1% changed, +100 jobs): {t_steady:.3f} s   target < 0.5 s")
    print(f"  encode only, steady state:                {t_encode:.3f} s")
    print(f"save right after load (1% changed, +100):   {t_after_load:.3f} s   target < 0.5 s")
    print(f"save after load, nothing cached (all rows): {t_full:.3f} s")
    print(f"save when unchanged:                        {t_noop * 1e6:.1f} us")
    print(f"retention pass (hourly):                    {t_retention:.3f} s")
    print(f"load (LedgerStore.load):                    {t_load:.3f} s")
    print(f"read_ledger:                                {t_read:.3f} s")
    print(memory, end="")


def memory_report(path: Path) -> None:
    """What a loaded ledger holds, the load's peak and what the first save adds (1% churn)."""
    gc.collect()
    rss_start = _status_kb("VmRSS")
    can_peak = _reset_peak()
    with LedgerStore(path) as store:
        led = store.load()
        load_peak = _status_kb("VmHWM")
        gc.collect()
        rss_loaded = _status_kb("VmRSS")
        seeded = cache_bytes(led)
        Churn(led)()
        _reset_peak()
        store.save(led)
        save_peak = _status_kb("VmHWM")
        gc.collect()
        rss_saved = _status_kb("VmRSS")
    print(f"row cache right after load: {seeded / 1e6:.1f} MB in bytes objects")
    print(f"  RSS held by the loaded ledger:            {(rss_loaded - rss_start) / 1e3:+.1f} MB")
    if can_peak:
        print(
            f"  peak RSS during the load, above start:    {(load_peak - rss_start) / 1e3:+.1f} MB"
        )
    print(f"  RSS added by the first save after load:   {(rss_saved - rss_loaded) / 1e3:+.1f} MB")
    if can_peak:
        print(
            f"  peak RSS during that save, above before:  {(save_peak - rss_loaded) / 1e3:+.1f} MB"
        )


if __name__ == "__main__":
    main()
