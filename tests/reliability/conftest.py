"""Shared set-up for the reliability suite: a fake cluster, a Slack stand-in, a daemon.

The daemon runs exactly as a user runs it (``python -m daemon run --once``) when a test
needs to kill it; restarts run in-process through ``cli.main`` (same code path, no
interpreter start-up) to keep the suite fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon import service
from daemon.cli import main
from daemon.ledger import Ledger, read_ledger
from tests.fakeslurm.controller import FakeSlurm
from tests.slackstub import TOKEN, SlackStub

_ORIGINAL_MAKE_CONTEXT = service._make_context


def shift_daemon_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make ``run --once`` in this process tick with a clock ``seconds`` ahead of the wall."""

    def make(settings: Any, store: Any, ledger: Any) -> service.TickContext:
        ctx = _ORIGINAL_MAKE_CONTEXT(settings, store, ledger)
        ctx.clock = lambda: service.utcnow() + timedelta(seconds=seconds)
        return ctx

    monkeypatch.setattr(service, "_make_context", make)


def pin_daemon_clock(monkeypatch: pytest.MonkeyPatch, when: datetime) -> None:
    """Make ``run --once`` in this process tick at ``when``, every time."""

    def make(settings: Any, store: Any, ledger: Any) -> service.TickContext:
        ctx = _ORIGINAL_MAKE_CONTEXT(settings, store, ledger)
        ctx.clock = lambda: when
        return ctx

    monkeypatch.setattr(service, "_make_context", make)


REPO = Path(__file__).resolve().parents[2]

RATE_LIMIT_TB = """\
Traceback (most recent call last):
  File "/home/u/exp/run.py", line 88, in <module>
    main()
anthropic.RateLimitError: Error code: 429 - {'type': 'error', 'error': {'type': 'rate_limit_error'}}
"""
NETWORK_TB = """\
Traceback (most recent call last):
  File "/home/u/exp/run.py", line 88, in <module>
    main()
httpx.ConnectError: [Errno 111] Connection refused
"""
KEY_ERROR_TB = """\
Traceback (most recent call last):
  File "/home/u/exp/run.py", line 12, in <module>
    budget = cfg["reasoning_budget"]
KeyError: 'reasoning_budget'
"""
SUCCESS_OUT = "step 1\n✅ Experiment results saved\n"


@dataclass
class Rig:
    """One user's world: logs, state, a settings file, the fake cluster, maybe Slack."""

    tmp: Path
    logs: Path
    work: Path
    state: Path
    config: Path
    fake: FakeSlurm
    stub: SlackStub | None

    @property
    def ledger_path(self) -> Path:
        return self.state / "ledger.json"

    def ledger(self) -> Ledger:
        return read_ledger(self.ledger_path)

    def once(self, monkeypatch: pytest.MonkeyPatch | None = None, later_s: float = 0.0) -> int:
        """One tick in-process (the fake is on PATH through monkeypatch).

        ``later_s`` runs the tick as if the wall clock were that much ahead (the daemon's
        injectable clock), e.g. to pass a grace period without waiting for it.
        """
        if later_s:
            assert monkeypatch is not None
            shift_daemon_clock(monkeypatch, later_s)
        try:
            return main(["run", "--once", "--config", str(self.config)])
        finally:
            if later_s and monkeypatch is not None:
                monkeypatch.setattr(service, "_make_context", _ORIGINAL_MAKE_CONTEXT)

    def once_subprocess(
        self, crash: str | None = None, after: int = 0, timeout: float = 90
    ) -> subprocess.CompletedProcess[str]:
        env = self.fake.env()
        for name in ("SLURM_TRIAGE_CRASH_AT", "SLURM_TRIAGE_CRASH_AFTER"):
            env.pop(name, None)
        if crash:
            env["SLURM_TRIAGE_CRASH_AT"] = crash
            env["SLURM_TRIAGE_CRASH_AFTER"] = str(after)
        return subprocess.run(
            [sys.executable, "-m", "daemon", "run", "--once", "--config", str(self.config)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def once_forked(self, crash: str, after: int = 0) -> int:
        """One tick in a forked child that kills itself at ``crash``; returns its wait status
        as subprocess does (``-9`` for SIGKILL).

        A fork is a real separate process (the kill loses everything not on disk) without
        the interpreter start-up a fresh ``python -m daemon`` pays, which keeps the crash
        matrix fast; ``once_subprocess`` covers the real command line.
        """
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 70
            try:
                os.environ["SLURM_TRIAGE_CRASH_AT"] = crash
                os.environ["SLURM_TRIAGE_CRASH_AFTER"] = str(after)
                code = main(["run", "--once", "--config", str(self.config)])
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            return -os.WTERMSIG(status)
        return os.WEXITSTATUS(status)

    def array(self, tasks: str = "0-3", name: str = "ttc_claude") -> str:
        return self.fake.add_job(
            name,
            array=tasks,
            work_dir=self.work,
            script="run.sh",
            output=f"{self.logs}/{name}_%A_%a.out",
            error=f"{self.logs}/{name}_%A_%a.err",
        )


def write_config(
    path: Path,
    *,
    state: Path,
    logs: Path,
    stub: SlackStub | None = None,
    slack_mode: str = "bot",
    resubmit: bool = True,
    slurm_timeout_s: float = 5.0,
    extra: str = "",
) -> None:
    slack = ""
    if stub is not None and slack_mode == "bot":
        slack = f"""
[slack]
mode = "bot"
bot_token = "{TOKEN}"
channel = "C0ALERTS"
base_url = "{stub.base_url}"
min_interval_s = 0.0
send_budget_s = 10.0
timeout_s = 3.0
"""
    elif stub is not None and slack_mode == "webhook":
        slack = f"""
[slack]
mode = "webhook"
webhook_url = "{stub.webhook_url}"
min_interval_s = 0.0
send_budget_s = 10.0
timeout_s = 3.0
"""
    path.write_text(
        f"""
state_dir = "{state}"
[watch]
log_dirs = ["{logs}"]
interval_s = 1
jitter_s = 0
[slurm]
timeout_s = {slurm_timeout_s}
sbatch_timeout_s = {max(slurm_timeout_s, 3.0)}
[resubmit]
enabled = {"true" if resubmit else "false"}
jitter_fraction = 0.0
[logging]
level = "WARNING"
{slack}
{extra}
"""
    )


def make_rig(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stub: SlackStub | None,
    **config: Any,
) -> Rig:
    fake = FakeSlurm(tmp_path)
    fake.install(monkeypatch)
    logs = tmp_path / "logs"
    logs.mkdir()
    work = tmp_path / "exp"
    work.mkdir()
    (work / "run.sh").write_text("#!/bin/bash\npython run.py\n")
    state = tmp_path / "state"
    cfg = tmp_path / "settings.toml"
    write_config(cfg, state=state, logs=logs, stub=stub, **config)
    return Rig(tmp_path, logs, work, state, cfg, fake, stub)


@pytest.fixture
def stub() -> Iterator[SlackStub]:
    s = SlackStub().start()
    try:
        yield s
    finally:
        s.stop()


def reported_keys(rig: Rig) -> Counter[str]:
    """How many delivered Slack messages reported each task key.

    Each post carries its outbox ``dedup_key`` in Slack metadata (bot mode); the ledger's
    outbox says which task keys that message reported (a merged digest lists them all).
    """
    assert rig.stub is not None
    outbox = {m.dedup_key: m for m in rig.ledger().outbox}
    counts: Counter[str] = Counter()
    for key in rig.stub.dedup_keys():
        msg = outbox.get(key)
        assert msg is not None, f"posted {key!r} is not in the outbox"
        if msg.kind == "digest":
            counts.update(msg.job_keys)
    return counts


def posted_digest_texts(stub: SlackStub) -> list[str]:
    texts = []
    for p in stub.posted:
        body = [p.text]
        for block in p.blocks:
            text = block.get("text")
            if isinstance(text, dict):
                body.append(str(text.get("text", "")))
        texts.append("\n".join(body))
    return texts


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else default
