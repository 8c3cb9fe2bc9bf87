"""The ledger's record types (the persisted data model).

Plain dataclasses whose fields are JSON-native values, so saving 100k records is a
cheap dict comprehension. ``ledger.py`` owns loading, saving, locking, migration and
retention; this module owns only the shapes. Field names are part of the on-disk
format: renaming one needs a schema migration in ``ledger.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

T = TypeVar("T")


def persisted_fields(cls: type[Any]) -> tuple[str, ...]:
    """The fields written to disk: every dataclass field but private caches (``_row``)."""
    return tuple(f.name for f in dataclasses.fields(cls) if not f.name.startswith("_"))


def _to_json(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in persisted_fields(type(obj))}


def _from_json(cls: type[T], data: dict[str, Any]) -> T:
    names = set(persisted_fields(cls))
    return cls(**{k: v for k, v in data.items() if k in names})


_set = object.__setattr__


class _RowCached:
    """Mixin for the tracking record classes: setting any persisted field drops ``_row``.

    ``_row`` is the record's cached JSON row (``ledger.encode_ledger`` fills it), so a
    save re-encodes only records changed since the last one. The mixin adds no slots:
    the plain base and the tracking class share a layout, and the loader builds plain
    records (whose dataclass ``__init__`` then stores without this Python-level hook)
    and switches their ``__class__``.

    In-place changes (``rec.config["x"] = 1``) bypass this: assign a new object instead.
    ``ledger.VERIFY_ROW_CACHE`` catches a stale row (the test suite turns it on).
    """

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        _set(self, name, value)
        if name != "_row":
            _set(self, "_row", None)

    if not TYPE_CHECKING:  # type checkers keep seeing the dataclass's own signature

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # The dataclass __init__ stores every field: run it as the plain base so
            # those stores skip the hook (a first tick may create 100k records), then
            # track. A new record has no cached row either way.
            tracked = type(self)
            base = tracked.__bases__[-1]
            _set(self, "__class__", base)
            try:
                base.__init__(self, *args, **kwargs)
            finally:
                _set(self, "__class__", tracked)


@dataclass(slots=True)
class JobRecordBase:
    """One job or array task the daemon has seen. Keyed by ``key`` ("123_4" or "123").

    Use ``JobRecord``; this untracked base exists so the loader can build 100k records
    without the per-field ``__setattr__`` hook (see ``_RowCached``).
    """

    key: str
    job_id: str  # array master id, or the plain job id
    array_task: int | None = None
    job_name: str = ""
    user: str = ""
    state: str = ""  # last sacct state seen (COMPLETED, FAILED, TIMEOUT, ...)
    outcome: str = "unknown"  # Outcome value; "running" until it finishes
    error_type: str | None = None  # ErrorType value when outcome == "failure"
    retryable: bool = False
    hung: bool = False
    evidence: dict[str, Any] | None = None  # Evidence.to_json()
    log_file: str | None = None
    config_file: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    config_error: str | None = None
    work_dir: str = ""
    submit_line: str = ""
    exit_code: int | None = None
    elapsed_s: int | None = None
    total_cpu_s: float | None = None
    submitted_at: str | None = None  # ISO 8601 UTC
    started_at: str | None = None
    finished_at: str | None = None
    first_seen_at: str | None = None
    classified_at: str | None = None  # set once; a classified job is never classified again
    # lineage: original task -> retry -> retry
    origin: str = ""  # key of the original task ("" = this record is the original)
    parent: str | None = None  # key of the task this one retried
    attempt: int = 1  # 1 = original run
    retried_as: str | None = None  # key of the task that retried this one
    # resubmission status: None, "pending", "submitted", "not_retryable", "disabled",
    # "cap_reached", "cannot_rebuild", "paused", "dry_run", "hung"
    resubmit: str | None = None
    resubmit_note: str = ""
    next_retry_at: str | None = None
    recovered_by: str | None = None  # key of the later successful attempt
    notified: bool = False  # included in a digest
    notified_recovery: bool = False
    incomplete_since: str | None = None  # first time a finished-but-incomplete row was seen
    updated_at: str | None = None
    # not persisted: the cached encoded row (``_RowCached``)
    _row: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def origin_key(self) -> str:
        return self.origin or self.key

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


class JobRecord(_RowCached, JobRecordBase):
    """The record everyone uses: a ``JobRecordBase`` that tracks its own changes."""

    __slots__ = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        return _from_json(cls, data)


@dataclass(slots=True)
class LogCursorBase:
    """Where the daemon stopped reading one log file, and the classifier state so far.

    Use ``LogCursor``; this untracked base is for the loader (see ``JobRecordBase``).
    """

    path: str
    key: str  # task key the file belongs to
    dev: int = 0
    inode: int = 0
    size: int = 0
    offset: int = 0
    mtime_ns: int = 0
    # classify.LogScanner state (JSON) so a grown file is read from ``offset`` only
    scan_state: dict[str, Any] | None = None
    done: bool = False  # its job was classified; no need to read it again
    # "<n>:<sha1 of the first n bytes>" (logs.py): a rewrite in place that regrew past
    # ``offset`` (a requeued job's log) is noticed although inode and size look fine
    head: str = ""
    # not persisted: the cached encoded row (``_RowCached``)
    _row: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


class LogCursor(_RowCached, LogCursorBase):
    """The cursor everyone uses: a ``LogCursorBase`` that tracks its own changes."""

    __slots__ = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LogCursor:
        return _from_json(cls, data)


@dataclass(slots=True)
class OutboxMessage:
    """A Slack message stored before it is sent. ``dedup_key`` is unique in the outbox."""

    dedup_key: str
    kind: str  # "digest", "alert", "followup", "daily", "test"
    created_at: str
    text: str  # plain-text fallback
    blocks: list[dict[str, Any]] = field(default_factory=list)
    thread_of: str | None = None  # dedup_key of the message to reply under (bot mode)
    state: str = "pending"  # "pending", "sending", "sent", "dead"
    attempts: int = 0
    next_attempt_at: str | None = None
    last_error: str | None = None
    sent_at: str | None = None
    slack_ts: str | None = None  # bot mode: the posted message's ts
    channel: str | None = None
    merged_from: list[str] = field(default_factory=list)  # dedup keys folded into this one
    job_keys: list[str] = field(default_factory=list)  # task keys this message reports

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutboxMessage:
        return _from_json(cls, data)


@dataclass(slots=True)
class SubmitIntent:
    """A resubmission recorded before sbatch runs (exactly-once protocol)."""

    intent_id: str  # also the tag given to sbatch (--comment) to find it after a crash
    created_at: str
    origin_job_id: str  # the job whose tasks are retried
    task_keys: list[str]  # keys of the failed tasks being retried
    array_spec: str | None  # "38-47,49%4" or None for a plain job
    argv: list[str]
    work_dir: str
    error_type: str
    attempt: int  # attempt number the new tasks will carry
    begin_delay_s: int = 0
    state: str = "intent"  # "intent", "submitted", "failed", "abandoned", "dry_run"
    new_job_id: str | None = None
    submitted_at: str | None = None
    error: str | None = None
    checks: int = 0  # how many times a restarted daemon looked for it in sacct

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SubmitIntent:
        return _from_json(cls, data)


@dataclass(slots=True)
class ResubmitState:
    paused: bool = False
    paused_reason: str | None = None
    paused_at: str | None = None
    submission_times: list[str] = field(default_factory=list)  # ISO; for the per-hour cap

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResubmitState:
        return _from_json(cls, data)


@dataclass(slots=True)
class Health:
    last_tick_started_at: str | None = None
    last_tick_finished_at: str | None = None
    last_tick_duration_s: float | None = None
    last_tick_errors: list[str] = field(default_factory=list)
    ticks: int = 0
    consecutive_sacct_failures: int = 0
    consecutive_squeue_failures: int = 0
    sacct_alert_sent: bool = False
    # sacct is asked from here (minus the overlap) on the next tick
    sacct_window_start: str | None = None
    last_daily_summary_on: str | None = None  # YYYY-MM-DD

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Health:
        return _from_json(cls, data)
