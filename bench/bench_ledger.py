"""Ledger save/load cost at scale.

    python bench/bench_ledger.py [--records 100000] [--repeat 3]

Target (issue 3): saving 100,000 job records takes under 0.5 s. Prints the best of
``--repeat`` runs for each step and the file size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from daemon import ledger as ledger_mod
from daemon.ledger import Ledger, LedgerStore, iso, read_ledger
from daemon.records import LogCursor


def build(n: int) -> Ledger:
    now = datetime.now(timezone.utc)
    led = Ledger.empty(now)
    for i in range(n):
        key = f"{1_000_000 + i // 1000}_{i % 1000}"
        rec = led.get_or_create_job(key, now=now)
        rec.job_name = "negotiation_sweep"
        rec.user = "alice"
        rec.state = "FAILED"
        rec.outcome = "failure"
        rec.error_type = "rate_limit"
        rec.retryable = True
        log = f"/home/alice/logs/negotiation_sweep_{key}.err"
        rec.evidence = {
            "text": "openai.RateLimitError: Error code: 429 - Rate limit reached for o3",
            "line_no": 812,
            "source": log,
        }
        rec.log_file = log
        rec.config = {"reasoning_model": "o3", "baseline_model": "gpt-4o", "model_order": "ab"}
        rec.work_dir = "/home/alice/exp"
        rec.submit_line = "sbatch --array=0-999 run.sbatch"
        rec.exit_code = 1
        rec.elapsed_s = 1234
        rec.finished_at = iso(now)
        rec.classified_at = iso(now)
        led.cursors[log] = LogCursor(
            path=log, key=key, dev=2049, inode=10_000 + i, size=90211, offset=90211, done=True
        )
    return led


def best(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    led = build(args.records)
    encoder = "orjson" if ledger_mod._orjson is not None else "json (stdlib)"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state" / "ledger.json"
        with LedgerStore(path) as store:
            store.save(led)  # first save runs retention and creates the file

            def save() -> None:
                led.mark_dirty()
                store.save(led)

            t_save = best(args.repeat, save)
            t_noop = best(args.repeat, lambda: store.save(led))
            t_encode = best(args.repeat, lambda: ledger_mod.encode_ledger(led))
            t_retention = best(
                args.repeat,
                lambda: ledger_mod.apply_retention(led, datetime.now(timezone.utc), 14.0),
            )
            t_load = best(args.repeat, store.load)
            t_read = best(args.repeat, lambda: read_ledger(path))
            size = path.stat().st_size
    n = args.records
    print(f"records: {n} jobs + {n} cursors, encoder: {encoder}, file: {size / 1e6:.1f} MB")
    print(f"save (encode+write+fsync+rename): {t_save:.3f} s   target < 0.5 s")
    print(f"  encode only:                    {t_encode:.3f} s")
    print(f"  retention pass (hourly):        {t_retention:.3f} s")
    print(f"save when unchanged:              {t_noop * 1e6:.1f} us")
    print(f"load (LedgerStore.load):          {t_load:.3f} s")
    print(f"read_ledger:                      {t_read:.3f} s")


if __name__ == "__main__":
    main()
