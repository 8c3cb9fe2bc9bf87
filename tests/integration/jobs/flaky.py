#!/usr/bin/env python3
"""A sweep task that fails transiently on its first run and succeeds when re-run.

Array index 1 hits an API rate limit, 2 a connection error, 3 a code bug (fails
every time). Attempts are counted in files under the job's working directory,
so a resubmission by slurm-triage finds the API "recovered".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _exc(module: str, name: str) -> type[Exception]:
    cls = type(name, (Exception,), {})
    cls.__module__ = module
    return cls


RateLimitError = _exc("anthropic", "RateLimitError")
APIConnectionError = _exc("openai", "APIConnectionError")


def main() -> int:
    task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    marker = Path.cwd() / ".attempts" / f"task_{task}"
    marker.parent.mkdir(exist_ok=True)
    attempt = len(marker.read_text().splitlines()) + 1 if marker.exists() else 1
    with marker.open("a") as fh:
        fh.write(f"{os.environ.get('SLURM_JOB_ID', '?')}\n")
    print(f"task {task} attempt {attempt}", flush=True)
    if task == 3:
        config: dict[str, int] = {}
        print(config["competition_level"])
    if attempt == 1 and task == 1:
        body = {"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limited"}}
        raise RateLimitError(f"Error code: 429 - {body}")
    if attempt == 1 and task == 2:
        raise APIConnectionError("Connection error.")
    print(f"✅ Experiment results saved to results/task_{task}.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
