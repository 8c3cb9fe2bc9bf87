"""The daemon's JSON ledger: one file, one writer.

Loading handles schema migration (and refuses files from a newer version), moves a
corrupt file aside and falls back to the previous good copy. Saving is atomic (temp
file in the same folder, fsync, keep the previous copy, rename, fsync the folder),
skipped when nothing changed, and compacts old finished records first so the file
stays bounded. A ``flock`` on ``ledger.lock`` keeps a second daemon out.

Records are plain dataclasses (``records.py``) so 100k of them convert with dict
comprehensions; pydantic would be an order of magnitude slower here. Each job and
cursor caches its encoded row, so a save re-encodes only the records that changed; the
file has each row on a line of its own, and a load seeds the cache from those lines.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import operator
import os
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import repeat
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

from .errors import LedgerCorrupt, LedgerError, LedgerLocked, LedgerTooNew
from .faults import crash_point

try:  # optional: ~5x faster encoding of 100k records; the stdlib is the fallback
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None  # type: ignore[assignment]

from .records import (
    Health,
    JobRecord,
    JobRecordBase,
    LogCursor,
    LogCursorBase,
    OutboxMessage,
    ResubmitState,
    SubmitIntent,
    persisted_fields,
)
from .timeutil import iso, parse_iso, utcnow

SCHEMA_VERSION = 2
LEDGER_NAME = "ledger.json"
LOCK_NAME = "ledger.lock"
PREV_SUFFIX = ".prev"
CORRUPT_INFIX = ".corrupt-"
TMP_PREFIX = ".ledger-tmp-"

# The per-hour submission cap only ever looks one hour back.
SUBMISSION_TIMES_KEEP = timedelta(hours=1)
# Retention scans every record; once an hour is plenty for a 14-day horizon.
RETENTION_INTERVAL = timedelta(hours=1)
# Outbox states after which a message needs nothing more from the daemon.
OUTBOX_DONE_STATES = frozenset({"sent", "dead"})
# Intent states that are settled; "intent" means sbatch may have run and must be reconciled.
INTENT_DONE_STATES = frozenset({"submitted", "failed", "abandoned", "dry_run"})

R = TypeVar("R")

# When true, every save re-encodes the records whose cached row it would reuse and raises
# AssertionError on a difference: an in-place change (``rec.config["x"] = 1``) that the
# change tracking cannot see. Costs a full encode; the test suite turns it on.
VERIFY_ROW_CACHE = False
VERIFY_ENV = "SLURM_TRIAGE_VERIFY_LEDGER_CACHE"
# Stale rows found in verify mode (also raised), so a test can fail even when the caller
# swallows the AssertionError (a tick stage records it as an error and goes on).
stale_rows_seen: list[str] = []


@dataclass
class Ledger:
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    cursors: dict[str, LogCursor] = field(default_factory=dict)  # keyed by log path
    outbox: list[OutboxMessage] = field(default_factory=list)
    intents: dict[str, SubmitIntent] = field(default_factory=dict)
    resubmit: ResubmitState = field(default_factory=ResubmitState)
    health: Health = field(default_factory=Health)
    created_at: str = ""
    # True when something changed since the last load/save; an unchanged ledger is not written.
    dirty: bool = field(default=False, compare=False)

    @classmethod
    def empty(cls, now: datetime | None = None) -> Ledger:
        # A brand-new ledger is dirty so the first save creates the file.
        return cls(created_at=iso(now or utcnow()), dirty=True)

    def mark_dirty(self) -> None:
        self.dirty = True

    def get_or_create_job(
        self,
        key: str,
        *,
        job_id: str | None = None,
        array_task: int | None = None,
        now: datetime | None = None,
    ) -> JobRecord:
        rec = self.jobs.get(key)
        if rec is not None:
            return rec
        if job_id is None:
            head, sep, tail = key.partition("_")
            job_id = head
            if array_task is None and sep and tail.isdigit():
                array_task = int(tail)
        stamp = iso(now or utcnow())
        # built untracked and switched (``_tracking``): a tick may create thousands
        base = JobRecordBase(
            key=key, job_id=job_id, array_task=array_task, first_seen_at=stamp, updated_at=stamp
        )
        rec = _tracking([base], JobRecord)[0]
        self.jobs[key] = rec
        self.mark_dirty()
        return rec

    def outbox_pending(self) -> list[OutboxMessage]:
        """Messages still to deliver, oldest first."""
        return [m for m in self.outbox if m.state not in OUTBOX_DONE_STATES]

    def find_outbox(self, dedup_key: str) -> OutboxMessage | None:
        for msg in self.outbox:
            if msg.dedup_key == dedup_key:
                return msg
        return None

    def lineage(self, origin_key: str) -> list[JobRecord]:
        """Every attempt of one original task (the original first), by attempt number."""
        members = [r for r in self.jobs.values() if r.origin_key == origin_key]
        return sorted(members, key=lambda r: r.attempt)

    def to_json(self) -> dict[str, Any]:
        """The on-disk document. Jobs and cursors are column tables: at 100k records,
        positional rows halve the file and let ``attrgetter`` do the work in C."""
        return {
            "schema_version": SCHEMA_VERSION,
            "created_at": self.created_at,
            "jobs": {"columns": _JOB_FIELDS, "rows": list(map(_JOB_ROW, self.jobs.values()))},
            "cursors": {
                "columns": _CURSOR_FIELDS,
                "rows": list(map(_CURSOR_ROW, self.cursors.values())),
            },
            "outbox": [m.to_json() for m in self.outbox],
            "intents": {k: i.to_json() for k, i in self.intents.items()},
            "resubmit": self.resubmit.to_json(),
            "health": self.health.to_json(),
        }

    @classmethod
    def from_json(cls, data: Any, *, raw: bytes | None = None) -> Ledger:
        """Build from a current-version document. Raises LedgerCorrupt on a wrong shape.

        ``raw``: the file ``data`` was parsed from, unmigrated. Each job and cursor then
        starts with its row from there as the cached ``_row`` when the file is laid out
        as ``save`` writes it (``_seed_rows``), so the next save encodes only changes.
        """
        if not isinstance(data, dict):
            raise LedgerCorrupt("top level is not a JSON object")
        try:
            outbox_raw = _expect(data.get("outbox", []), list, "outbox")
            intents_raw = _expect(data.get("intents", {}), dict, "intents")
            job_list, jobs_exact = _table(JobRecordBase, _JOB_FIELDS, data.get("jobs"), "jobs")
            cursor_list, cursors_exact = _table(
                LogCursorBase, _CURSOR_FIELDS, data.get("cursors"), "cursors"
            )
            if raw is not None and _orjson is not None:
                _seed_rows(
                    raw, job_list if jobs_exact else None, cursor_list if cursors_exact else None
                )
            jobs = {r.key: r for r in _tracking(job_list, JobRecord)}
            cursors = {c.path: c for c in _tracking(cursor_list, LogCursor)}
            outbox = [_build(OutboxMessage, _OUTBOX_FIELDS, v) for v in outbox_raw]
            intents = {k: _build(SubmitIntent, _INTENT_FIELDS, v) for k, v in intents_raw.items()}
            resubmit = _build(ResubmitState, _RESUBMIT_FIELDS, data.get("resubmit") or {})
            health = _build(Health, _HEALTH_FIELDS, data.get("health") or {})
            created_at = data.get("created_at") or ""
            if not isinstance(created_at, str):
                raise LedgerCorrupt("created_at is not a string")
        except TypeError as exc:  # missing required field, or a record that is not an object
            raise LedgerCorrupt(f"bad record: {exc}") from exc
        return cls(
            jobs=jobs,
            cursors=cursors,
            outbox=outbox,
            intents=intents,
            resubmit=resubmit,
            health=health,
            created_at=created_at,
        )


_JOB_FIELDS = persisted_fields(JobRecord)
_CURSOR_FIELDS = persisted_fields(LogCursor)
_OUTBOX_FIELDS = persisted_fields(OutboxMessage)
_INTENT_FIELDS = persisted_fields(SubmitIntent)
_RESUBMIT_FIELDS = persisted_fields(ResubmitState)
_HEALTH_FIELDS = persisted_fields(Health)
_FIELD_SETS: dict[tuple[str, ...], frozenset[str]] = {
    names: frozenset(names)
    for names in (
        _JOB_FIELDS,
        _CURSOR_FIELDS,
        _OUTBOX_FIELDS,
        _INTENT_FIELDS,
        _RESUBMIT_FIELDS,
        _HEALTH_FIELDS,
    )
}


_JOB_ROW = operator.attrgetter(*_JOB_FIELDS)
_CURSOR_ROW = operator.attrgetter(*_CURSOR_FIELDS)


def _table(
    cls: Callable[..., R], names: tuple[str, ...], data: Any, what: str
) -> tuple[list[R], bool]:
    """Rebuild records from ``{"columns": [...], "rows": [...]}``.

    A row is an array matching ``columns`` (what ``save`` writes) or an object keyed by
    field name (what migrations write, since they cannot know every column's default).
    The flag says every row was an array in exactly the current columns: only then can
    a row's line in the file stand for what encoding the record gives (``_seed_rows``).
    """
    if data is None:
        return [], False
    if not isinstance(data, dict):
        raise LedgerCorrupt(f"{what!r} is not a JSON object")
    columns = data.get("columns")
    rows = data.get("rows")
    if not isinstance(columns, list) or not isinstance(rows, list):
        raise LedgerCorrupt(f"{what!r} has no columns/rows table")
    width = len(columns)
    if all(type(row) is list and len(row) == width for row in rows):
        if tuple(columns) == names:
            return [cls(*row) for row in rows], True
        # Columns from another release (added or dropped fields): match by name; unknown
        # ones are dropped, missing ones take their defaults.
        allowed = _FIELD_SETS[names]
        idx = [(i, c) for i, c in enumerate(columns) if isinstance(c, str) and c in allowed]
        return [cls(**{c: row[i] for i, c in idx}) for row in rows], False
    out = []
    for row in rows:
        if isinstance(row, dict):
            out.append(_build(cls, names, row))
        elif isinstance(row, list) and len(row) == width:
            out.append(_build(cls, names, dict(zip(columns, row, strict=True))))
        else:
            raise LedgerCorrupt(f"{what!r} has a row that does not match its {width} columns")
    return out, False


def _tracking(records: list[Any], cls: type[R]) -> list[R]:
    """Turn loaded plain records into their change-tracking class, in place.

    Built as the plain base, the dataclass ``__init__`` stores fields without the
    tracking ``__setattr__`` (which would make a 100k-record load ~2x slower); the
    classes share a slot layout, so switching is one pointer store per record.
    """
    for rec in records:
        rec.__class__ = cls
    return cast(list[R], records)


def _build(cls: Callable[..., R], names: tuple[str, ...], data: Any) -> R:
    if not isinstance(data, dict):
        raise TypeError(f"expected an object, got {type(data).__name__}")
    allowed = _FIELD_SETS[names]
    if allowed.issuperset(data):
        return cls(**data)
    # Keys from a newer minor change are dropped rather than failing the whole load.
    return cls(**{k: v for k, v in data.items() if k in allowed})


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise LedgerCorrupt(f"{what!r} is not a JSON {'object' if kind is dict else 'array'}")
    return value


# --- migrations --------------------------------------------------------------------------
#
# Schema 1 (slurm-triage 0.0.x): jobs and cursors were JSON arrays, a retry named its
# parent in ``retry_of``, and there were no resubmission intents (resubmission ran sbatch
# without recording anything first).


def _v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
    jobs_in = doc.get("jobs", [])
    if not isinstance(jobs_in, list):
        raise LedgerCorrupt("schema 1 'jobs' is not a JSON array")
    # keyed while converting so a duplicated key keeps its last record, as schema 1 did
    jobs: dict[str, Any] = {}
    for rec in jobs_in:
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
            raise LedgerCorrupt("schema 1 job record without a 'key'")
        rec = dict(rec)
        if "retry_of" in rec:
            rec["parent"] = rec.pop("retry_of")
        jobs[rec["key"]] = rec
    cursors_in = doc.get("cursors", [])
    if not isinstance(cursors_in, list):
        raise LedgerCorrupt("schema 1 'cursors' is not a JSON array")
    cursors: dict[str, Any] = {}
    for cur in cursors_in:
        if not isinstance(cur, dict) or not isinstance(cur.get("path"), str):
            raise LedgerCorrupt("schema 1 cursor without a 'path'")
        cursors[cur["path"]] = cur
    out = dict(doc)
    out["jobs"] = {"columns": [], "rows": list(jobs.values())}
    out["cursors"] = {"columns": [], "rows": list(cursors.values())}
    out["intents"] = {}
    out["schema_version"] = 2
    return out


# MIGRATIONS[n] turns a schema-n document into a schema-(n+1) one.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def migrate(doc: dict[str, Any], source: str = "ledger") -> tuple[dict[str, Any], int]:
    """Bring a parsed document to SCHEMA_VERSION. Returns (document, version it was written in)."""
    version = doc.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise LedgerCorrupt(f"{source}: missing or invalid schema_version")
    if version > SCHEMA_VERSION:
        raise LedgerTooNew(
            f"ledger {source} was written by a newer slurm-triage "
            f"(schema {version} > {SCHEMA_VERSION}); upgrade slurm-triage"
        )
    original = version
    while version < SCHEMA_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise LedgerCorrupt(f"{source}: no migration from schema {version}")
        doc = step(doc)
        version += 1
    return doc, original


def parse_ledger(
    raw: bytes, source: str = "ledger", *, seed_rows: bool = True
) -> tuple[Ledger, int]:
    """Decode and migrate. Raises LedgerCorrupt (bad data) or LedgerTooNew.

    ``seed_rows``: give records their cached rows from ``raw`` (``Ledger.from_json``);
    worth it only for a ledger that will be saved again.
    """
    with _gc_paused():
        try:
            doc = _loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
            raise LedgerCorrupt(f"{source}: not valid JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise LedgerCorrupt(f"{source}: top level is not a JSON object")
        doc, original = migrate(doc, source)
        try:
            seed = seed_rows and original == SCHEMA_VERSION  # migrated: rows are objects
            ledger = Ledger.from_json(doc, raw=raw if seed else None)
        except LedgerCorrupt as exc:
            raise LedgerCorrupt(f"{source}: {exc}") from exc
    return ledger, original


def encode_ledger(ledger: Ledger) -> bytes:
    """The file's bytes: the JSON of ``ledger.to_json()``, written compactly."""
    return b"".join(encode_ledger_parts(ledger))


def encode_ledger_parts(ledger: Ledger) -> list[bytes]:
    """``encode_ledger`` as pieces to write one after the other (no 70 MB join).

    Job and cursor rows come from each record's cached ``_row`` when it has one; only
    records changed since the last save are encoded again. The rows are joined in
    groups of ``_ROWS_PER_PART`` (~1 MB): no single copy of the whole table, and few
    enough parts for ``writev``.

    Layout (what ``_seed_rows`` relies on): each table row on a line of its own and a
    comma line between rows, ``"rows":[\n<row>\n,\n<row>\n]``, an empty table
    ``"rows":[\n]``; the document has no other raw newline (encoders escape newlines in
    strings).
    """
    with _gc_paused():
        jobs = ledger.jobs.values()
        cursors = ledger.cursors.values()
        if VERIFY_ROW_CACHE or os.environ.get(VERIFY_ENV) == "1":
            _verify_rows(jobs, _JOB_ROW, "job")
            _verify_rows(cursors, _CURSOR_ROW, "cursor")
        parts = [
            b'{"schema_version":',
            _dumps(SCHEMA_VERSION),
            b',"created_at":',
            _dumps(ledger.created_at),
            b',"jobs":{"columns":',
            _JOB_COLUMNS_JSON,
            b',"rows":[\n',
        ]
        _add_rows(parts, _cached_rows(jobs, _JOB_ROW))
        parts.append(_CURSORS_OPEN)
        _add_rows(parts, _cached_rows(cursors, _CURSOR_ROW))
        parts += [
            _TABLES_END,
            _dumps([m.to_json() for m in ledger.outbox]),
            b',"intents":',
            _dumps({k: i.to_json() for k, i in ledger.intents.items()}),
            b',"resubmit":',
            _dumps(ledger.resubmit.to_json()),
            b',"health":',
            _dumps(ledger.health.to_json()),
            b"}",
        ]
        return parts


# ~1 MB per part with typical rows: big enough that the write count does not matter,
# small enough to stay in cache while it is copied.
_ROWS_PER_PART = 2048


def _dumps(obj: Any) -> bytes:
    if _orjson is not None:
        try:
            return _orjson.dumps(obj)
        except TypeError:  # e.g. an int beyond 64 bits; the stdlib copes
            pass
    return _dumps_stdlib(obj)


def _dumps_stdlib(obj: Any) -> bytes:
    # Compact separators: the file is for machines; `status --json` is the human view.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


_JOB_COLUMNS_JSON = _dumps(_JOB_FIELDS)
_CURSOR_COLUMNS_JSON = _dumps(_CURSOR_FIELDS)
_set_row = object.__setattr__  # stores the cache without invalidating it

# The table layout ``encode_ledger_parts`` writes and ``_seed_rows`` expects.
# The comma between rows gets a line of its own: splitting the file on newlines then
# yields each row's exact bytes (no trailing comma to cut off, which would copy every
# row again and leave the first copies as a 60 MB hole in the heap), and the comma
# lines are the interpreter's shared one-byte object.
_ROW_SEP = b"\n,\n"
_JOBS_OPEN = b',"jobs":{"columns":' + _JOB_COLUMNS_JSON + b',"rows":[\n'
_CURSORS_OPEN = b']},"cursors":{"columns":' + _CURSOR_COLUMNS_JSON + b',"rows":[\n'
_TABLES_END = b']},"outbox":'
# Rows orjson refuses (an int beyond 64 bits) are encoded by the stdlib and start with
# this space. They must not be seeded at load: orjson reads such an int back as a float,
# and the stdlib writes floats differently (``1e+16``, orjson ``1e16``), so the line is
# not what encoding the loaded record gives. The space is JSON whitespace.
_STDLIB_MARK = b" "


def _encode_row(value: Any) -> bytes:
    """One table row's bytes, as cached in ``_row`` and written on its own line."""
    if _orjson is not None:
        try:
            # orjson returns a 1 KB buffer shrunk in place; 100k of those kept as the
            # cache would hold ~1 KB each (2.7x the bytes): an exact-size copy does not
            return memoryview(_orjson.dumps(value)).tobytes()
        except TypeError:  # e.g. an int beyond 64 bits; the stdlib copes
            pass
    return _STDLIB_MARK + _dumps_stdlib(value)


def _cached_rows(records: Iterable[Any], getter: Callable[[Any], Any]) -> list[bytes]:
    """Each record's row: its cached ``_row``, or encoded now and cached."""
    recs = records if isinstance(records, list) else list(records)
    rows: list[Any] = [rec._row for rec in recs]
    missing = [i for i, row in enumerate(rows) if row is None]
    for i in missing:
        rec = recs[i]
        row = _encode_row(getter(rec))
        _set_row(rec, "_row", row)
        rows[i] = row
    return rows


def _add_rows(parts: list[bytes], rows: list[bytes]) -> None:
    step = _ROWS_PER_PART
    for start in range(0, len(rows), step):
        if start:
            parts.append(_ROW_SEP)
        parts.append(_ROW_SEP.join(rows[start : start + step]))
    if rows:
        parts.append(b"\n")


def _verify_rows(records: Iterable[Any], getter: Callable[[Any], Any], what: str) -> None:
    for rec in records:
        cached = rec._row
        if cached is None:
            continue
        fresh = _encode_row(getter(rec))
        if fresh != cached:
            name = rec.key if what == "job" else rec.path
            msg = (
                f"stale cached ledger row for {what} {name!r}: a field was changed in place "
                f"(assign a new object instead); cached {cached!r}, now {fresh!r}"
            )
            stale_rows_seen.append(msg)
            raise AssertionError(msg)


def _seed_rows(raw: bytes, jobs: list[Any] | None, cursors: list[Any] | None) -> None:
    """Give the loaded records their line of ``raw`` as the cached ``_row``.

    ``raw`` parsed into ``jobs`` and ``cursors`` (None: a table not to seed, its rows
    were not positional in the current columns; no jobs, nothing seeded). Only a file
    laid out exactly as ``encode_ledger_parts`` writes it is used: both table headers,
    then per table one line per parsed row, every row line ``[...]``, a ``,`` line
    between rows. Anything else (a file from before rows had their own lines, a
    hand-edited one) seeds nothing for the table, which only costs a full encode at
    the next save. Never raises for data.
    """
    if jobs is None:  # the cursors' lines are found by counting the jobs'
        return
    lines = raw.split(b"\n")
    j_end = 1 + _table_lines(len(jobs))
    if (
        not lines[0].endswith(_JOBS_OPEN[:-1])
        or j_end >= len(lines)
        or lines[j_end] != _CURSORS_OPEN[:-1]
        or not lines[-1].startswith(_TABLES_END)
    ):
        return
    if jobs:
        _seed_table(jobs, lines[1:j_end])
    if cursors and len(lines) == j_end + 1 + _table_lines(len(cursors)) + 1:
        _seed_table(cursors, lines[j_end + 1 : -1])


def _table_lines(rows: int) -> int:
    return max(0, 2 * rows - 1)  # a line per row and a comma line between two


def _seed_table(records: list[Any], lines: list[bytes]) -> None:
    """``lines``: the table's lines, ``<row>``, ``,``, ``<row>``, one row per record.

    All checks run before any row is stored, with ``map`` over C methods (a Python loop
    over 100k rows costs more than the rest of the seeding).
    """
    rows = lines[::2]
    commas = lines[1::2]
    if (
        len(rows) != len(records)
        or commas.count(b",") != len(commas)
        or not all(map(bytes.endswith, rows, repeat(b"]")))
    ):
        return
    # the slot itself: object.__setattr__ by name would double the time
    slot = type(records[0]).__dict__.get("_row")
    if slot is None:  # pragma: no cover - the loader builds the slotted bases
        return
    if all(map(bytes.startswith, rows, repeat(b"["))):
        deque(map(slot.__set__, records, rows), maxlen=0)
        return
    if not all(map(bytes.startswith, rows, repeat((b"[", _STDLIB_MARK + b"[")))):
        return
    for rec, row in zip(records, rows, strict=True):
        if row.startswith(b"["):  # not the stdlib's (marked) rows
            slot.__set__(rec, row)


def _loads(raw: bytes) -> Any:
    if _orjson is not None:
        return _orjson.loads(raw)
    return json.loads(raw)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Building or dropping ~100k small containers triggers many useless cyclic-GC passes
    (nothing here forms cycles); pausing it makes load/save about twice as fast."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_ledger(path: Path | str) -> Ledger:
    """Read-only view for `status`: no lock, never writes or moves files.

    A missing file is an empty ledger; a corrupt one falls back to ``.prev`` and then to
    empty (the daemon, not a reader, moves it aside). A newer schema raises LedgerTooNew.
    """
    path = Path(path)
    for candidate in (path, _prev_path(path)):
        try:
            raw = candidate.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise LedgerError(f"cannot read ledger {candidate}: {exc.strerror}") from exc
        try:
            ledger, _ = parse_ledger(raw, str(candidate), seed_rows=False)  # never saved
        except LedgerTooNew:
            raise
        except LedgerCorrupt:
            continue
        ledger.dirty = False
        return ledger
    ledger = Ledger.empty()
    ledger.dirty = False
    return ledger


def _prev_path(path: Path) -> Path:
    return path.with_name(path.name + PREV_SUFFIX)


# --- retention ---------------------------------------------------------------------------


def _older_than(stamp: str | None, cutoff: datetime, cutoff_text: str) -> bool | None:
    """``stamp < cutoff``; None when there is no usable stamp.

    Stamps written by ``iso()`` compare correctly as strings, which keeps retention over
    100k records cheap; anything else is parsed.
    """
    if not stamp:
        return None
    if len(stamp) == 25 and stamp.endswith("+00:00"):
        return stamp < cutoff_text
    dt = parse_iso(stamp)
    return None if dt is None else dt < cutoff


def apply_retention(
    ledger: Ledger,
    now: datetime,
    retention_days: float,
    *,
    file_exists: Callable[[str], bool] = os.path.exists,
) -> int:
    """Drop what the daemon no longer needs; returns how many items were removed.

    Whole lineages (original + retries) go together, and only when every member is
    finished, older than the retention period, not awaiting a resubmission, not part
    of an unsettled submit intent and not reported by an undelivered message — so the
    attempt cap and recovery follow-ups never see half a lineage.
    """
    cutoff = now - timedelta(days=retention_days)
    cutoff_text = iso(cutoff)
    removed = 0

    pinned: set[str] = set()
    for msg in ledger.outbox:
        if msg.state not in OUTBOX_DONE_STATES:
            pinned.update(msg.job_keys)
    for intent in ledger.intents.values():
        if intent.state not in INTENT_DONE_STATES:
            pinned.update(intent.task_keys)

    # origin key -> True when some member of the lineage must stay
    lineage_keep: dict[str, bool] = {}
    for rec in ledger.jobs.values():
        origin = rec.origin or rec.key
        if lineage_keep.get(origin):
            continue
        keep = (
            rec.outcome == "running"
            or rec.resubmit == "pending"
            or rec.key in pinned
            or _older_than(
                rec.finished_at or rec.updated_at or rec.first_seen_at, cutoff, cutoff_text
            )
            is not True
        )
        lineage_keep[origin] = keep
    doomed = [k for k, r in ledger.jobs.items() if not lineage_keep[r.origin or r.key]]
    for key in doomed:
        del ledger.jobs[key]
    removed += len(doomed)

    gone_cursors = []
    for path, cur in ledger.cursors.items():
        if cur.key in ledger.jobs:
            continue
        old = cur.mtime_ns and cur.mtime_ns < cutoff.timestamp() * 1e9
        if (cur.done and old) or not file_exists(path):
            gone_cursors.append(path)
    for path in gone_cursors:
        del ledger.cursors[path]
    removed += len(gone_cursors)

    threaded = {m.thread_of for m in ledger.outbox if m.thread_of}
    kept_msgs = []
    for msg in ledger.outbox:
        if msg.state in OUTBOX_DONE_STATES and msg.dedup_key not in threaded:
            if _older_than(msg.sent_at or msg.created_at, cutoff, cutoff_text):
                continue
        kept_msgs.append(msg)
    removed += len(ledger.outbox) - len(kept_msgs)
    ledger.outbox = kept_msgs

    old_intents = []
    for intent_id, intent in ledger.intents.items():
        if intent.state not in INTENT_DONE_STATES:
            continue
        if _older_than(intent.submitted_at or intent.created_at, cutoff, cutoff_text) and not any(
            k in ledger.jobs for k in intent.task_keys
        ):
            old_intents.append(intent_id)
    for intent_id in old_intents:
        del ledger.intents[intent_id]
    removed += len(old_intents)

    hour_ago = now - SUBMISSION_TIMES_KEEP
    times = ledger.resubmit.submission_times
    recent = [t for t in times if (ts := parse_iso(t)) is not None and ts >= hour_ago]
    removed += len(times) - len(recent)
    if len(recent) != len(times):
        ledger.resubmit.submission_times = recent

    if removed:
        ledger.mark_dirty()
    return removed


# --- the store ---------------------------------------------------------------------------


class LedgerStore:
    """Owns ``ledger.json`` in the state folder: lock, load, atomic save.

    Use as a context manager for the daemon's lifetime; ``load``/``save`` take the lock
    themselves if it is not held yet.
    """

    def __init__(self, path: Path | str, *, retention_days: float = 14.0) -> None:
        self.path = Path(path)
        self.dir = self.path.parent
        self.prev_path = _prev_path(self.path)
        self.lock_path = self.dir / LOCK_NAME
        self.retention_days = retention_days
        self.warnings: list[str] = []
        # schema version the loaded file was written in (None = no file / fresh)
        self.loaded_schema: int | None = None
        self._lock_fd: int | None = None
        self._last_retention: datetime | None = None

    # lock ------------------------------------------------------------------------------

    def __enter__(self) -> LedgerStore:
        self.lock()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def lock(self) -> None:
        if self._lock_fd is not None:
            return
        self._ensure_dir()
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise LedgerError(f"cannot open lock file {self.lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder else "unknown pid"
                raise LedgerLocked(
                    f"another slurm-triage daemon ({who}) is using {self.dir}"
                ) from exc
            raise LedgerError(
                f"cannot lock {self.lock_path}: {exc.strerror}; "
                "put state_dir on a local filesystem that supports locks"
            ) from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is informational only; the flock is what excludes
        self._lock_fd = fd

    def close(self) -> None:
        """Release the lock. The lock file stays: deleting it would race a new locker."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _ensure_dir(self) -> None:
        if self.dir.is_dir():
            return
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask; the ledger holds job details, keep it private
            os.chmod(self.dir, 0o700)
        except OSError as exc:
            raise LedgerError(f"cannot create state folder {self.dir}: {exc.strerror}") from exc

    # load ------------------------------------------------------------------------------

    def load(self) -> Ledger:
        """Load the ledger (locking first). Never raises for bad data except a newer schema."""
        self.lock()
        raw = self._read(self.path)
        if raw is None:
            prev = self._read(self.prev_path)
            if prev is not None:
                ledger = self._try_prev(f"{self.path} is missing")
                if ledger is not None:
                    return ledger
            self.loaded_schema = None
            return Ledger.empty()
        try:
            ledger, version = parse_ledger(raw, str(self.path))
        except LedgerCorrupt as exc:
            moved = self._move_aside(self.path)
            reason = f"{exc}; moved aside to {moved.name}"
            ledger_or_none = self._try_prev(reason)
            if ledger_or_none is not None:
                return ledger_or_none
            self.warnings.append(
                f"ledger corrupt: {reason}; no usable previous copy, starting empty"
            )
            self.loaded_schema = None
            return Ledger.empty()
        self.loaded_schema = version
        # A migrated ledger is rewritten in the current schema at the next save.
        ledger.dirty = version != SCHEMA_VERSION
        return ledger

    def _try_prev(self, reason: str) -> Ledger | None:
        raw = self._read(self.prev_path)
        if raw is None:
            return None
        try:
            ledger, version = parse_ledger(raw, str(self.prev_path))
        except LedgerCorrupt as exc:
            moved = self._move_aside(self.prev_path)
            self.warnings.append(
                f"ledger corrupt: {reason}; previous copy also unusable ({exc}), moved aside to "
                f"{moved.name}; starting empty"
            )
            return None
        self.warnings.append(
            f"ledger corrupt: {reason}; recovered from the previous copy {self.prev_path.name} "
            "(changes of the last tick may be repeated)"
        )
        self.loaded_schema = version
        ledger.dirty = True
        return ledger

    def _read(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except IsADirectoryError as exc:
            raise LedgerError(f"ledger path {path} is a folder") from exc
        except OSError as exc:
            raise LedgerError(f"cannot read ledger {path}: {exc.strerror}") from exc

    def _move_aside(self, path: Path) -> Path:
        stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
        target = path.with_name(f"{path.name}{CORRUPT_INFIX}{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}{CORRUPT_INFIX}{stamp}.{n}")
        try:
            os.replace(path, target)
        except OSError as exc:
            raise LedgerError(
                f"ledger {path} is corrupt and cannot be moved aside: {exc.strerror}"
            ) from exc
        return target

    # save ------------------------------------------------------------------------------

    def save(self, ledger: Ledger, *, now: datetime | None = None) -> bool:
        """Write the ledger atomically if it changed. Returns whether a write happened.

        On failure (read-only folder, full disk) raises LedgerError; the previous file is
        untouched and the ledger stays dirty so the next save retries.
        """
        if not ledger.dirty:
            return False
        self.lock()
        now = now or utcnow()
        last = self._last_retention
        if last is None or now - last >= RETENTION_INTERVAL or now < last:
            apply_retention(ledger, now, self.retention_days)
            self._last_retention = now
        parts = encode_ledger_parts(ledger)
        self._cleanup_temp_files()
        tmp = self.dir / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_parts(fd, parts)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._keep_previous()
            crash_point("ledger.before_rename")
            os.replace(tmp, self.path)
            crash_point("ledger.after_rename")
            _fsync_dir(self.dir)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise LedgerError(
                f"cannot save ledger {self.path}: {exc.strerror or exc}; the previous copy is kept"
            ) from exc
        ledger.dirty = False
        return True

    def _keep_previous(self) -> None:
        """Make ``ledger.json.prev`` the current file, without a moment where neither exists."""
        try:
            current = self.path.stat()
        except FileNotFoundError:
            return
        try:
            prev = self.prev_path.stat()
            if (prev.st_dev, prev.st_ino) == (current.st_dev, current.st_ino):
                # already linked (a crash after this step last time); rename() would be a
                # no-op that leaves the staging link behind
                return
        except FileNotFoundError:
            pass
        staging = self.dir / f"{TMP_PREFIX}prev-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.link(self.path, staging)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # no hard links here (some network filesystems): copy instead
            data = self.path.read_bytes()
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(staging, self.prev_path)

    def _cleanup_temp_files(self) -> None:
        """Temp files left by a crash mid-save; only ours (we hold the lock)."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for name in names:
            if name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(self.dir / name)

    def stale_temp_files(self) -> list[Path]:
        return sorted(p for p in self.dir.glob(f"{TMP_PREFIX}*"))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _iov_max() -> int:
    try:
        return max(1, os.sysconf("SC_IOV_MAX"))
    except (ValueError, OSError):  # pragma: no cover - every Linux has it
        return 16  # POSIX's minimum


_IOV_MAX = _iov_max()


def _write_parts(fd: int, parts: Sequence[bytes]) -> None:
    """Write ``parts`` in order with ``writev``, at most IOV_MAX buffers per call.

    A short write (a signal, a full disk that frees up, a quota) resumes exactly after
    the last byte written: the buffers written whole are skipped and the one cut in
    the middle continues from its offset.
    """
    pending: list[memoryview | bytes] = [p for p in parts if p]
    i = 0
    while i < len(pending):
        batch = pending[i : i + _IOV_MAX]
        n = os.writev(fd, batch)
        if n <= 0:  # pragma: no cover - a regular file either progresses or raises
            raise OSError(errno.EIO, "write made no progress")
        for buf in batch:
            size = len(buf)
            if n >= size:
                n -= size
                i += 1
                continue
            # cut in the middle (n may be 0): the rest of this buffer goes next
            pending[i] = memoryview(buf)[n:]
            break


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        # some filesystems refuse fsync on a directory; the rename is still atomic there
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Ledger",
    "LedgerStore",
    "apply_retention",
    "encode_ledger",
    "iso",
    "migrate",
    "parse_iso",
    "parse_ledger",
    "read_ledger",
    "utcnow",
]
