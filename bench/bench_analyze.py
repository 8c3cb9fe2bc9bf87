"""Benchmark: ``slurm-triage analyze --offline`` against ``grep -E -i -c`` with the seed's patterns.

Generates a large, realistic log tree in a temporary folder (thousands of array tasks with
``.err``/``.out`` pairs, a few files of hundreds of MB, optionally one of 1 GB), then runs

- ``grep -E -i -c -r --include=*.err <seed patterns> TREE`` (the manual workflow's scan)
- ``slurm-triage analyze TREE --offline --csv …``

and prints wall time and peak memory of each. Peak memory is sampled from /proc as the
sum of the RSS of the command and all its descendants (worker processes included), and
also read from ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (largest single process).

    python bench/bench_analyze.py                 # ~3000 tasks + 2 x 200 MB files
    python bench/bench_analyze.py --gb            # adds one 1 GB log
    python bench/bench_analyze.py --tasks 10000 --big 0 --keep /tmp/tree
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

# The seed's table (analyze-cluster-failures.md, "Scan for Failures"), all types at once.
SEED_PATTERNS = "|".join(
    [
        r"429",
        r"rate.?limit",
        r"RateLimitError",
        r"TooManyRequests",
        r"overloaded_error",
        r"CUDA",
        r"OOM",
        r"OutOfMemory",
        r"out of memory",
        r"CUDA_ERROR",
        r"DUE TO TIME LIMIT",
        r"CANCELLED",
        r"TIMEOUT",
        r"502",
        r"503",
        r"Connection refused",
        r"ConnectionError",
        r"Network.*error",
        r"InsufficientFunds",
        r"quota exceeded",
        r"credit",
        r"Failed to parse",
        r"JSONDecodeError",
    ]
)

HEAD = (
    "{ts} INFO __main__: Starting experiment ttc_scaling task {task} (SLURM_JOB_ID={raw})\n"
    "{ts} INFO __main__: host=della-r1c2n3 CUDA_VISIBLE_DEVICES=0 HTTPX_TIMEOUT=600\n"
    "wandb: Tracking run with wandb version 0.19.1\n"
)
OK_LINE = (
    '{ts} INFO httpx: HTTP Request: POST https://api.anthropic.com/v1/messages "HTTP/1.1 200 OK"\n'
)
RETRY = (
    "{ts} INFO httpx: HTTP Request: POST https://api.anthropic.com/v1/messages "
    '"HTTP/1.1 429 Too Many Requests"\n'
    "{ts} INFO anthropic._base_client: Retrying request to /v1/messages in 2.100000 seconds\n"
)
PROGRESS = "Round {r}/5:  40%|████      | 2/5 [01:22<02:03, 41.2s/it] input_tokens={tok}\n"
ENDINGS = [
    "✅ CONSENSUS REACHED after 3 rounds\n✅ Experiment results saved to out/task.json\n",
    "✅ Experiment results saved to out/task.json\n",
    "Traceback (most recent call last):\n"
    '  File "/home/u/ttc/models.py", line 54, in ask\n'
    "    resp = client.messages.create(**kwargs)\n"
    "anthropic.RateLimitError: Error code: 429 - {'type': 'error', 'error': "
    "{'type': 'rate_limit_error', 'message': 'rate limit exceeded'}}\n",
    "slurmstepd: error: *** JOB {raw} ON della-r1c2n3 CANCELLED AT 2026-01-25T16:01:32 "
    "DUE TO TIME LIMIT ***\n",
    "Traceback (most recent call last):\n"
    '  File "/home/u/ttc/run.py", line 41, in run\n'
    "    budget = cfg['reasoning_token_budget']\n"
    "KeyError: 'reasoning_token_budget'\n",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.\n",
]


def _body(rng: random.Random, raw: int, task: int, lines: int) -> str:
    ts = "2026-01-25 14:02:11,301"
    parts = [HEAD.format(ts=ts, task=task, raw=raw)]
    for i in range(lines):
        roll = rng.random()
        if roll < 0.05:
            parts.append(RETRY.format(ts=ts))
        elif roll < 0.5:
            parts.append(PROGRESS.format(r=1 + i % 5, tok=4290 + i))
        else:
            parts.append(OK_LINE.format(ts=ts))
    return "".join(parts)


def generate(root: Path, tasks: int, big: int, big_mb: int, gb: bool, seed: int = 7) -> int:
    """Write the tree; returns its size in bytes."""
    rng = random.Random(seed)
    logs = root / "logs"
    total = 0
    per_dir = 1000
    for task in range(tasks):
        job = 4150000 + (task // 500) * 1000
        raw = job + 1 + task
        sub = logs / f"batch_{task // per_dir:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        stem = sub / f"ttc_claude_{job}_{task % 500}"
        err = _body(rng, raw, task, rng.randint(50, 400)) + rng.choice(ENDINGS).replace(
            "{raw}", str(raw)
        )
        out = PROGRESS.format(r=1, tok=4290) * rng.randint(5, 40)
        stem.with_suffix(".err").write_text(err)
        stem.with_suffix(".out").write_text(out)
        total += len(err.encode()) + len(out.encode())
    sizes = [big_mb << 20] * big + ([1 << 30] if gb else [])
    for n, size in enumerate(sizes):
        path = logs / "huge" / f"ttc_big_{4190000 + n}_0.err"
        path.parent.mkdir(parents=True, exist_ok=True)
        block = _body(rng, 4190000 + n, 0, 2000).encode()
        with open(path, "wb") as fh:
            written = 0
            while written < size:
                fh.write(block)
                written += len(block)
            fh.write(ENDINGS[2].encode())
        total += path.stat().st_size
    return total


def _tree_rss_kb(pid: int) -> int:
    """Proportional set size of pid and all its descendants, from /proc (kB)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    total = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            # PSS, not RSS: forked workers share the parent's pages, which RSS counts twice.
            with open(f"/proc/{p}/smaps_rollup", "rb") as fh:
                for line in fh:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
        stack.extend(children.get(p, []))
    return total


def measure(argv: list[str]) -> tuple[float, float, int, int, int]:
    """(seconds, CPU seconds, peak tree RSS kB, largest single-process max RSS kB, rc)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    # Not DEVNULL: GNU grep stops at the first match when its output is /dev/null.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_kb(proc.pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _out, err = proc.communicate(timeout=3600)
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 1):  # grep -c exits 1 when a file has no match
        sys.stderr.write(err.decode(errors="replace")[-2000:])
    # user+system time of the command and every descendant it waited for (analyze's
    # workers and the grep/wc they run): wall time alone hides that analyze uses 2 cores.
    cpu = usage.ru_utime + usage.ru_stime - cpu_before
    # ru_maxrss of children is a running maximum: meaningful when runs grow in size.
    return elapsed, cpu, peak, usage.ru_maxrss, proc.returncode


def _triage_command() -> list[str]:
    """The console script installed for the interpreter running the bench, as pip puts it
    next to that interpreter; ``PATH`` may find a version manager's wrapper first (pyenv's
    shim is a bash script that costs ~0.1 s of its own per run), which is not the tool."""
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "slurm-triage", Path(sys.executable).parent / "slurm-triage"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    exe = shutil.which("slurm-triage")
    return [exe] if exe else [sys.executable, "-m", "daemon"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--big", type=int, default=2, help="number of big files")
    ap.add_argument("--big-mb", type=int, default=200)
    ap.add_argument("--gb", action="store_true", help="add one 1 GB log file")
    ap.add_argument("--keep", type=Path, help="generate into this folder and keep it")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    tmp = args.keep or Path(tempfile.mkdtemp(prefix="slurm-triage-bench-"))
    try:
        if not (tmp / "logs").exists():
            t0 = time.perf_counter()
            size = generate(tmp, args.tasks, args.big, args.big_mb, args.gb)
            print(
                f"generated {args.tasks} tasks, {size / 2**20:.0f} MiB in "
                f"{time.perf_counter() - t0:.1f} s under {tmp}"
            )
        grep = shutil.which("grep") or "grep"
        triage = _triage_command()
        grep_argv = [grep, "-E", "-c", "-r", "--include=*.err", SEED_PATTERNS, str(tmp / "logs")]
        runs = {
            # the command, and the case-insensitive one a user would run (the seed's
            # "rate.?limit", "credit" and "quota exceeded" are written in lower case)
            "grep -E -c (seed patterns)": grep_argv,
            "grep -E -i -c (seed patterns)": [*grep_argv[:2], "-i", *grep_argv[2:]],
            "slurm-triage analyze --offline": [
                *triage,
                "analyze",
                str(tmp / "logs"),
                "--offline",
                "--csv",
                str(tmp / "f.csv"),
            ],
        }
        # One untimed pass so all read from a warm page cache.
        measure(runs["grep -E -c (seed patterns)"])
        if sys.flags.dont_write_bytecode or os.environ.get("PYTHONDONTWRITEBYTECODE"):
            # An installed package has its bytecode; with PYTHONDONTWRITEBYTECODE set (as in
            # some sandboxes) an editable install would compile every module on every run.
            import compileall

            compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "daemon"), quiet=1)
            print("compiled daemon/ bytecode (PYTHONDONTWRITEBYTECODE is set here)")
        print(f"analyze runs as: {' '.join(triage)}")
        print(
            f"{'command':<34}{'wall s':>9}{'cpu s':>8}{'peak PSS (tree) MB':>21}"
            f"{'max RSS/proc MB':>18}"
        )
        for name, argv in runs.items():
            for _ in range(args.repeat):
                secs, cpu, peak_kb, max_kb, rc = measure(argv)
                print(
                    f"{name:<34}{secs:>9.2f}{cpu:>8.2f}{peak_kb / 1024:>21.1f}"
                    f"{max_kb / 1024:>18.1f}" + ("" if rc in (0, 1) else f"  rc={rc}")
                )
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
