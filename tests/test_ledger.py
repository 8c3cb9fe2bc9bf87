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
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from daemon.records import JobRecord, LogCursor, OutboxMessage, SubmitIntent

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
    for key, msg_state in (("a", "pending"), ("b", "sent"), ("c", "sending"), ("d", "dead")):
        led.outbox.append(OutboxMessage(key, "digest", iso(NOW), "t", state=msg_state))
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
        # migrated rows (objects, not arrays) still become change-tracking records
        assert all(type(r) is JobRecord for r in led.jobs.values())
        assert all(type(c) is LogCursor for c in led.cursors.values())
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
    assert type(led.jobs["100_3"]) is JobRecord


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


# --- cached rows (change tracking) ---------------------------------------------------------


def _parsed(led: Ledger) -> object:
    return json.loads(ledger_mod.encode_ledger(led))


def _reference(led: Ledger) -> object:
    """What the file must hold: ``to_json()`` through the stdlib, no cache involved."""
    return json.loads(json.dumps(led.to_json(), ensure_ascii=False))


def test_setting_a_field_drops_the_cached_row() -> None:
    led = _sample()
    rec = led.jobs["100_3"]
    cur = led.cursors["/l/x.err"]
    ledger_mod.encode_ledger(led)
    assert rec._row is not None and cur._row is not None
    rec.notified = True
    cur.offset = 99
    assert rec._row is None and cur._row is None
    doc = _parsed(led)
    assert doc == _reference(led)
    assert isinstance(doc, dict)
    cols = doc["jobs"]["columns"]
    assert doc["jobs"]["rows"][0][cols.index("notified")] is True
    assert doc["cursors"]["rows"][0][doc["cursors"]["columns"].index("offset")] == 99


def test_the_cache_is_not_persisted_compared_or_shown() -> None:
    led = _sample()
    ledger_mod.encode_ledger(led)
    rec = led.jobs["100_3"]
    assert rec._row is not None
    assert "_row" not in rec.to_json() and "_row" not in led.cursors["/l/x.err"].to_json()
    assert "_row" not in ledger_mod._JOB_FIELDS and "_row" not in ledger_mod._CURSOR_FIELDS
    assert rec == _sample().jobs["100_3"]  # one cached, one not
    assert "_row" not in repr(rec)
    assert JobRecord.from_json(rec.to_json()) == rec


def test_loaded_and_created_records_are_tracking(state: Path) -> None:
    path = state / "ledger.json"
    with LedgerStore(path) as store:
        store.save(_sample(), now=NOW)
        led = store.load()
    rec = led.jobs["100_3"]
    assert type(rec) is JobRecord
    assert type(led.cursors["/l/x.err"]) is LogCursor
    assert type(led.get_or_create_job("7_1", now=NOW)) is JobRecord
    ledger_mod.encode_ledger(led)
    rec.state = "FAILED"  # a loaded record tracks its changes like a new one
    assert rec._row is None
    assert read_ledger(path).jobs["100_3"].state == ""
    assert type(read_ledger(path).jobs["100_3"]) is JobRecord


def test_load_change_save_load_round_trip(state: Path) -> None:
    path = state / "ledger.json"
    with LedgerStore(path) as store:
        store.save(_sample(), now=NOW)
        led = store.load()
        store.save(led, now=NOW)  # nothing changed: not written, rows not built
        led.mark_dirty()
        store.save(led, now=NOW)  # every row encoded and cached
        led.jobs["100_3"].notified = True
        led.jobs["100_3"].config = {**led.jobs["100_3"].config, "seed": 7}
        led.cursors["/l/x.err"].offset = 20
        new = led.get_or_create_job("100_4", now=NOW)
        new.outcome = "running"
        led.cursors["/l/y.err"] = LogCursor(path="/l/y.err", key="100_4")
        led.mark_dirty()
        store.save(led, now=NOW)  # cached rows for nothing, fresh ones for the rest
        again = store.load()
    assert again == led
    assert again.jobs["100_3"].config["seed"] == 7
    assert again.cursors["/l/x.err"].offset == 20
    assert json.loads(path.read_bytes()) == _reference(led)


def test_verify_mode_catches_an_in_place_change(monkeypatch: pytest.MonkeyPatch) -> None:
    led = _sample()
    ledger_mod.encode_ledger(led)
    led.jobs["100_3"].config["reasoning_model"] = "o4"  # bypasses __setattr__
    monkeypatch.setattr(ledger_mod, "VERIFY_ROW_CACHE", False)
    monkeypatch.delenv(ledger_mod.VERIFY_ENV, raising=False)
    # without the guard the stale row is written: exactly what verify mode exists for
    assert _parsed(led) != _reference(led)
    monkeypatch.setattr(ledger_mod, "VERIFY_ROW_CACHE", True)
    with pytest.raises(AssertionError, match=r"job '100_3'.*o3.*o4"):
        ledger_mod.encode_ledger(led)
    assert len(ledger_mod.stale_rows_seen) == 1
    ledger_mod.stale_rows_seen.clear()  # expected here; conftest fails any other test
    # the env var alone turns it on too (how forked/child daemons get it)
    monkeypatch.setattr(ledger_mod, "VERIFY_ROW_CACHE", False)
    monkeypatch.setenv(ledger_mod.VERIFY_ENV, "1")
    cur = led.cursors["/l/x.err"]
    cur.scan_state = {"v": 1}
    ledger_mod.encode_ledger(Ledger(cursors=led.cursors))
    assert cur.scan_state is not None
    cur.scan_state["v"] = 2
    with pytest.raises(AssertionError, match=r"cursor '/l/x.err'"):
        ledger_mod.encode_ledger(Ledger(cursors=led.cursors))
    ledger_mod.stale_rows_seen.clear()


def test_rows_the_fast_encoder_refuses_fall_back_per_row() -> None:
    led = _sample()
    led.jobs["100_3"].config = {"seed": 2**70}  # beyond orjson's 64-bit ints
    led.get_or_create_job("100_5", now=NOW).elapsed_s = 5
    doc = _parsed(led)
    assert doc == _reference(led)
    assert isinstance(doc, dict)
    assert doc["jobs"]["rows"][0][doc["jobs"]["columns"].index("config")] == {"seed": 2**70}


def test_stdlib_encoder_alone_gives_the_same_document(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_mod, "_orjson", None)
    led = _sample()
    led.jobs["100_3"].total_cpu_s = 1e16
    assert _parsed(led) == _reference(led)
    led.jobs["100_3"].notified = True
    assert _parsed(led) == _reference(led)


def test_encoding_matches_the_documents_bytes_under_orjson() -> None:
    if ledger_mod._orjson is None:
        pytest.skip("orjson is not installed: the stdlib path is compared by value only")
    led = _sample()
    for i in range(5000):  # more than one part of rows
        led.get_or_create_job(f"200_{i}", now=NOW).exit_code = i
    first = ledger_mod.encode_ledger(led)
    # the only raw newlines are the row layout's (orjson escapes them in strings)
    assert first.replace(b"\n", b"") == ledger_mod._orjson.dumps(led.to_json())
    led.jobs["200_17"].exit_code = -1
    again = ledger_mod.encode_ledger(led)
    assert again.replace(b"\n", b"") == ledger_mod._orjson.dumps(led.to_json())


_text = st.text(max_size=12)
_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    _text,
)
_json = st.recursive(
    _scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)),
    max_leaves=8,
)
_job_changes = st.fixed_dictionaries(
    {},
    optional={
        "state": _text,
        "notified": st.booleans(),
        "exit_code": st.one_of(st.none(), st.integers(-(2**70), 2**70)),
        "total_cpu_s": st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
        "config": st.dictionaries(_text, _json, max_size=3),
        "evidence": st.one_of(st.none(), st.dictionaries(_text, _json, max_size=3)),
        "updated_at": st.one_of(st.none(), _text),
    },
)
_cursor_changes = st.fixed_dictionaries(
    {},
    optional={
        "offset": st.integers(0, 2**63),
        "scan_state": st.one_of(st.none(), st.dictionaries(_text, _json, max_size=3)),
        "done": st.booleans(),
        "head": _text,
    },
)


@settings(max_examples=60, deadline=None)
@given(
    rounds=st.lists(
        st.tuples(
            st.lists(st.tuples(st.integers(0, 7), _job_changes), max_size=4),
            st.lists(st.tuples(st.integers(0, 7), _cursor_changes), max_size=4),
            st.booleans(),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_cached_encoding_always_equals_a_fresh_one(
    rounds: list[tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, dict[str, Any]]], bool]],
) -> None:
    """Whatever is changed between saves (new records, dropped ones, any field), the
    file holds exactly ``to_json()``."""
    led = _sample()
    for job_changes, cursor_changes, drop in rounds:
        _apply_changes(led, job_changes, cursor_changes)
        if drop and led.jobs:
            del led.jobs[next(iter(led.jobs))]
        assert _parsed(led) == _reference(led)


class _ShortWrites:
    """``os.writev`` as a slow pipe or a signal leaves it: at most ``limit`` bytes taken."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls = 0
        self.most_buffers = 0
        self.real = os.writev

    def __call__(self, fd: int, buffers: Any) -> int:
        self.calls += 1
        self.most_buffers = max(self.most_buffers, len(buffers))
        joined = b"".join(bytes(b) for b in buffers)
        # cut anywhere: mid-buffer, on a boundary, after the first byte
        size = min(len(joined), 1 + (self.calls * 7919) % self.limit)
        return int(self.real(fd, [joined[:size]]))


@pytest.mark.parametrize("iov_max", [1, 3, 1024])
def test_write_parts_survives_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, iov_max: int
) -> None:
    parts = [b"", b"a" * 10, b"", b"bc", *(bytes([65 + i % 26]) * i for i in range(200))]
    fake = _ShortWrites(limit=300)
    monkeypatch.setattr(os, "writev", fake)
    monkeypatch.setattr(ledger_mod, "_IOV_MAX", iov_max)
    target = tmp_path / "out"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        ledger_mod._write_parts(fd, parts)
    finally:
        os.close(fd)
    assert target.read_bytes() == b"".join(parts)
    assert fake.calls > 1 and fake.most_buffers <= iov_max


# --- rows seeded from the file at load ---------------------------------------------------


def _fresh(rec: JobRecord | LogCursor) -> bytes:
    """What encoding the record now gives (its row, as ``save`` would cache it)."""
    getter = ledger_mod._JOB_ROW if isinstance(rec, JobRecord) else ledger_mod._CURSOR_ROW
    return ledger_mod._encode_row(getter(rec))


def _seeded(led: Ledger) -> tuple[set[str], set[str]]:
    jobs = {k for k, r in led.jobs.items() if r._row is not None}
    return jobs, {k for k, c in led.cursors.items() if c._row is not None}


def _bigger_sample() -> Ledger:
    led = _sample()
    for i in range(5):
        rec = led.get_or_create_job(f"100_{10 + i}", now=NOW)
        rec.state = "FAILED"
        rec.evidence = {"text": f"line\nwith a newline and \\u2028 {i}", "line_no": i}
        path = f"/l/{i}.err"
        led.cursors[path] = LogCursor(path=path, key=rec.key, offset=i, scan_state={"n": [i]})
    return led


def test_file_keeps_its_json_structure_with_a_row_per_line(state: Path) -> None:
    led = _bigger_sample()
    with LedgerStore(state / "ledger.json") as store:
        store.save(led, now=NOW)
    raw = (state / "ledger.json").read_bytes()
    doc = json.loads(raw)
    assert doc == _reference(led)
    assert list(doc) == list(led.to_json())  # same keys, same order
    lines = raw.split(b"\n")
    # header, 6 job rows with 5 comma lines, cursors header, 6 cursor rows + 5, the rest
    assert len(lines) == 1 + 11 + 1 + 11 + 1
    assert lines[0].endswith(b'"rows":[') and lines[12].startswith(b']},"cursors":')
    assert lines[2::2][:5] == [b","] * 5
    assert [json.loads(line) for line in lines[1:12:2]] == doc["jobs"]["rows"]
    assert [json.loads(line) for line in lines[13:24:2]] == doc["cursors"]["rows"]
    assert lines[-1].startswith(b']},"outbox":')


def test_empty_tables_round_trip(state: Path) -> None:
    led = Ledger.empty(NOW)
    raw = ledger_mod.encode_ledger(led)
    assert b'"rows":[\n]},"cursors"' in raw and b'"rows":[\n]},"outbox"' in raw
    assert json.loads(raw) == _reference(led)
    only_cursors = Ledger.empty(NOW)
    only_cursors.cursors["/l/a"] = LogCursor(path="/l/a", key="1")
    loaded, _ = ledger_mod.parse_ledger(ledger_mod.encode_ledger(only_cursors))
    assert loaded == only_cursors and _seeded(loaded) == (set(), {"/l/a"})


def test_load_seeds_each_row_with_its_fresh_encoding(state: Path) -> None:
    led = _bigger_sample()
    path = state / "ledger.json"
    with LedgerStore(path) as store:
        store.save(led, now=NOW)
        loaded = store.load()
    assert loaded == led and not loaded.dirty
    assert _seeded(loaded) == (set(loaded.jobs), set(loaded.cursors))
    for rec in (*loaded.jobs.values(), *loaded.cursors.values()):
        assert rec._row == _fresh(rec)
        assert rec._row is not None and rec._row in path.read_bytes().split(b"\n")
    # a seeded record still tracks its changes
    loaded.jobs["100_3"].notified = True
    assert loaded.jobs["100_3"]._row is None


def test_read_ledger_does_not_seed(state: Path) -> None:
    with LedgerStore(state / "ledger.json") as store:
        store.save(_bigger_sample(), now=NOW)
    assert _seeded(read_ledger(state / "ledger.json")) == (set(), set())


def test_first_save_after_load_encodes_only_what_changed(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = state / "ledger.json"
    with LedgerStore(path) as store:
        store.save(_bigger_sample(), now=NOW)
        led = store.load()
        led.jobs["100_11"].state = "COMPLETED"
        led.cursors["/l/2.err"].offset = 99
        led.get_or_create_job("100_99", now=NOW).outcome = "running"
        del led.jobs["100_12"]
        unset = {k for k, r in led.jobs.items() if r._row is None}
        unset |= {k for k, c in led.cursors.items() if c._row is None}
        assert unset == {"100_11", "/l/2.err", "100_99"}
        encoded: list[object] = []
        real = ledger_mod._encode_row

        def counting(value: object) -> bytes:
            encoded.append(value)
            return real(value)

        monkeypatch.setattr(ledger_mod, "_encode_row", counting)
        # the verify pass would encode every cached row too; its own test is below
        monkeypatch.setattr(ledger_mod, "VERIFY_ROW_CACHE", False)
        monkeypatch.delenv(ledger_mod.VERIFY_ENV, raising=False)
        store.save(led, now=NOW)
        assert sorted(v[0] for v in encoded) == ["/l/2.err", "100_11", "100_99"]  # type: ignore[index]
        monkeypatch.setattr(ledger_mod, "_encode_row", real)
        again = store.load()
    assert again == led
    assert "100_12" not in again.jobs and again.jobs["100_11"].state == "COMPLETED"
    assert json.loads(path.read_bytes()) == _reference(led)
    assert _seeded(again) == (set(again.jobs), set(again.cursors))


def test_verify_mode_checks_seeded_rows(state: Path) -> None:
    """A seeded row that is not what the record encodes to is caught like a stale one."""
    with LedgerStore(state / "ledger.json") as store:
        store.save(_sample(), now=NOW)
        led = store.load()
    led.jobs["100_3"].config["reasoning_model"] = "o4"  # in place: the seeded row is stale
    led.mark_dirty()
    with pytest.raises(AssertionError, match=r"job '100_3'"):
        ledger_mod.encode_ledger(led)
    ledger_mod.stale_rows_seen.clear()


def test_old_single_line_file_loads_and_seeds_nothing(state: Path) -> None:
    if ledger_mod._orjson is None:
        pytest.skip("orjson is not installed")
    led = _bigger_sample()
    path = state / "ledger.json"
    state.mkdir()
    path.write_bytes(ledger_mod._orjson.dumps(led.to_json()))  # the previous writer's output
    with LedgerStore(path) as store:
        loaded = store.load()
        assert loaded == led
        assert _seeded(loaded) == (set(), set())
        loaded.mark_dirty()
        store.save(loaded, now=NOW)
        again = store.load()
    assert again == led and _seeded(again) == (set(again.jobs), set(again.cursors))


def _tamper_join_job_rows(raw: bytes) -> bytes:
    return raw.replace(b"]\n,\n[", b"],[", 1)  # two job rows on one line


def _tamper_join_cursor_rows(raw: bytes) -> bytes:
    head, sep, tail = raw.partition(b'"cursors":')
    return head + sep + tail.replace(b"]\n,\n[", b"],\n[", 1)  # a comma line missing


def _tamper_indent(raw: bytes) -> bytes:
    return raw.replace(b"\n[", b"\n  [")


def _tamper_crlf(raw: bytes) -> bytes:
    return raw.replace(b"\n", b"\r\n")


def _tamper_comma_at_line_end(raw: bytes) -> bytes:
    return raw.replace(b"]\n,\n[", b"],\n\n[")  # line count kept, rows end in a comma


def _tamper_space_after_a_row(raw: bytes) -> bytes:
    return raw.replace(b"]\n,\n[", b"] \n,\n[", 1)  # a job row line not ending in "]"


def _tamper_spaced_comma(raw: bytes) -> bytes:
    return raw.replace(b"]\n,\n[", b"]\n , \n[", 1)


def _tamper_tab_before_a_row(raw: bytes) -> bytes:
    return raw.replace(b"]\n,\n[", b"]\n,\n\t[", 1)


def _tamper_columns_order(raw: bytes) -> bytes:
    # two boolean columns swapped in the header (both false in every row): the file
    # still means the same, but rows are read by name and the header is not ours
    a, b = b'"retryable","hung"', b'"hung","retryable"'
    assert a in raw
    return raw.replace(a, b, 1)


@pytest.mark.parametrize(
    ("tamper", "jobs_seeded", "cursors_seeded"),
    [
        (_tamper_join_job_rows, False, False),
        (_tamper_join_cursor_rows, True, False),
        (_tamper_indent, False, False),
        (_tamper_crlf, False, False),
        (_tamper_comma_at_line_end, False, False),
        (_tamper_space_after_a_row, False, True),
        (_tamper_spaced_comma, False, True),
        (_tamper_tab_before_a_row, False, True),
        (_tamper_columns_order, False, False),
    ],
)
def test_a_file_not_laid_out_as_written_seeds_nothing(
    state: Path, tamper: Any, jobs_seeded: bool, cursors_seeded: bool
) -> None:
    led = _bigger_sample()
    path = state / "ledger.json"
    with LedgerStore(path) as store:
        store.save(led, now=NOW)
    raw = tamper(path.read_bytes())
    assert raw != path.read_bytes() and json.loads(raw) is not None  # still valid JSON
    path.write_bytes(raw)
    with LedgerStore(path) as store:
        loaded = store.load()
        assert not store.warnings
    assert loaded == led
    jobs, cursors = _seeded(loaded)
    assert jobs == (set(loaded.jobs) if jobs_seeded else set())
    assert cursors == (set(loaded.cursors) if cursors_seeded else set())
    loaded.mark_dirty()
    assert json.loads(ledger_mod.encode_ledger(loaded)) == _reference(led)


def test_migrated_file_seeds_nothing(state: Path) -> None:
    state.mkdir()
    shutil.copy(FIXTURES / "v1.json", state / "ledger.json")
    with LedgerStore(state / "ledger.json") as store:
        led = store.load()
    assert store.loaded_schema == 1 and led.jobs and led.cursors
    assert _seeded(led) == (set(), set())


def test_rows_the_stdlib_encoded_are_marked_and_not_seeded(state: Path) -> None:
    if ledger_mod._orjson is None:
        pytest.skip("orjson is not installed")
    led = _bigger_sample()
    led.jobs["100_10"].config = {"seed": 2**70, "scale": 1e16}  # orjson refuses the int
    led.cursors["/l/1.err"].offset = 2**64  # one past orjson's range
    path = state / "ledger.json"
    with LedgerStore(path) as store:
        store.save(led, now=NOW)
        raw = path.read_bytes()
        # marked with a leading space (JSON whitespace); the stdlib writes 1e+16
        assert b'\n ["100_10"' in raw and b"1e+16" in raw and b'\n ["/l/1.err"' in raw
        assert json.loads(raw) == _reference(led)
        loaded = store.load()
    # orjson reads a 70-bit int back as a float: the line is not the record's encoding
    assert loaded.jobs["100_10"].config["seed"] == float(2**70)
    jobs, cursors = _seeded(loaded)
    assert jobs == set(loaded.jobs) - {"100_10"}
    assert cursors == set(loaded.cursors) - {"/l/1.err"}
    for rec in (*loaded.jobs.values(), *loaded.cursors.values()):
        assert rec._row is None or rec._row == _fresh(rec)


def test_a_file_the_stdlib_wrote_seeds_nothing(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if ledger_mod._orjson is None:
        pytest.skip("orjson is not installed")
    led = _bigger_sample()
    led.jobs["100_3"].total_cpu_s = 1e16  # "1e+16" from the stdlib, "1e16" from orjson
    monkeypatch.setattr(ledger_mod, "_orjson", None)
    raw = ledger_mod.encode_ledger(led)
    stdlib_loaded, _ = ledger_mod.parse_ledger(raw)
    assert stdlib_loaded == led and _seeded(stdlib_loaded) == (set(), set())
    monkeypatch.undo()
    loaded, _ = ledger_mod.parse_ledger(raw)
    assert loaded == led and _seeded(loaded) == (set(), set())


def _apply_changes(
    led: Ledger,
    job_changes: list[tuple[int, dict[str, Any]]],
    cursor_changes: list[tuple[int, dict[str, Any]]],
) -> None:
    """Set the given fields on jobs ``300_n`` and on their cursors, creating them."""
    for n, changes in job_changes:
        rec = led.get_or_create_job(f"300_{n}", now=NOW)
        for name, value in changes.items():
            setattr(rec, name, value)
    for n, changes in cursor_changes:
        path = f"/l/{n}.err"
        cur = led.cursors.setdefault(path, LogCursor(path=path, key=f"300_{n}"))
        for name, value in changes.items():
            setattr(cur, name, value)


@settings(max_examples=60, deadline=None)
@given(
    job_changes=st.lists(st.tuples(st.integers(0, 7), _job_changes), max_size=6),
    cursor_changes=st.lists(st.tuples(st.integers(0, 7), _cursor_changes), max_size=6),
)
def test_every_seeded_row_equals_a_fresh_encoding(
    job_changes: list[tuple[int, dict[str, Any]]],
    cursor_changes: list[tuple[int, dict[str, Any]]],
) -> None:
    led = _sample()
    _apply_changes(led, job_changes, cursor_changes)
    raw = ledger_mod.encode_ledger(led)
    loaded, _ = ledger_mod.parse_ledger(raw)
    for rec in (*loaded.jobs.values(), *loaded.cursors.values()):
        assert rec._row is None or rec._row == _fresh(rec)
    # and a save of the loaded ledger writes what it holds
    loaded.mark_dirty()
    assert json.loads(ledger_mod.encode_ledger(loaded)) == _reference(loaded)
