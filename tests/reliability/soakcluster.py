"""An in-process Slurm for long soak runs: the fake Slurm's own row formatting
(tests/fakeslurm/_fakeslurm_core.py, checked against real 22.05 output) over an in-memory
job table, without a subprocess or a JSON state file per call, so tens of thousands of
jobs and hundreds of ticks stay cheap. It is a ``daemon.slurm.Runner``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.slurm import CommandOutput
from tests.fakeslurm import _fakeslurm_core as core


def _opt(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


class SoakCluster:
    def __init__(self, *, user: str, now: datetime, seed: int = 7) -> None:
        self.state: dict[str, Any] = core.new_state(user, "node1", 300, 100_000)
        self.state["now"] = now.timestamp()
        self.rng = random.Random(seed)
        self.calls = 0

    # ------------------------------------------------------------------ the cluster

    def set_now(self, now: datetime) -> None:
        self.state["now"] = now.timestamp()

    def submit_array(self, name: str, tasks: int, work_dir: Path) -> str:
        s = self.state
        master = str(s["next_id"])
        s["next_id"] += 1
        now = core.now_of(s)
        for t in range(tasks):
            s["jobs"].append(
                {
                    "name": name,
                    "user": s["user"],
                    "state": "PENDING",
                    "exit_code": "0:0",
                    "submit": now,
                    "begin": None,
                    "start": None,
                    "end": None,
                    "total_cpu": 0.0,
                    "timelimit_min": 60,
                    "work_dir": str(work_dir),
                    "submit_line": f"sbatch --array=0-{tasks - 1} run.sh",
                    "comment": "",
                    "reason": "None",
                    "job_id": None,
                    "array_job_id": master,
                    "array_task": t,
                }
            )
        return master

    def churn(self, finish: int, start: int) -> list[dict[str, Any]]:
        """Start some pending tasks, finish some running ones; returns the finished."""
        s = self.state
        now = core.now_of(s)
        running = [j for j in s["jobs"] if j["state"] == "RUNNING"]
        pending = [j for j in s["jobs"] if j["state"] == "PENDING"]
        done = self.rng.sample(running, min(finish, len(running)))
        for j in done:
            j["state"] = self.rng.choice(["COMPLETED", "COMPLETED", "FAILED", "TIMEOUT"])
            j["exit_code"] = core_exit(j["state"])
            j["end"] = now
        for j in pending[:start]:
            # what core.split_off does, without its scan of every job (O(n) per task)
            j["job_id"] = str(s["next_id"])
            s["next_id"] += 1
            j["state"] = "RUNNING"
            j["start"] = now
        return done

    def forget_older_than(self, seconds: float) -> None:
        """slurmdbd keeps everything, but sacct -S never asks for it again: drop it here."""
        cutoff = core.now_of(self.state) - seconds
        self.state["jobs"] = [
            j for j in self.state["jobs"] if j.get("end") is None or j["end"] >= cutoff
        ]

    def active(self) -> int:
        return sum(1 for j in self.state["jobs"] if j["state"] in ("PENDING", "RUNNING"))

    # ------------------------------------------------------------------ the Runner protocol

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CommandOutput:
        self.calls += 1
        name = os.path.basename(argv[0])
        if name == "sacct":
            return CommandOutput(0, self._sacct(argv), "", 0.0)
        if name == "squeue":
            return CommandOutput(0, self._squeue(argv), "", 0.0)
        raise AssertionError(f"soak: unexpected command {argv}")

    def _sacct(self, argv: Sequence[str]) -> str:
        s = self.state
        fields = (_opt(argv, "--format") or "").split(",")
        delim = _opt(argv, "--delimiter") or "|"
        now = core.now_of(s)
        start_text = _opt(argv, "-S")
        start = core.parse_when(start_text, now) if start_text else 0.0
        rows = core.visible_sacct_jobs(s, set(), {s["user"]}, start, now, False)
        return "".join(
            delim.join(core.sacct_value(job, f, s, raw) for f in fields) + "\n" for job, raw in rows
        )

    def _squeue(self, argv: Sequence[str]) -> str:
        s = self.state
        fmt = _opt(argv, "--format") or "%i"
        parts = core.squeue_fields(fmt)
        wanted = set((_opt(argv, "--states") or "").split(","))
        out = []
        for job in s["jobs"]:
            if job["state"] not in wanted:
                continue
            out.append(
                "".join(lit + core.squeue_value(job, letter, s, None) for lit, letter in parts)
                + "\n"
            )
        return "".join(out)


def core_exit(state: str) -> str:
    return {"COMPLETED": "0:0", "FAILED": "1:0", "TIMEOUT": "0:0"}[state]
