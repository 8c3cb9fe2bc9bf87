"""A runner for unit tests that replays canned replies (e.g. tests/fixtures/slurm/*.txt).

It raises exactly what ``daemon.slurm.SlurmRunner`` raises for the same situation, so code
under test cannot tell them apart: non-zero rc -> SlurmCommandFailed (first stderr line),
``timeout=True`` -> SlurmTimeout, ``missing=True`` -> SlurmCommandMissing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import SlurmCommandMissing, SlurmError, SlurmTimeout
from daemon.slurm import CommandOutput, SlurmCommandFailed

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "slurm"


@dataclass(frozen=True)
class Reply:
    stdout: str = ""
    stderr: str = ""
    rc: int = 0
    timeout: bool = False
    missing: bool = False

    @classmethod
    def from_fixture(cls, name: str, *, rc: int = 0) -> Reply:
        text = (FIXTURES / name).read_text(encoding="utf-8")
        return cls(stderr=text, rc=rc) if rc else cls(stdout=text)


class ReplayRunner:
    """Replies per command name (basename of argv[0]), consumed in order."""

    def __init__(self, replies: Mapping[str, Sequence[Reply]]) -> None:
        self._replies = {name: list(items) for name, items in replies.items()}
        self.calls: list[list[str]] = []
        self.cwds: list[str | None] = []

    def add(self, cmd: str, reply: Reply) -> None:
        self._replies.setdefault(cmd, []).append(reply)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CommandOutput:
        name = os.path.basename(argv[0])
        self.calls.append(list(argv))
        self.cwds.append(str(cwd) if cwd is not None else None)
        queue = self._replies.get(name)
        if not queue:
            raise SlurmError(f"ReplayRunner: no reply left for {name}")
        reply = queue.pop(0)
        if reply.missing:
            raise SlurmCommandMissing(f"{name} not found on PATH")
        if reply.timeout:
            raise SlurmTimeout(f"{name} timed out after {timeout:g} s")
        if reply.rc != 0:
            detail = next((ln.strip() for ln in reply.stderr.splitlines() if ln.strip()), "")
            raise SlurmCommandFailed(
                f"{name} failed (rc={reply.rc}): {detail or 'no error message'}",
                argv=argv,
                rc=reply.rc,
                stderr=reply.stderr,
            )
        return CommandOutput(0, reply.stdout, reply.stderr, 0.0)
