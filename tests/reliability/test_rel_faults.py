"""What the node and the network do to a long-running daemon: Slack down for hours,
Slurm commands missing, hanging, failing or printing garbage, the ledger's disk full or
read-only, and the clock jumping. Each test checks what the user would check: every
failure reported once, nothing resubmitted twice, the ledger intact, a clear error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from daemon import service
from daemon.ledger import LedgerStore
from daemon.settings import load_settings
from daemon.slurm import SACCT_FIELDS, SlurmRunner, current_user, sacct_argv
from tests.reliability.conftest import (
    KEY_ERROR_TB,
    NETWORK_TB,
    RATE_LIMIT_TB,
    Rig,
    make_rig,
    pin_daemon_clock,
    reported_keys,
)
from tests.slackstub import SlackStub


class Clock:
    """Time for one test. ``move`` is time passing: the daemon's clock (TickContext.clock)
    and the fake Slurm's (job ends, ``sacct -S``) advance together. ``jump`` moves only
    the daemon's: the login node's clock jumps, the controller's does not."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        # a whole second after jobs the test added on the wall clock: sacct shows a job
        # only once it was submitted
        self.slurm_now = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=1)
        self.skew = timedelta(0)
        rig.fake.set_now(self.slurm_now)

    def __call__(self) -> datetime:
        return self.slurm_now + self.skew

    def move(self, **delta: float) -> None:
        self.slurm_now += timedelta(**delta)
        self.rig.fake.set_now(self.slurm_now)

    def jump(self, delta: timedelta) -> None:
        self.skew += delta


@contextlib.contextmanager
def session(rig: Rig, clock: Callable[[], datetime]) -> Iterator[service.TickContext]:
    """A long-running daemon, as run_service holds it: one store, one in-memory ledger."""
    settings = load_settings(rig.config)
    store = LedgerStore(settings.ledger_path, retention_days=settings.watch.retention_days)
    with store:
        ledger = store.load()
        yield service.TickContext(
            settings=settings,
            store=store,
            ledger=ledger,
            runner=SlurmRunner(),
            user=current_user(settings.slurm),
            clock=clock,
        )


def _fail(rig: Rig, job: str, task: int, tb: str = KEY_ERROR_TB) -> str:
    key = f"{job}_{task}"
    rig.fake.finish(key, "FAILED", err=tb)
    return key


# --------------------------------------------------------------------------- Slack


def test_slack_down_for_hours_then_back_reports_every_failure_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stub: SlackStub
) -> None:
    rig = make_rig(tmp_path, monkeypatch, stub, resubmit=False)
    job = rig.array("0-11")
    clock = Clock(rig)
    failed: list[str] = []
    with session(rig, clock) as ctx:
        stub.down = 503
        for t in range(12):  # two hours of ten-minute ticks, a new failure each
            if t == 6:
                stub.stop()  # from 503s to connection refused
            failed.append(_fail(rig, job, t))
            report = service.tick(ctx)
            assert failed[-1] in report.classified
            assert report.delivery is not None and report.delivery.sent == 0
            clock.move(minutes=10)
        assert not stub.posted
        stub.start()
        stub.down = None
        for _ in range(3):
            clock.move(minutes=3)
            service.tick(ctx)
    assert reported_keys(rig) == Counter(dict.fromkeys(failed, 1))
    assert all(m.state == "sent" for m in rig.ledger().outbox)


# --------------------------------------------------------------------------- Slurm commands


@pytest.mark.parametrize("missing", ["sacct", "squeue"])
def test_missing_slurm_command_is_a_recorded_error_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    rig = make_rig(tmp_path, monkeypatch, None, resubmit=False)
    job = rig.array("0-1")
    key = _fail(rig, job, 0)
    monkeypatch.setenv(f"SLURM_TRIAGE_SLURM__{missing.upper()}", f"/nonexistent/{missing}")
    assert rig.once() == 1
    beat = service.read_heartbeat(rig.state)
    assert beat is not None
    assert any(e.startswith(f"{missing}:") and "not found" in e for e in beat.last_tick_errors)
    if missing == "sacct":  # nothing judged without sacct's verdict
        assert rig.ledger().jobs.get(key) is None
    else:  # squeue only tells what is still active; finished jobs are still judged
        assert rig.ledger().jobs[key].error_type == "code_error"
    monkeypatch.delenv(f"SLURM_TRIAGE_SLURM__{missing.upper()}")
    assert rig.once() == 0
    assert rig.ledger().jobs[key].error_type == "code_error"


def _fake_processes(rig: Rig) -> list[int]:
    """Pids of fake Slurm commands still running for this test's cluster."""
    marker = f"FAKESLURM_STATE={rig.fake.state_path}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize("cmd", ["sacct", "squeue"])
def test_slurm_command_hanging_past_its_timeout_is_killed_and_the_tick_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cmd: str
) -> None:
    rig = make_rig(tmp_path, monkeypatch, None, resubmit=False, slurm_timeout_s=1.0)
    job = rig.array("0")
    key = _fail(rig, job, 0)
    rig.fake.hang(cmd, 120)
    assert rig.once() == 1
    beat = service.read_heartbeat(rig.state)
    assert beat is not None
    assert any(e.startswith(f"{cmd}:") and "timed out" in e for e in beat.last_tick_errors)
    assert _fake_processes(rig) == [], "the hung command was left running"
    assert rig.once() == 0
    assert rig.ledger().jobs[key].error_type == "code_error"


def test_sacct_failing_for_many_ticks_alerts_once_then_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stub: SlackStub
) -> None:
    """Also the regression for restarts within one second: the failure counter travels
    between ``run --once`` processes in the heartbeat, which lost to the ledger's copy
    when both carried the same (whole-second) tick time, so the count never reached the
    alert threshold. The clock is pinned so every tick has the same time."""
    pin_daemon_clock(monkeypatch, datetime.now(timezone.utc) + timedelta(seconds=5))
    rig = make_rig(tmp_path, monkeypatch, stub, resubmit=False)
    job = rig.array("0")
    key = _fail(rig, job, 0, RATE_LIMIT_TB)
    rig.fake.fail_next(
        "sacct", rc=1, stderr="sacct: error: Problem talking to the database", times=5
    )
    for _ in range(5):
        assert rig.once() == 1
    alerts = [p for p in stub.posted if "cannot query Slurm" in p.text]
    assert len(alerts) == 1, [p.text for p in stub.posted]
    assert rig.ledger().jobs.get(key) is None or rig.ledger().jobs[key].classified_at is None
    assert rig.once() == 0
    assert rig.ledger().jobs[key].error_type == "rate_limit"
    assert reported_keys(rig)[key] == 1


def _real_sacct_text(rig: Rig) -> str:
    argv = sacct_argv(
        load_settings(rig.config).slurm,
        user=rig.fake.user,
        start=datetime.now(timezone.utc) - timedelta(days=1),
        fields=SACCT_FIELDS,
    )
    proc = subprocess.run(
        argv, env=rig.fake.env(), capture_output=True, text=True, timeout=30, check=True
    )
    assert proc.stdout.count("\n") >= 2
    return proc.stdout


def _cut_last_row(text: str, fraction: float = 0.5, keep: int | None = None) -> str:
    """The output as a reader sees it when sacct dies (or its pipe breaks) mid-row."""
    body = text.rstrip("\n")
    start = body.rfind("\n") + 1
    n = keep if keep is not None else int((len(body) - start) * fraction)
    return body[: start + n]


def test_regression_sacct_output_cut_in_the_first_field_is_glued_to_the_previous_submitline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real sacct ends every row with a newline. Output cut two characters into a row was
    accepted: the stray ``10`` became an extra word of the previous row's SubmitLine (a
    script argument a resubmission would pass on), and a row cut inside its SubmitLine
    was accepted with half a command line."""
    from daemon.errors import SlurmParseError
    from daemon.slurm import parse_sacct

    rig = make_rig(tmp_path, monkeypatch, None, resubmit=False)
    job = rig.array("0-2")
    for t in range(3):
        _fail(rig, job, t)
    text = _real_sacct_text(rig)
    assert len(parse_sacct(text)) == 3
    for cut in (_cut_last_row(text, keep=2), text.rstrip("\n")[:-4]):
        with pytest.raises(SlurmParseError, match="truncated"):
            parse_sacct(cut)


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda t: _cut_last_row(t, 0.5), id="cut-mid-row"),
        pytest.param(lambda t: _cut_last_row(t, keep=2), id="cut-in-first-field"),
        pytest.param(lambda t: t.rstrip("\n")[:-4], id="cut-in-submitline"),
        pytest.param(lambda t: t.replace("\x1f", "", 3), id="fields-missing"),
        pytest.param(lambda t: t + "\x1f".join(["x"] * 40) + "\n", id="extra-columns"),
        pytest.param(lambda t: "<html><body>502 Bad Gateway</body></html>\n", id="html"),
        pytest.param(lambda t: "\x00\xff" * 500, id="binary"),
    ],
)
def test_truncated_or_garbage_sacct_changes_nothing_and_the_next_tick_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mangle: Callable[[str], str]
) -> None:
    rig = make_rig(tmp_path, monkeypatch, None, resubmit=False)
    job = rig.array("0-2")
    first = _fail(rig, job, 0)
    assert rig.once() == 0
    before = rig.ledger().jobs[first].to_json()
    late = [_fail(rig, job, 1, RATE_LIMIT_TB), _fail(rig, job, 2, NETWORK_TB)]
    rig.fake.garbage("sacct", mangle(_real_sacct_text(rig)))
    assert rig.once() == 1
    ledger = rig.ledger()
    assert ledger.jobs[first].to_json() == before
    # a cut row must never be judged from what was left of it
    assert all(k not in ledger.jobs or ledger.jobs[k].classified_at is None for k in late)
    assert rig.once() == 0
    jobs = rig.ledger().jobs
    assert [jobs[k].error_type for k in late] == ["rate_limit", "network"]


def test_squeue_garbage_is_an_error_but_finished_jobs_are_still_judged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = make_rig(tmp_path, monkeypatch, None, resubmit=False)
    job = rig.array("0-1")
    key = _fail(rig, job, 0)
    rig.fake.start(f"{job}_1")
    rig.fake.garbage("squeue", "1000_1\x1fRUNN")
    assert rig.once() == 1
    jobs = rig.ledger().jobs
    assert jobs[key].error_type == "code_error"
    assert jobs[f"{job}_1"].outcome == "running"


# --------------------------------------------------------------------------- the ledger's disk


def _deny_writes_in(monkeypatch: pytest.MonkeyPatch, folder: Path, err: int) -> None:
    """Every file creation under ``folder`` fails like a full (or read-only) disk.

    Tests run as root, which ignores permissions, so the failure is injected at os.open:
    both the ledger's temp file and the heartbeat go through it.
    """
    real_open = os.open
    prefix = str(folder)

    def fake_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
        if str(path).startswith(prefix) and flags & os.O_CREAT and not str(path).endswith(".lock"):
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", fake_open)


def test_disk_full_keeps_the_old_ledger_alerts_and_loses_nothing_once_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stub: SlackStub
) -> None:
    rig = make_rig(tmp_path, monkeypatch, stub)
    job = rig.array("0-2")
    first = _fail(rig, job, 0)
    clock = Clock(rig)
    with session(rig, clock) as ctx:
        assert service.tick(ctx).saved
        saved = rig.ledger_path.read_bytes()
        late = [_fail(rig, job, 1, RATE_LIMIT_TB), _fail(rig, job, 2, KEY_ERROR_TB)]
        with monkeypatch.context() as m:
            _deny_writes_in(m, rig.state, errno.ENOSPC)
            clock.move(minutes=1)
            report = service.tick(ctx)
            assert report.ledger_unwritable and not report.saved
            assert any("No space left" in e for e in report.errors), report.errors
            assert rig.ledger_path.read_bytes() == saved
            stamps = {k: ctx.ledger.jobs[k].classified_at for k in late}
        alerts = [p for p in stub.posted if "cannot save its ledger" in p.text]
        assert len(alerts) == 1
        clock.move(minutes=1)
        assert service.tick(ctx).saved
        clock.move(minutes=1)
        service.tick(ctx)
    ledger = rig.ledger()
    assert {k: ledger.jobs[k].classified_at for k in late} == stamps  # judged once
    assert reported_keys(rig) == Counter({first: 1, late[0]: 1, late[1]: 1})
    subs = [s for s in rig.fake.submissions() if s["job_id"]]
    assert len(subs) == 1 and "--array=1" in subs[0]["argv"]


@contextlib.contextmanager
def immutable(folder: Path) -> Iterator[None]:
    """A really read-only folder, even for root: the ext4/overlay immutable attribute."""
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("chattr not installed: cannot make a folder read-only for root")
    proc = subprocess.run([chattr, "+i", str(folder)], capture_output=True, timeout=10)
    if proc.returncode != 0:
        pytest.skip(f"this filesystem has no immutable attribute: {proc.stderr!r}")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(folder)], capture_output=True, timeout=10, check=True)


def test_read_only_state_folder_is_a_clear_error_and_the_ledger_survives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = make_rig(tmp_path, monkeypatch, None, resubmit=False)
    job = rig.array("0-1")
    first = _fail(rig, job, 0)
    assert rig.once() == 0
    saved = rig.ledger_path.read_bytes()
    late = _fail(rig, job, 1)
    with immutable(rig.state):
        proc = rig.once_subprocess()
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr
        assert "cannot save ledger" in proc.stderr
        assert rig.ledger_path.read_bytes() == saved
    assert rig.once() == 0
    jobs = rig.ledger().jobs
    assert jobs[first].error_type == jobs[late].error_type == "code_error"


# --------------------------------------------------------------------------- the clock


@pytest.mark.parametrize(
    "jump",
    [
        pytest.param(timedelta(hours=3), id="forward-3h"),
        pytest.param(timedelta(days=2), id="forward-2d"),
        pytest.param(-timedelta(hours=2), id="backward-2h"),
        pytest.param(-timedelta(days=1), id="backward-1d"),
    ],
)
def test_clock_jump_neither_repeats_nor_stalls_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stub: SlackStub, jump: timedelta
) -> None:
    """The login node's clock jumps (and NTP later puts it right); jobs keep finishing."""
    rig = make_rig(tmp_path, monkeypatch, stub)
    job = rig.array("0-5")
    clock = Clock(rig)
    with session(rig, clock) as ctx:
        before = [_fail(rig, job, 0, RATE_LIMIT_TB), _fail(rig, job, 1)]
        service.tick(ctx)
        clock.move(minutes=1)
        service.tick(ctx)
        stamps = {k: ctx.ledger.jobs[k].classified_at for k in before}
        assert reported_keys(rig) == Counter(dict.fromkeys(before, 1))

        clock.jump(jump)
        during = [_fail(rig, job, 2, NETWORK_TB), _fail(rig, job, 3)]
        for _ in range(3):
            clock.move(minutes=1)
            service.tick(ctx)
        # twenty minutes in the wrong time, jobs still finishing, then NTP corrects it
        clock.move(minutes=20)
        during.append(_fail(rig, job, 4))
        clock.move(minutes=1)
        service.tick(ctx)
        clock.jump(-jump)
        after = [_fail(rig, job, 5)]
        for _ in range(2):
            clock.move(minutes=1)
            service.tick(ctx)
        assert {k: ctx.ledger.jobs[k].classified_at for k in before} == stamps
    ledger = rig.ledger()
    missed = [k for k in during + after if k not in ledger.jobs or not ledger.jobs[k].classified_at]
    assert missed == [], f"never judged: {missed}"
    assert reported_keys(rig) == Counter(dict.fromkeys(before + during + after, 1)), [
        (m.dedup_key, m.state, m.next_attempt_at, m.last_error) for m in ledger.outbox
    ]
    subs = Counter(a for s in rig.fake.submissions() for a in s["argv"] if a.startswith("--array="))
    assert subs == Counter({"--array=0": 1, "--array=2": 1}), subs


def test_regression_clock_set_back_after_a_send_stalls_slack_until_it_catches_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stub: SlackStub
) -> None:
    """A digest sent while the clock was a day ahead left a ``sent_at`` in the future;
    once NTP set the clock back, the per-message spacing (``now - last sent``) was
    negative and every later message waited for the clock to catch up: a day of silence."""
    rig = make_rig(tmp_path, monkeypatch, stub, resubmit=False)
    job = rig.array("0-1")
    clock = Clock(rig)
    with session(rig, clock) as ctx:
        clock.jump(timedelta(days=1))
        first = _fail(rig, job, 0)
        service.tick(ctx)
        assert reported_keys(rig) == Counter({first: 1})
        clock.jump(-timedelta(days=1))
        second = _fail(rig, job, 1)
        clock.move(minutes=1)
        report = service.tick(ctx)
        assert report.delivery is not None and report.delivery.deferred is None, report.delivery
    assert reported_keys(rig) == Counter({first: 1, second: 1})


def test_regression_backoff_stamped_before_the_clock_went_back_stalls_slack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stub: SlackStub
) -> None:
    """Slack failed while the clock was a day ahead: the retry was due "tomorrow" and,
    after NTP set the clock back, nothing was sent for a day."""
    rig = make_rig(tmp_path, monkeypatch, stub, resubmit=False)
    job = rig.array("0")
    clock = Clock(rig)
    with session(rig, clock) as ctx:
        clock.jump(timedelta(days=1))
        key = _fail(rig, job, 0)
        stub.down = 503
        service.tick(ctx)
        assert not stub.posted
        stub.down = None
        clock.jump(-timedelta(days=1))
        clock.move(minutes=3)
        service.tick(ctx)
    assert reported_keys(rig) == Counter({key: 1})
