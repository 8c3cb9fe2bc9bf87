"""Time the classifier's scanner against ``grep -E -c`` with the seed's patterns.

    python bench/bench_classify.py [--mb 300] [--dir /tmp/bench-classify]

Writes a realistic log (INFO access lines, progress bars, model chatter, numbers that look
like status codes) of the given size plus a file of the same size with no newline at all,
then reports wall time for grep and for ``scan_path`` and the scanner's peak RSS.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

SEED_PATTERN = (
    "429|rate.?limit|RateLimitError|TooManyRequests|overloaded_error|DUE TO TIME LIMIT"
    "|CANCELLED.*TIME|TIMEOUT|CUDA.*OOM|OutOfMemory|out of memory|CUDA_ERROR|502|503"
    "|Connection refused|ConnectionError|Network.*error|InsufficientFunds|quota exceeded"
    "|Failed to parse|JSONDecodeError|empty content string|Model returned empty"
    "|CONSENSUS REACHED|results saved"
)

LINES = [
    'INFO:httpx:HTTP Request: POST https://api.anthropic.com/v1/messages "HTTP/1.1 200 OK"\n',
    "Round {i}: reasoning model thinking with budget 4096 tokens (config_{i:04d})\n",
    'Agent A: I propose {{"apple": 3, "banana": 2}} because my valuation is higher.\n',
    "Epoch 1:  45%|####5     | {i}/1000 [01:23<01:40,  5.43it/s, loss=0.{i}]\n",
    "2026-01-25 14:02:{s:02d},202 - __main__ - INFO - step {i} reward=0.{i} tokens={i}\n",
    '{{"round": {i}, "accepted": false, "reasoning": "The other agent values the book."}}\n',
    "Loaded weights from /scratch/u/models/llama-3-8b/model-0000{s}.safetensors\n",
]
TAIL = (
    "Traceback (most recent call last):\n"
    '  File "run.py", line 1, in <module>\n'
    "anthropic.RateLimitError: Error code: 429\n"
)


def make_log(path: Path, size: int) -> None:
    rng = random.Random(1)
    with path.open("w") as fh:
        written = 0
        while written < size:
            line = rng.choice(LINES).format(i=rng.randint(0, 99999), s=rng.randint(0, 59))
            fh.write(line)
            written += len(line)
        fh.write(TAIL)


def make_flat(path: Path, size: int) -> None:
    block = b"x" * (1 << 20)
    with path.open("wb") as fh:
        for _ in range(size >> 20):
            fh.write(block)


def timed(argv: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False)
    return time.perf_counter() - t0, out.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=300)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench-classify"))
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    log, flat = args.dir / "big.err", args.dir / "flat.err"
    size = args.mb << 20
    if not log.exists() or log.stat().st_size < size:
        make_log(log, size)
    if not flat.exists() or flat.stat().st_size < size:
        make_flat(flat, size)
    for path in (log, flat):
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=False, timeout=600)
        g, _ = timed(["grep", "-E", "-c", SEED_PATTERN, str(path)])
        gi, _ = timed(["grep", "-E", "-i", "-c", SEED_PATTERN, str(path)])
        code = (
            "import resource,sys,time;from daemon.classify import build_table,scan_path,decide;"
            "from daemon.settings import ClassifySettings;s=ClassifySettings();t=build_table(s);"
            "t0=time.perf_counter();f,_,_=scan_path(sys.argv[1],t);dt=time.perf_counter()-t0;"
            "v=decide([f],None,s);"
            "print(f'{dt:.2f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss//1024} '"
            "f'{v.outcome.value}/{v.error_type}')"
        )
        _, out = timed([sys.executable, "-c", code, str(path)])
        scan_s, rss_mb, verdict = out.split()
        print(
            f"{path.name}: {path.stat().st_size / 2**20:.0f} MiB  grep -E -c {g:.2f}s  "
            f"grep -E -i -c {gi:.2f}s  scanner {scan_s}s  peak RSS {rss_mb} MiB  {verdict}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
