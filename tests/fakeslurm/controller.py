"""Test-side controller for the fake Slurm in this folder.

    fake = FakeSlurm(tmp_path)
    monkeypatch.setenv("PATH", f"{fake.bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKESLURM_STATE", str(fake.state_path))   # or use fake.env()
    job = fake.add_job("exp", array="0-3", work_dir=tmp_path)
    fake.finish(f"{job}_2", "FAILED", err="Traceback ...\\nKeyError: 'x'\\n")

Every job or array task is one dict in the state; keys are Slurm's display ids
("123", "123_4"), and ``"123"`` addresses every task of array 123.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from . import _fakeslurm_core as core

BIN_DIR = Path(__file__).resolve().parent / "bin"

# ExitCode Slurm 22.05 records for each final state (tests/fixtures/slurm).
DEFAULT_EXIT = {
    "COMPLETED": "0:0",
    "FAILED": "1:0",
    "TIMEOUT": "0:0",
    "OUT_OF_MEMORY": "0:125",
    "CANCELLED": "0:0",
    "NODE_FAIL": "0:0",
    "PREEMPTED": "0:0",
    "BOOT_FAIL": "0:0",
    "DEADLINE": "0:0",
}


def _ts(value: datetime | float | None) -> float | None:
    if value is None or isinstance(value, float | int):
        return value
    return value.timestamp()


class FakeSlurm:
    def __init__(
        self,
        tmp_path: Path,
        *,
        user: str | None = None,
        node: str = "fakenode",
        min_job_age: int = 60,
        first_id: int = 1000,
        now: datetime | float | None = None,
    ) -> None:
        self.root = Path(tmp_path) / "fakeslurm"
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_path = self.root / "state.json"
        self.bin_dir = BIN_DIR
        state = core.new_state(user or core.default_user(), node, min_job_age, first_id)
        state["now"] = _ts(now)
        import json

        self.state_path.write_text(json.dumps(state))

    # ------------------------------------------------------------------ plumbing

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["FAKESLURM_STATE"] = str(self.state_path)
        return env

    def install(self, monkeypatch: Any) -> None:
        """Put the fake first on PATH for this test (pytest's monkeypatch)."""
        monkeypatch.setenv("PATH", f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        monkeypatch.setenv("FAKESLURM_STATE", str(self.state_path))

    def command(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _edit(self) -> Any:
        return core.locked_state(self.state_path)

    @property
    def user(self) -> str:
        with self._edit() as s:
            return str(s["user"])

    # ------------------------------------------------------------------ clock

    def set_now(self, now: datetime | float | None) -> None:
        """Freeze the fake's clock (None = wall clock)."""
        with self._edit() as s:
            s["now"] = _ts(now)

    def advance(self, seconds: float) -> None:
        with self._edit() as s:
            s["now"] = core.now_of(s) + seconds

    # ------------------------------------------------------------------ jobs

    def add_job(
        self,
        name: str = "job.sh",
        *,
        array: str | Iterable[int] | None = None,
        state: str = "PENDING",
        exit_code: str | None = None,
        work_dir: str | Path | None = None,
        script: str = "job.sh",
        submit_line: str | None = None,
        comment: str = "",
        user: str | None = None,
        timelimit_min: int | None = None,
        submit: datetime | float | None = None,
        start: datetime | float | None = None,
        end: datetime | float | None = None,
        total_cpu: float = 0.0,
        output: str | None = None,
        error: str | None = None,
    ) -> str:
        """Add a job (or array) as if sbatch had accepted it; returns its (master) id."""
        with self._edit() as s:
            now = core.now_of(s)
            master = str(s["next_id"])
            s["next_id"] += 1
            tasks = (
                core.expand(array)
                if isinstance(array, str)
                else sorted(array)
                if array is not None
                else None
            )
            wd = str(work_dir if work_dir is not None else self.root)
            if submit_line is None:
                parts = ["sbatch"]
                if tasks is not None:
                    parts.append(f"--array={core.compress(tasks)}")
                if comment:
                    parts.append(f"--comment={comment}")
                parts.append(script)
                submit_line = " ".join(parts)
            base = {
                "name": name,
                "user": user or s["user"],
                "state": "PENDING",
                "exit_code": "0:0",
                "submit": _ts(submit) if submit is not None else now,
                "begin": None,
                "start": None,
                "end": None,
                "total_cpu": total_cpu,
                "timelimit_min": timelimit_min,
                "work_dir": wd,
                "submit_line": submit_line,
                "comment": comment,
                "reason": "None",
                "output": output or ("slurm-%A_%a.out" if tasks is not None else "slurm-%j.out"),
                "error": error or "",
                "script": str(Path(wd, script)),
            }
            if tasks is None:
                s["jobs"].append(dict(base, job_id=master, array_job_id=None, array_task=None))
            else:
                for t in tasks:
                    s["jobs"].append(dict(base, job_id=None, array_job_id=master, array_task=t))
            targets = [master] if tasks is None else [f"{master}_{t}" for t in tasks]
        if state != "PENDING" or start is not None or end is not None:
            for key in targets:
                self.set_state(key, state, exit_code=exit_code, start=start, end=end)
        return master

    def _select(self, s: dict[str, Any], job: str) -> list[dict[str, Any]]:
        hits = [j for j in s["jobs"] if core.ids_match(j, {str(job)})]
        if not hits:
            raise KeyError(f"fakeslurm: no job {job}")
        return hits

    def set_state(
        self,
        job: str,
        state: str,
        exit_code: str | None = None,
        *,
        reason: str | None = None,
        total_cpu: float | None = None,
        start: datetime | float | None = None,
        end: datetime | float | None = None,
        cancelled_by: int | None = None,
    ) -> None:
        """Move a job (all tasks of an array, or one ``123_4``) to ``state``."""
        with self._edit() as s:
            now = core.now_of(s)
            for j in self._select(s, job):
                if state != "PENDING" or start is not None:
                    core.split_off(s, j)
                j["state"] = state
                if state != "PENDING" and (j.get("begin") or 0) > now:
                    # a job that ran was eligible: a test that ends it early moves the
                    # --begin time, or sacct's window would hide a finished job
                    j["begin"] = now
                if state == "PENDING":
                    pass
                elif state in core.FINISHED:
                    j["end"] = _ts(end) if end is not None else now
                    if j.get("start") is None and state != "CANCELLED":
                        j["start"] = _ts(start) if start is not None else j["end"]
                    j["exit_code"] = exit_code or DEFAULT_EXIT.get(state, "0:0")
                    if state == "CANCELLED":
                        j["cancelled_by"] = s["uid"] if cancelled_by is None else cancelled_by
                else:
                    if j.get("start") is None:
                        j["start"] = _ts(start) if start is not None else now
                    if exit_code:
                        j["exit_code"] = exit_code
                if start is not None:
                    j["start"] = _ts(start)
                if reason is not None:
                    j["reason"] = reason
                if total_cpu is not None:
                    j["total_cpu"] = total_cpu

    def start(self, job: str) -> None:
        self.set_state(job, "RUNNING")

    def finish(
        self,
        job: str,
        state: str = "COMPLETED",
        exit_code: str | None = None,
        *,
        err: str | None = None,
        out: str | None = None,
        total_cpu: float | None = None,
        end: datetime | float | None = None,
    ) -> list[Path]:
        """End a job; ``err``/``out`` text is written to its log files as Slurm would.

        Returns the log paths written (relative patterns resolve against the WorkDir).
        """
        self.set_state(job, state, exit_code, total_cpu=total_cpu, end=end)
        written: list[Path] = []
        with self._edit() as s:
            for j in self._select(s, job):
                raw = str(j["job_id"])
                out_path = Path(j["work_dir"], core.expand_log_name(j["output"], j, raw))
                err_path = (
                    Path(j["work_dir"], core.expand_log_name(j["error"], j, raw))
                    if j.get("error")
                    else out_path
                )
                for path, text in ((out_path, out), (err_path, err)):
                    if text is None:
                        continue
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with open(path, "a", encoding="utf-8") as fh:
                        fh.write(text)
                    if path not in written:
                        written.append(path)
        return written

    def jobs(self) -> list[dict[str, Any]]:
        """Every job/task dict, with ``key`` (display id) and ``raw_id`` added."""
        with self._edit() as s:
            result = []
            for j in s["jobs"]:
                item = dict(j)
                item["key"] = core.display_id(j)
                item["raw_id"] = j["job_id"] if j["job_id"] is not None else j["array_job_id"]
                result.append(item)
            return result

    def job(self, key: str) -> dict[str, Any]:
        for j in self.jobs():
            if j["key"] == key:
                return j
        raise KeyError(f"fakeslurm: no job {key}")

    def submissions(self) -> list[dict[str, Any]]:
        """Every sbatch call, in order: ``{"argv", "cwd", "job_id", "rc"}``."""
        with self._edit() as s:
            return [dict(x) for x in s["submissions"]]

    def calls(self, cmd: str | None = None) -> list[list[str]]:
        """argv (without the program) of every invocation, optionally of one command."""
        with self._edit() as s:
            return [c["argv"] for c in s["calls"] if cmd is None or c["cmd"] == cmd]

    def submit_line_argv(self, key: str) -> list[str]:
        return shlex.split(self.job(key)["submit_line"])

    # ------------------------------------------------------------------ faults

    def _fault(self, cmd: str, fault: dict[str, Any]) -> None:
        with self._edit() as s:
            s["faults"].setdefault(cmd, []).append(fault)

    def fail_next(self, cmd: str, rc: int = 1, stderr: str = "", *, times: int | None = 1) -> None:
        """The next ``times`` calls (None = all) exit ``rc`` printing ``stderr``."""
        if stderr and not stderr.endswith("\n"):
            stderr += "\n"
        self._fault(cmd, {"kind": "fail", "rc": rc, "stderr": stderr, "times": times})

    def hang(self, cmd: str, seconds: float, *, times: int | None = 1) -> None:
        """The next calls sleep ``seconds`` before answering (a slurmctld that stalls)."""
        self._fault(cmd, {"kind": "hang", "seconds": seconds, "times": times})

    def garbage(self, cmd: str, text: str, *, times: int | None = 1) -> None:
        """The next calls print ``text`` with rc=0 instead of real output."""
        self._fault(cmd, {"kind": "garbage", "text": text, "times": times})

    def sbatch_hang_after_submit(self, seconds: float, *, times: int | None = 1) -> None:
        """sbatch records the job, then hangs past the caller's timeout before printing."""
        self._fault("sbatch", {"kind": "hang_after_submit", "seconds": seconds, "times": times})

    def clear_faults(self, cmd: str | None = None) -> None:
        with self._edit() as s:
            if cmd is None:
                s["faults"] = {}
            else:
                s["faults"].pop(cmd, None)

    def placeholder_rows(self, job: str, on: bool = True) -> None:
        """22.05: a just-finished short job shows JobName ``allocation`` and empty
        WorkDir/SubmitLine until slurmdbd catches up. Turn that on/off for ``job``."""
        with self._edit() as s:
            for j in self._select(s, job):
                j["placeholder"] = on

    def reject_fields(self, *names: str) -> None:
        """Make sacct reject these --format fields (an older Slurm), rc=1 like the real one."""
        with self._edit() as s:
            s["rejected_fields"] = list(names)
