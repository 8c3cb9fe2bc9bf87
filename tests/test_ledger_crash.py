"""kill -9 in the middle of a save: a real subprocess dies at a named crash point and
the next load must see the old or the new ledger — never a mix, never an error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from daemon.ledger import Ledger, LedgerStore, read_ledger

# The child loads the ledger, changes every record (so a mix would be visible) and saves.
CHILD = textwrap.dedent(
    """
    import sys
    from daemon.ledger import LedgerStore
    from daemon.records import OutboxMessage

    path, marker = sys.argv[1], sys.argv[2]
    with LedgerStore(path) as store:
        led = store.load()
        for rec in led.jobs.values():
            rec.state = marker
        led.health.ticks += 1
        led.outbox.append(OutboxMessage(marker, "digest", "2025-01-01T00:00:00+00:00", marker))
        led.mark_dirty()
        store.save(led)
        print("saved", flush=True)
    """
)


def _seed(path: Path, n: int = 2000) -> Ledger:
    with LedgerStore(path) as store:
        led = store.load()
        for i in range(n):
            rec = led.get_or_create_job(f"900_{i}")
            rec.state = "old"
        store.save(led)
    return led


def _run_child(path: Path, marker: str, crash_at: str | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if crash_at:
        env["SLURM_TRIAGE_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(path), marker],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _states(led: Ledger) -> set[str]:
    return {rec.state for rec in led.jobs.values()}


@pytest.mark.parametrize(
    ("crash_at", "expected"),
    [("ledger.before_rename", "old"), ("ledger.after_rename", "new")],
)
def test_kill_during_save_leaves_old_or_new(tmp_path: Path, crash_at: str, expected: str) -> None:
    path = tmp_path / "state" / "ledger.json"
    _seed(path)
    proc = _run_child(path, "new", crash_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "saved" not in proc.stdout

    # the read-only view and the daemon's own load agree, with no warnings
    assert _states(read_ledger(path)) == {expected}
    with LedgerStore(path) as store:
        led = store.load()
        assert store.warnings == []
        assert _states(led) == {expected}
        assert len(led.jobs) == 2000
        assert (led.find_outbox("new") is not None) == (expected == "new")
        leftovers = store.stale_temp_files()
        if crash_at == "ledger.before_rename":
            assert leftovers, "the crash should have left its temp file behind"
        # the next save cleans what the crash left behind
        led.mark_dirty()
        assert store.save(led)
        assert store.stale_temp_files() == []
    assert _states(read_ledger(path)) == {expected}


def test_lock_released_by_killed_daemon(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.json"
    _seed(path, n=10)
    proc = _run_child(path, "new", "ledger.before_rename")
    assert proc.returncode == -signal.SIGKILL
    with LedgerStore(path) as store:  # no LedgerLocked: flock dies with the process
        assert store.locked


def test_repeated_crashes_then_clean_save(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.json"
    _seed(path, n=50)
    for i in range(3):
        proc = _run_child(path, f"crash{i}", "ledger.before_rename")
        assert proc.returncode == -signal.SIGKILL
    assert _states(read_ledger(path)) == {"old"}
    proc = _run_child(path, "final", None)
    assert proc.returncode == 0, proc.stderr
    assert _states(read_ledger(path)) == {"final"}
    assert not list(path.parent.glob(".ledger-tmp-*"))
    assert _states(read_ledger(path.parent / "ledger.json.prev")) == {"old"}
