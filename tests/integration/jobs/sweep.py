#!/usr/bin/env python3
"""An LLM-API experiment sweep task, as run by `sbatch --array`.

Each array index plays one realistic ending, written the way the real client
libraries write it (exception classes carry the real module names, so the
tracebacks read exactly like anthropic/openai/httpx ones):
  1 rate limit (anthropic.RateLimitError after the client's own retries)
  2 network (httpx.ConnectError wrapped in openai.APIConnectionError)
  3 code error (KeyError in the experiment code)
  4 success (a 429 the client recovered from, then the seed success marker)
  5 still running (sleeps until cancelled)
"""

from __future__ import annotations

import json
import os
import sys
import time


def _exc(module: str, name: str, base: type[Exception] = Exception) -> type[Exception]:
    cls = type(name, (base,), {})
    cls.__module__ = module
    return cls


RateLimitError = _exc("anthropic", "RateLimitError")
ConnectError = _exc("httpx", "ConnectError")
APIConnectionError = _exc("openai", "APIConnectionError")

TASK = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def call_anthropic() -> None:
    for delay in (0.4, 0.8):
        log(
            "INFO:httpx:HTTP Request: POST https://api.anthropic.com/v1/messages "
            '"HTTP/1.1 429 Too Many Requests"'
        )
        log(f"INFO:anthropic._base_client:Retrying request to /v1/messages in {delay} seconds")
    body = {
        "type": "error",
        "error": {
            "type": "rate_limit_error",
            "message": "This request would exceed the rate limit for your organization of "
            "50 output tokens per minute. For details, refer to: "
            "https://docs.claude.com/en/api/rate-limits.",
        },
    }
    raise RateLimitError(f"Error code: 429 - {body}")


def connect() -> None:
    raise ConnectError("[Errno 111] Connection refused")


def call_openai() -> None:
    log("INFO:openai._base_client:Retrying request to /chat/completions in 0.9 seconds")
    try:
        connect()
    except Exception as e:
        raise APIConnectionError("Connection error.") from e


def load_results(config: dict[str, object]) -> object:
    return config["reasoning_token_budget_v2"]


def main() -> int:
    print(f"task {TASK} on {os.uname().nodename}: starting experiment", flush=True)
    config = {"reasoning_model": "claude-x", "reasoning_token_budget": 4096}
    if TASK == 1:
        call_anthropic()
    elif TASK == 2:
        call_openai()
    elif TASK == 3:
        load_results(config)
    elif TASK == 4:
        log(
            "INFO:httpx:HTTP Request: POST https://api.anthropic.com/v1/messages "
            '"HTTP/1.1 429 Too Many Requests"'
        )
        log("INFO:anthropic._base_client:Retrying request to /v1/messages in 0.5 seconds")
        log('INFO:httpx:HTTP Request: POST https://api.anthropic.com/v1/messages "HTTP/1.1 200 OK"')
        print(json.dumps({"round": 1, "agreement": 0.5}), flush=True)
        print("✅ Experiment results saved to results/run_0004.json", flush=True)
    else:
        for i in range(3600):
            print(f"round {i}: waiting for model", flush=True)
            time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
