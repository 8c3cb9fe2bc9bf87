"""Named crash points for fault-injection tests.

``SLURM_TRIAGE_CRASH_AT=name[,name…]`` makes the process SIGKILL itself when it reaches
that point, exactly like a power cut or ``kill -9``: no cleanup, no finally blocks.
``SLURM_TRIAGE_CRASH_AFTER=N`` skips the first N hits. Unset in normal use (one dict
lookup per point).
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    wanted = os.environ.get("SLURM_TRIAGE_CRASH_AT")
    if not wanted or name not in wanted.split(","):
        return
    _hits[name] = _hits.get(name, 0) + 1
    skip = int(os.environ.get("SLURM_TRIAGE_CRASH_AFTER", "0") or 0)
    if _hits[name] > skip:
        os.kill(os.getpid(), signal.SIGKILL)
