from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from daemon import ledger as ledger_mod
from daemon.errors import LedgerError, LedgerLocked, LedgerTooNew
from daemon.ledger import (
    SCHEMA_VERSION,
    Ledger,
    LedgerStore,
    apply_retention,
    iso,
    read_ledger,
)
from daemon.records import LogCursor, OutboxMessage, SubmitIntent

FIXTURES = Path(__file__).parent / "fixtures" / "ledger"
NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


def _sample(now: datetime = NOW) -> Ledger:
    led = Ledger.empty(now)
    rec = led.get_or_create_job("100_3", now=now)
    rec.outcome = "failure"
    rec.error_type = "rate_limit"
    rec.evidence = {"text": "RateLimitError: 429 — “quota”", "line_no": 12, "source": "/l/x.err"}
    rec.config = {"reasoning_model": "o3", "competition_level": 0.5}
    rec.finished_at = iso(now)
    led.cursors["/l/x.err"] = LogCursor(path="/l/x.err", key="100_3", inode=7, size=10, offset=10)
    led.outbox.append(OutboxMessage(dedup_key="d1", kind="digest", created_at=iso(now), text="hi"))
    led.intents["i1"] = SubmitIntent(
        intent_id="i1",
        created_at=iso(now),
        origin_job_id="100",
        task_keys=["100_3"],
        array_spec="3",
        argv=["sbatch", "--parsable", "--array=3", "run.sh"],
        work_dir="/w",
        error_type="rate_limit",
        attempt=2,
    )
    led.resubmit.submission_times.append(iso(now))
    led.health.ticks = 3
    return led


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def test_round_trip_and_no_write_when_unchanged(state: Path) -> None:
    path = state / "ledger.json"
    with LedgerStore(path) as store:
        led = store.load()
        assert led.jobs == {} and led.dirty  # fresh: first save creates the file
        assert not path.exists()
        led = _sample()
        assert store.save(led, now=NOW) is True
        assert led.dirty is False
        stat1 = path.stat()
        assert store.save(led, now=NOW) is False  # unchanged: no write at all
        assert path.stat().st_ino == stat1.st_ino and path.stat().st_mtime_ns == stat1.st_mtime_ns
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["schema_version"] == SCHEMA_VERSION
    with LedgerStore(path) as store:
        again = store.load()
    assert again == _sample()
    assert again.dirty is False
    assert again.jobs["100_3"].evidence == _sample().jobs["100_3"].evidence


def test_state_dir_created_private(state: Path) -> None:
    with LedgerStore(state / "ledger.json") as store:
        store.save(Ledger.empty(), now=NOW)
    assert (state.stat().st_mode & 0o777) == 0o700
    assert (state / "ledger.lock").read_text().strip() == str(os.getpid())


def test_previous_copy_is_kept(state: Path) -> None:
    path = state / "ledger.json"
    with LedgerStore(path) as store:
        led = _sample()
        store.save(led, now=NOW)
        first = path.read_bytes()
        led.health.ticks = 99
        led.mark_dirty()
        store.save(led, now=NOW)
    assert (state / "ledger.json.prev").read_bytes() == first
    assert read_ledger(path).health.ticks == 99


def test_get_or_create_job_parses_key_and_marks_dirty() -> None:
    led = Ledger.empty(NOW)
    led.dirty = False
    rec = led.get_or_create_job("555_12", now=NOW)
    assert (rec.job_id, rec.array_task, rec.first_seen_at) == ("555", 12, iso(NOW))
    assert led.dirty
    led.dirty = False
    assert led.get_or_create_job("555_12") is rec
    assert not led.dirty  # finding an existing record changes nothing
    plain = led.get_or_create_job("777")
    assert (plain.job_id, plain.array_task) == ("777", None)


def test_outbox_pending_skips_sent_and_dead() -> None:
    led = Ledger.empty(NOW)
    for key, st in (("a", "pending"), ("b", "sent"), ("c", "sending"), ("d", "dead")):
        led.outbox.append(OutboxMessage(key, "digest", iso(NOW), "t", state=st))
    assert [m.dedup_key for m in led.outbox_pending()] == ["a", "c"]
    assert led.find_outbox("b") is led.outbox[1]
    assert led.find_outbox("zz") is None


# --- migration ---------------------------------------------------------------------------


def test_v1_fixture_migrates_to_v2(state: Path) -> None:
    state.mkdir()
    shutil.copy(FIXTURES / "v1.json", state / "ledger.json")
    with LedgerStore(state / "ledger.json") as store:
        led = store.load()
        assert store.loaded_schema == 1
        assert led.dirty  # rewritten in the current schema at the next save
        assert set(led.jobs) == {"4242_7", "4300_7"}
        retry = led.jobs["4300_7"]
        assert (retry.parent, retry.origin, retry.attempt) == ("4242_7", "4242_7", 2)
        assert led.jobs["4242_7"].evidence is not None
        assert led.jobs["4242_7"].evidence["line_no"] == 812
        assert list(led.cursors) == ["/home/alice/logs/negotiation_4242_7.err"]
        assert led.cursors["/home/alice/logs/negotiation_4242_7.err"].offset == 90211
        assert led.intents == {}
        assert led.outbox[0].state == "sent"
        assert led.health.ticks == 57
        store.save(led, now=datetime(2025, 3, 1, 9, tzinfo=timezone.utc))
    assert json.loads((state / "ledger.json").read_bytes())["schema_version"] == 2
    assert read_ledger(state / "ledger.json") == led


def test_v1_to_v2_direct() -> None:
    doc = json.loads((FIXTURES / "v1.json").read_bytes())
    out = ledger_mod.MIGRATIONS[1](doc)
    assert out["schema_version"] == 2
    assert out["intents"] == {}
    rows = {r["key"]: r for r in out["jobs"]["rows"]}
    assert "retry_of" not in rows["4300_7"]
    assert rows["4300_7"]["parent"] == "4242_7"
    assert [c["path"] for c in out["cursors"]["rows"]] == [
        "/home/alice/logs/negotiation_4242_7.err"
    ]
    assert isinstance(doc["jobs"], list)  # the input is not mutated


def test_newer_schema_is_refused_and_left_alone(state: Path) -> None:
    state.mkdir()
    path = state / "ledger.json"
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, "jobs": "whatever"}))
    with LedgerStore(path) as store, pytest.raises(LedgerTooNew) as info:
        store.load()
    assert f"schema {SCHEMA_VERSION + 1} > {SCHEMA_VERSION}" in str(info.value)
    assert "upgrade slurm-triage" in str(info.value)
    assert path.exists() and sorted(p.name for p in state.iterdir()) == [
        "ledger.json",
        "ledger.lock",
    ]
    with pytest.raises(LedgerTooNew):
        read_ledger(path)


# --- corruption --------------------------------------------------------------------------


def _good_bytes(tmp: Path) -> bytes:
    with LedgerStore(tmp / "good" / "ledger.json") as store:
        store.save(_sample(), now=NOW)
    return (tmp / "good" / "ledger.json").read_bytes()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"{not json", id="bad-json"),
        pytest.param(b"[1, 2, 3]", id="top-level-list"),
        pytest.param(b'{"schema_version": 2, "jobs": [1]}', id="wrong-shape"),
        pytest.param(b'{"jobs": {}}', id="no-version"),
        pytest.param(b"\xff\xfe\x00garbage", id="binary"),
        pytest.param(None, id="truncated"),
    ],
)
def test_corrupt_file_moved_aside_and_prev_used(tmp_path: Path, content: bytes | None) -> None:
    good = _good_bytes(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    path = state / "ledger.json"
    bad = good[: len(good) // 2] if content is None else content
    path.write_bytes(bad)
    (state / "ledger.json.prev").write_bytes(good)
    with LedgerStore(path) as store:
        led = store.load()
        assert led == _sample()
        assert led.dirty  # written back as the current file at the next save
        assert len(store.warnings) == 1
        assert "moved aside" in store.warnings[0] and "previous copy" in store.warnings[0]
    aside = list(state.glob("ledger.json.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == bad  # never silently replaced
    assert not path.exists()


def test_corrupt_without_prev_starts_empty_with_warning(state: Path) -> None:
    state.mkdir()
    (state / "ledger.json").write_bytes(b'{"schema_version": 2, "jobs": {"columns": ["key"]')
    (state / "ledger.json.prev").write_bytes(b"also broken")
    with LedgerStore(state / "ledger.json") as store:
        led = store.load()
        assert led.jobs == {}
        assert "starting empty" in store.warnings[0]
    names = sorted(p.name for p in state.iterdir())
    assert any(n.startswith("ledger.json.corrupt-") for n in names)
    assert any(n.startswith("ledger.json.prev.corrupt-") for n in names)


def test_row_width_mismatch_is_corrupt() -> None:
    doc = _sample().to_json()
    doc["jobs"]["rows"][0] = doc["jobs"]["rows"][0][:-1]
    with pytest.raises(ledger_mod.LedgerCorrupt, match="columns"):
        ledger_mod.parse_ledger(json.dumps(doc).encode())


def test_columns_from_another_release_are_matched_by_name() -> None:
    doc = json.loads(ledger_mod.encode_ledger(_sample()))
    cols = doc["jobs"]["columns"]
    row = doc["jobs"]["rows"][0]
    # drop "hung" (takes its default) and add a column this version does not know
    i = cols.index("hung")
    doc["jobs"]["columns"] = [*cols[:i], *cols[i + 1 :], "from_the_future"]
    doc["jobs"]["rows"] = [[*row[:i], *row[i + 1 :], 42]]
    led, _ = ledger_mod.parse_ledger(json.dumps(doc).encode())
    assert led.jobs["100_3"] == _sample().jobs["100_3"]


def test_missing_ledger_but_prev_present_is_recovered(state: Path) -> None:
    path = state / "ledger.json"
    with LedgerStore(path) as store:
        store.save(_sample(), now=NOW)
    os.replace(path, state / "ledger.json.prev")
    with LedgerStore(path) as store:
        assert store.load() == _sample()
        assert "missing" in store.warnings[0]


# --- read-only access --------------------------------------------------------------------


def test_read_ledger_missing_is_empty_and_writes_nothing(tmp_path: Path) -> None:
    led = read_ledger(tmp_path / "nope" / "ledger.json")
    assert led.jobs == {} and not led.dirty
    assert not (tmp_path / "nope").exists()


def test_read_ledger_works_while_daemon_holds_lock(state: Path) -> None:
    with LedgerStore(state / "ledger.json") as store:
        store.save(_sample(), now=NOW)
        assert read_ledger(state / "ledger.json") == _sample()


def test_read_ledger_does_not_move_corrupt_file(state: Path) -> None:
    state.mkdir()
    (state / "ledger.json").write_bytes(b"garbage")
    assert read_ledger(state / "ledger.json").jobs == {}
    assert sorted(p.name for p in state.iterdir()) == ["ledger.json"]


# --- lock --------------------------------------------------------------------------------


def test_second_store_is_locked_out(state: Path) -> None:
    with LedgerStore(state / "ledger.json"):
        other = LedgerStore(state / "ledger.json")
        with pytest.raises(LedgerLocked) as info:
            other.load()
        assert f"(pid {os.getpid()})" in str(info.value)
        assert str(state) in str(info.value)
    # released on exit
    with LedgerStore(state / "ledger.json") as store:
        assert store.locked


def test_lock_held_by_another_process(state: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys, time
        from daemon.ledger import LedgerStore
        with LedgerStore({str(state / "ledger.json")!r}):
            print("locked", flush=True)
            sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(LedgerLocked, match=rf"\(pid {proc.pid}\)"):
            LedgerStore(state / "ledger.json").lock()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
    # the lock dies with its process
    with LedgerStore(state / "ledger.json") as store:
        assert store.locked


# --- disk errors -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["writev", "fsync"])
def test_disk_full_leaves_old_file_and_no_temp(
    state: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    path = state / "ledger.json"
    with LedgerStore(path) as store:
        store.save(_sample(), now=NOW)
        before = path.read_bytes()
        led = _sample()
        led.health.ticks = 1000
        led.mark_dirty()

        def boom(*args: object) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(ledger_mod.os, where, boom)
        with pytest.raises(LedgerError, match="No space left on device") as info:
            store.save(led, now=NOW)
        monkeypatch.undo()
        assert "previous copy is kept" in str(info.value)
        assert path.read_bytes() == before
        assert store.stale_temp_files() == []
        assert led.dirty  # the next save retries
        assert store.save(led, now=NOW)
    assert read_ledger(path).health.ticks == 1000


def test_leftover_temp_files_cleaned_on_next_save(state: Path) -> None:
    with LedgerStore(state / "ledger.json") as store:
        store.save(_sample(), now=NOW)
        stray = state / ".ledger-tmp-999-deadbeef"
        stray.write_bytes(b"half a ledger")
        assert store.stale_temp_files() == [stray]
        led = _sample()
        led.mark_dirty()
        store.save(led, now=NOW)
        assert store.stale_temp_files() == []


# --- retention ---------------------------------------------------------------------------


def _finished(led: Ledger, key: str, when: datetime, **fields: object) -> None:
    rec = led.get_or_create_job(key, now=when)
    rec.outcome = "failure"
    rec.finished_at = iso(when)
    for name, value in fields.items():
        setattr(rec, name, value)


def test_retention_drops_only_unneeded_old_records(tmp_path: Path) -> None:
    old = NOW - timedelta(days=30)
    led = Ledger.empty(old)
    _finished(led, "1_1", old)  # old, done -> dropped
    _finished(led, "1_2", NOW - timedelta(days=1))  # recent -> kept
    _finished(led, "1_3", old, resubmit="pending")  # waiting for a retry -> kept
    _finished(led, "2_1", old)  # original of a running retry -> kept
    led.get_or_create_job("3_1", now=old).origin = "2_1"
    led.jobs["3_1"].outcome = "running"
    _finished(led, "4_1", old)  # reported by an undelivered message -> kept
    led.outbox.append(OutboxMessage("m1", "digest", iso(old), "t", job_keys=["4_1"]))
    _finished(led, "5_1", old)  # an unsettled intent -> kept
    led.intents["i5"] = SubmitIntent("i5", iso(old), "5", ["5_1"], "1", ["sbatch"], "/", "x", 2)
    _finished(led, "6_1", old)  # whole old lineage -> dropped together
    _finished(led, "7_1", old, origin="6_1", parent="6_1", attempt=2)
    led.outbox.append(OutboxMessage("m2", "digest", iso(old), "t", state="sent", sent_at=iso(old)))
    led.outbox.append(OutboxMessage("m3", "digest", iso(NOW), "t", state="sent", sent_at=iso(NOW)))
    led.intents["i6"] = SubmitIntent(
        "i6", iso(old), "6", ["6_1"], "1", ["sbatch"], "/", "x", 2, state="submitted"
    )
    existing = tmp_path / "exists.err"
    existing.write_text("x")
    led.cursors["/gone.err"] = LogCursor(path="/gone.err", key="1_1")
    led.cursors[str(existing)] = LogCursor(path=str(existing), key="6_1")
    old_ns = int(old.timestamp() * 1e9)
    led.cursors["/done-old.err"] = LogCursor(path="/done-old.err", key="7_1", done=True)
    led.cursors["/done-old.err"].mtime_ns = old_ns
    led.cursors["/kept.err"] = LogCursor(path="/kept.err", key="1_2")
    led.resubmit.submission_times = [iso(NOW - timedelta(hours=2)), iso(NOW - timedelta(minutes=5))]
    led.dirty = False

    removed = apply_retention(led, NOW, 14, file_exists=os.path.exists)

    assert sorted(led.jobs) == ["1_2", "1_3", "2_1", "3_1", "4_1", "5_1"]
    assert [m.dedup_key for m in led.outbox] == ["m1", "m3"]
    assert sorted(led.intents) == ["i5"]
    # gone file dropped, done+old dropped; a still-existing file of a dropped job is kept
    assert sorted(led.cursors) == sorted([str(existing), "/kept.err"])
    assert led.resubmit.submission_times == [iso(NOW - timedelta(minutes=5))]
    assert removed == 3 + 1 + 1 + 2 + 1
    assert led.dirty


def test_retention_nothing_to_drop_keeps_ledger_clean() -> None:
    led = _sample()
    led.dirty = False
    assert apply_retention(led, NOW, 14) == 0
    assert not led.dirty


def test_file_stays_bounded_under_churn(state: Path) -> None:
    """Two weeks of hourly ticks, 50 finished tasks each, retention 2 days."""
    path = state / "ledger.json"
    sizes: list[int] = []
    with LedgerStore(path, retention_days=2) as store:
        led = store.load()
        start = NOW
        for tick in range(24 * 14):
            now = start + timedelta(hours=tick)
            for i in range(50):
                key = f"{1000 + tick}_{i}"
                _finished(led, key, now, notified=True)
                led.cursors[f"/logs/{key}.err"] = LogCursor(
                    path=f"/logs/{key}.err",
                    key=key,
                    done=True,
                    mtime_ns=int(now.timestamp() * 1e9),
                )
            led.outbox.append(
                OutboxMessage(f"d{tick}", "digest", iso(now), "t", state="sent", sent_at=iso(now))
            )
            led.resubmit.submission_times.append(iso(now))
            store.save(led, now=now)
            sizes.append(path.stat().st_size)
    # at most (retention + one retention interval) worth of ticks survive
    assert len(led.jobs) <= 50 * (24 * 2 + 2)
    assert len(led.cursors) <= 50 * (24 * 2 + 2)
    assert len(led.outbox) <= 24 * 2 + 2
    assert len(led.resubmit.submission_times) <= 2
    assert sizes[-1] < sizes[24 * 3] * 1.1  # flat after the first retention period
