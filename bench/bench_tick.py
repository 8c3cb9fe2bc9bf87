"""Cost of one daemon tick as the log tree and the job count grow.

    python bench/bench_tick.py                       # 1k, 10k, 100k log files
    python bench/bench_tick.py --files 100000 --keep /tmp/tick-tree

For each size: a log tree of N ``.err`` files (N/2 array tasks with ``.err``/``.out``), a
ledger that already knows every job and file (the steady state of a long-running daemon),
and sacct/squeue answers served in-process in the real 22.05 ``--parsable2`` format (so
the figure is the daemon's own cost, not the cluster's). It times:

- a first tick that reads and classifies everything (cold),
- a tick with nothing new (target: < 1 s at 100,000 files, reading no file content),
- a tick where 1% of the files grew and their jobs finished.

File reads are counted by wrapping ``os.pread``/``os.read`` for the tick's duration.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.ledger import LedgerStore
from daemon.service import TickContext, tick
from daemon.settings import load_settings
from daemon.slurm import CommandOutput

KEY_ERROR = (
    "Traceback (most recent call last):\n"
    '  File "/home/u/exp/run.py", line 12, in <module>\n'
    "    budget = cfg['reasoning_budget']\n"
    "KeyError: 'reasoning_budget'\n"
)


class InProcessSlurm:
    """Answers sacct/squeue like Slurm 22.05 would (``-X --parsable2 --noheader``)."""

    def __init__(self, base_id: int, tasks: int, work_dir: str) -> None:
        self.base_id = base_id
        self.tasks = tasks
        self.work_dir = work_dir
        self.finished: dict[int, str] = {}
        self.ended_at: dict[int, datetime] = {}
        self.calls = 0

    def finish(self, task: int, state: str) -> None:
        self.finished[task] = state
        self.ended_at[task] = datetime.now()

    def run(
        self, argv: list[str], *, timeout: float, cwd: str | None = None, env: Any = None
    ) -> Any:
        self.calls += 1
        prog = os.path.basename(argv[0])
        if prog == "squeue":
            return CommandOutput(0, "", "", 0.0)
        delim = "\x1f" if any("--delimiter" in a for a in argv) else "|"
        fields = next(a.split("=", 1)[1] for a in argv if a.startswith("--format="))
        names = fields.split(",")
        rows = []
        end = datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
        start_arg = next(
            (argv[i + 1] for i, a in enumerate(argv) if a in ("-S", "--starttime")), None
        )
        window = datetime.fromisoformat(start_arg) if start_arg else None
        for task in range(self.tasks):
            state = self.finished.get(task, "RUNNING")
            ended = self.ended_at.get(task)
            if window is not None and ended is not None and ended < window:
                continue  # like sacct -S: jobs that ended before the window are not listed
            values = {
                "JobID": f"{self.base_id}_{task}",
                "JobIDRaw": str(self.base_id + 1 + task),
                "JobName": "sweep",
                "User": "bench",
                "State": state,
                "ExitCode": "1:0" if state == "FAILED" else "0:0",
                "Submit": end,
                "Start": end,
                "End": end if state != "RUNNING" else "Unknown",
                "Elapsed": "00:01:00",
                "TotalCPU": "00:00:30",
                "Timelimit": "01:00:00",
                "WorkDir": self.work_dir,
                "SubmitLine": f"sbatch --array=0-{self.tasks - 1} run.sh",
                "Comment": "",
                "Reason": "None",
                "AllocCPUS": "1",
                "NodeList": "node1",
            }
            rows.append(delim.join(values.get(n.split("%")[0], "") for n in names))
        return CommandOutput(0, "\n".join(rows) + "\n", "", 0.0)


def build_tree(root: Path, files: int) -> int:
    tasks = files // 2
    logs = root / "logs"
    for task in range(tasks):
        sub = logs / f"batch_{task // 1000:03d}"
        if task % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"sweep_5000000_{task}.err").write_text("loading\n")
        (sub / f"sweep_5000000_{task}.out").write_text("step 1\n")
    return tasks


class ReadCounter:
    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0
        self._pread = os.pread
        self._read = os.read

    def __enter__(self) -> ReadCounter:
        def pread(fd: int, n: int, off: int) -> bytes:
            data = self._pread(fd, n, off)
            self.calls += 1
            self.bytes += len(data)
            return data

        def read(fd: int, n: int) -> bytes:
            data = self._read(fd, n)
            self.calls += 1
            self.bytes += len(data)
            return data

        os.pread = pread  # type: ignore[assignment]
        os.read = read  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        os.pread = self._pread  # type: ignore[assignment]
        os.read = self._read  # type: ignore[assignment]


def run_size(files: int, keep: Path | None) -> None:
    root = keep or Path(tempfile.mkdtemp(prefix="slurm-triage-tick-"))
    try:
        t0 = time.perf_counter()
        tasks = build_tree(root, files)
        built = time.perf_counter() - t0
        state = root / "state"
        cfg = root / "settings.toml"
        cfg.write_text(
            f'state_dir = "{state}"\n[watch]\nlog_dirs = ["{root / "logs"}"]\n'
            "initial_lookback_s = 86400\n"
        )
        settings = load_settings(cfg)
        slurm = InProcessSlurm(5000000, tasks, str(root))
        store = LedgerStore(settings.ledger_path)
        with store:
            ledger = store.load()
            ctx = TickContext(
                settings=settings, store=store, ledger=ledger, runner=slurm, user="bench"
            )  # type: ignore[arg-type]

            def timed(label: str) -> None:
                with ReadCounter() as reads:
                    t = time.perf_counter()
                    report = tick(ctx)
                    took = time.perf_counter() - t
                print(
                    f"  {label:<34} {took:7.3f} s  files read {report.files_read:>6}  "
                    f"log bytes read {report.bytes_read:>9}  read() calls {reads.calls:>6}  "
                    f"classified {len(report.classified):>6}  saved {report.saved}"
                    + (f"  errors {report.errors[:2]}" if report.errors else "")
                )

            print(f"{files} log files ({tasks} array tasks), tree built in {built:.1f} s")
            timed("cold tick (all running)")
            timed("tick, nothing new (all running)")
            done = tasks - max(1, tasks // 100)
            for task in range(done):
                slurm.finish(task, "COMPLETED")
            timed(f"tick, {done} finished")
            # the next ticks' sacct window no longer covers them, as on a real cluster
            for task in range(done):
                slurm.ended_at[task] = datetime.now() - timedelta(days=1)
            timed("tick, nothing new (99% finished)")
            timed("tick, nothing new (again)")
            grow = max(1, tasks // 100)
            for task in range(done, min(tasks, done + grow)):
                path = root / "logs" / f"batch_{task // 1000:03d}" / f"sweep_5000000_{task}.err"
                with open(path, "a") as fh:
                    fh.write(KEY_ERROR)
                slurm.finish(task, "FAILED")
            timed(f"tick, {grow} grew + finished")
            timed("tick, nothing new")
            size = settings.ledger_path.stat().st_size if settings.ledger_path.exists() else 0
            print(f"  ledger size {size / 1e6:.1f} MB; subprocess-equivalent calls {slurm.calls}")
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, action="append", help="log files (repeatable)")
    ap.add_argument("--keep", type=Path, help="build the tree here and keep it")
    args = ap.parse_args()
    for n in args.files or [1000, 10000, 100000]:
        run_size(n, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
