"""The daemon: APScheduler wiring, signals, systemd notify/watchdog, and the tick.

One tick = poll (one sacct, one squeue) → read new log bytes → classify what finished →
resubmit → notify → save the ledger once (if anything changed). A tick never raises:
everything that goes wrong is recorded in ``ledger.health`` and the next tick retries.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EXIT_FAILURE, EXIT_OK, LedgerError, SlurmError, TriageError
from .faults import crash_point
from .model import ACTIVE_STATES, Outcome, SacctRow, SqueueRow, TaskKey
from .records import Health, JobRecord, LogCursor
from .timeutil import iso_or_none as iso
from .timeutil import parse_iso, utcnow

if TYPE_CHECKING:
    from .ledger import Ledger, LedgerStore
    from .settings import Settings
    from .slurm import SlurmRunner

Clock = Callable[[], datetime]

# a job seen active that then disappears from both sacct and squeue for this long is "vanished"
_VANISH_AFTER = timedelta(hours=2)


# ---------------------------------------------------------------------------------------
# tick


@dataclass
class TickReport:
    started_at: datetime
    finished_at: datetime | None = None
    sacct_rows: int | None = None
    squeue_rows: int | None = None
    files_seen: int = 0
    files_read: int = 0
    bytes_read: int = 0
    classified: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    saved: bool = False
    ledger_unwritable: bool = False
    resubmit: Any = None
    delivery: Any = None

    @property
    def duration_s(self) -> float:
        end = self.finished_at or self.started_at
        return (end - self.started_at).total_seconds()


@dataclass
class TickContext:
    settings: Settings
    store: LedgerStore
    ledger: Ledger
    runner: SlurmRunner
    user: str
    clock: Clock = utcnow
    table: Any = None  # classify.SignatureTable, built lazily
    walker: Any = None  # logs.LogWalker, kept across ticks for its name cache

    def log_walker(self) -> Any:
        if self.walker is None:
            from .logs import LogWalker

            self.walker = LogWalker(self.settings.analyze)
        return self.walker

    def signature_table(self) -> Any:
        if self.table is None:
            from .classify import build_table

            self.table = build_table(self.settings.classify)
        return self.table


def _slurm_anchor(rows: list[SacctRow], previous: datetime | None) -> datetime | None:
    """The latest time Slurm itself reported: where the next sacct window starts.

    Anchored on the controller's clock, not ours: if the login node's clock runs ahead,
    ``sacct -S <our now>`` would ask Slurm for its future and miss every job that ends
    meanwhile. Never moves backwards; unchanged when Slurm reported nothing.
    """
    latest = previous
    for row in rows:
        # only times that have happened: a pending job's Start can be a forecast
        # (--begin), which would push the window into the future
        seen = [row.submit, row.end if row.finished else None]
        if row.state == "RUNNING":
            seen.append(row.start)
        for ts in seen:
            if ts is not None and (latest is None or ts > latest):
                latest = ts
    return latest


def _sacct_window_start(health: Health, settings: Settings, now: datetime) -> datetime:
    last = parse_iso(health.sacct_window_start)
    if last is None:
        return now - timedelta(seconds=settings.watch.initial_lookback_s)
    # a clock that jumped backwards must not make the window start in the future
    return min(last, now) - timedelta(seconds=settings.watch.sacct_overlap_s)


def tick(ctx: TickContext) -> TickReport:
    """One poll-classify-act-save cycle. Never raises for operational trouble."""
    from .slurm import query_sacct, query_squeue

    settings, ledger = ctx.settings, ctx.ledger
    now = ctx.clock()
    report = TickReport(started_at=now)
    health = ledger.health
    health.last_tick_started_at = iso(now)

    # 1. poll: one sacct, one squeue
    window_start = _sacct_window_start(health, settings, now)
    rows: list[SacctRow] | None = None
    try:
        rows = query_sacct(ctx.runner, settings.slurm, user=ctx.user, start=window_start)
        report.sacct_rows = len(rows)
        if health.consecutive_sacct_failures:
            health.consecutive_sacct_failures = 0
            health.sacct_alert_sent = False
    except SlurmError as exc:
        health.consecutive_sacct_failures += 1
        report.errors.append(f"sacct: {exc}")
    crash_point("tick.after_sacct")
    queue: list[SqueueRow] | None = None
    try:
        queue = query_squeue(ctx.runner, settings.slurm, user=ctx.user)
        report.squeue_rows = len(queue)
        health.consecutive_squeue_failures = 0
    except SlurmError as exc:
        health.consecutive_squeue_failures += 1
        report.errors.append(f"squeue: {exc}")

    # 2. submissions whose id a crash kept us from recording
    if rows is not None or queue is not None:
        _safe(report, "reconcile", lambda: _reconcile(ctx, rows or [], queue or [], now))

    # 3. new log bytes (cheap when nothing changed: stat only)
    _safe(report, "logs", lambda: _scan_logs(ctx, report))

    # 4. classify what finished
    active: set[TaskKey] = {q.key for q in queue or [] if q.state in ACTIVE_STATES}
    if rows is not None:
        _safe(report, "classify", lambda: _classify_finished(ctx, rows, active, now, report))
        _mark_vanished(ctx, rows, queue, now)
        # advance the window only after a successful sacct: a failing tick re-asks next time.
        # Not a reason to rewrite the ledger: the heartbeat carries it between saves.
        anchor = _slurm_anchor(rows, parse_iso(health.sacct_window_start))
        if anchor is not None:
            health.sacct_window_start = iso(anchor)

    # 5. act: resubmit, then notify (the digest says what resubmission did)
    save = _saver(ctx, report)
    _safe(report, "resubmit", lambda: _resubmit(ctx, now, save, report))
    _safe(report, "notify-enqueue", lambda: _enqueue(ctx, now, report))

    # 6. save once (only if something changed) before the possibly slow delivery
    health.last_tick_errors = list(report.errors)
    health.ticks += 1
    save()
    _safe(report, "notify-deliver", lambda: _deliver(ctx, now, save, report))
    save()
    report.finished_at = ctx.clock()
    health.last_tick_errors = list(report.errors)
    health.last_tick_finished_at = iso(report.finished_at)
    health.last_tick_duration_s = round(report.duration_s, 3)
    _write_heartbeat(ctx.store.path.parent, health, report)
    return report


HEARTBEAT_NAME = "health.json"


def _write_heartbeat(state_dir: Path, health: Health, report: TickReport) -> None:
    """A small file rewritten every tick, so an unchanged ledger is never rewritten.

    It carries what ``status`` shows about the last tick and the sacct window; losing it
    costs nothing but a wider sacct window after a restart.
    """
    from .fsutil import atomic_write

    path = state_dir / HEARTBEAT_NAME
    try:
        atomic_write(
            path, json.dumps(health.to_json(), separators=(",", ":")).encode(), fsync=False
        )
    except OSError as exc:
        report.errors.append(f"heartbeat: cannot write {path}: {exc.strerror or exc}")


def read_heartbeat(state_dir: Path) -> Health | None:
    try:
        data = json.loads((state_dir / HEARTBEAT_NAME).read_bytes())
        return Health.from_json(data) if isinstance(data, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def _merge_heartbeat(health: Health, beat: Health | None) -> Health:
    """Prefer the heartbeat when it is newer than the health saved in the ledger."""
    if beat is None:
        return health
    saved = parse_iso(health.last_tick_started_at)
    newer = parse_iso(beat.last_tick_started_at)
    # on a tie the heartbeat wins: a tick writes it after its last ledger save
    if newer is not None and (saved is None or newer >= saved):
        # counters that drive alerts live in the ledger; keep the larger
        beat.consecutive_sacct_failures = max(
            beat.consecutive_sacct_failures, health.consecutive_sacct_failures
        )
        beat.sacct_alert_sent = beat.sacct_alert_sent or health.sacct_alert_sent
        beat.last_daily_summary_on = health.last_daily_summary_on or beat.last_daily_summary_on
        return beat
    return health


def _safe(report: TickReport, stage: str, fn: Callable[[], object]) -> None:
    """A failing stage is recorded; the tick goes on and the next tick tries again."""
    try:
        fn()
    except TriageError as exc:
        report.errors.append(f"{stage}: {exc}")
    except Exception as exc:  # a bug must not kill a daemon users forget about
        from .logsetup import get_logger

        get_logger("slurm_triage.tick").exception("tick stage crashed", stage=stage)
        report.errors.append(f"{stage}: internal error: {type(exc).__name__}: {exc}")


def _saver(ctx: TickContext, report: TickReport) -> Callable[[], None]:
    def save() -> None:
        try:
            # the tick's clock, not the wall's: retention must follow the time the tick uses
            if ctx.store.save(ctx.ledger, now=ctx.clock()):
                report.saved = True
        except LedgerError as exc:
            report.ledger_unwritable = True
            msg = f"ledger: {exc}"
            if msg not in report.errors:
                report.errors.append(msg)

    return save


def _reconcile(
    ctx: TickContext, rows: list[SacctRow], queue: list[SqueueRow], now: datetime
) -> None:
    from . import resubmit

    resubmit.reconcile(ctx.ledger, rows, queue, now)


def _resubmit(
    ctx: TickContext, now: datetime, save: Callable[[], None], report: TickReport
) -> None:
    from . import resubmit

    report.resubmit = resubmit.process_tick(ctx.ledger, ctx.settings, ctx.runner, now, save)


def _enqueue(ctx: TickContext, now: datetime, report: TickReport) -> None:
    from . import notify

    notify.enqueue(ctx.ledger, ctx.settings, now, report)


def _deliver(ctx: TickContext, now: datetime, save: Callable[[], None], report: TickReport) -> None:
    if ctx.settings.slack.mode == "off":
        return
    from . import notify

    report.delivery = notify.deliver(ctx.ledger, ctx.settings, now, save)


# --- logs ------------------------------------------------------------------------------


def _scan_logs(ctx: TickContext, report: TickReport) -> None:
    """Walk every log folder; read only the new bytes of files whose job is still open.

    A file whose job was classified is not even stat'ed, so a quiet tree of 100,000 logs
    costs a directory listing and a dict lookup per file.
    """
    from .logs import advance_cursor

    ledger = ctx.ledger
    table = ctx.signature_table()
    walker = ctx.log_walker()
    watch = ctx.settings.watch
    horizon_s = max(watch.retention_days * 86400, watch.initial_lookback_s)
    oldest_ns = int((ctx.clock().timestamp() - horizon_s) * 1e9)
    cursors = ledger.cursors
    for log_dir in watch.log_dirs:
        warnings: list[str] = []
        try:
            for path_s, entry in walker.walk(Path(log_dir).expanduser(), warnings):
                report.files_seen += 1
                cursor = cursors.get(path_s)
                if cursor is not None and cursor.done:
                    continue
                try:
                    st = entry.stat()
                except OSError:
                    continue  # deleted since the listing
                if not stat.S_ISREG(st.st_mode):
                    continue
                if cursor is None:
                    key = walker.key_of(entry.name)
                    if key is None or st.st_mtime_ns < oldest_ns:
                        # not a job log; or older than anything we track (retention
                        # dropped it): don't revive it
                        continue
                    cursor = LogCursor(path=path_s, key=str(key))
                    cursors[path_s] = cursor
                    ledger.mark_dirty()
                elif (
                    cursor.offset
                    and st.st_size == cursor.size
                    and st.st_mtime_ns == cursor.mtime_ns
                    and st.st_ino == cursor.inode
                ):
                    continue  # unchanged since the last tick: read nothing
                try:
                    _findings, read = advance_cursor(cursor, table)
                except OSError as exc:
                    report.errors.append(f"logs: cannot read {path_s}: {exc.strerror or exc}")
                    continue
                if read.bytes_read or read.restarted:
                    report.files_read += 1
                    report.bytes_read += read.bytes_read
                    ledger.mark_dirty()
                crash_point("tick.mid_scan")
        except TriageError as exc:
            report.errors.append(f"logs: {exc}")
        report.errors.extend(f"logs: {w}" for w in warnings[:5])


def _logs_index(ledger: Ledger) -> dict[str, list[LogCursor]]:
    index: dict[str, list[LogCursor]] = {}
    for cursor in ledger.cursors.values():
        index.setdefault(cursor.key, []).append(cursor)
    return index


# --- classification --------------------------------------------------------------------


def _classify_finished(
    ctx: TickContext,
    rows: list[SacctRow],
    active: set[TaskKey],
    now: datetime,
    report: TickReport,
) -> None:
    from . import resubmit
    from .classify import LogScanner, decide
    from .slurm import is_placeholder

    settings, ledger = ctx.settings, ctx.ledger
    table = ctx.signature_table()
    index: dict[str, list[LogCursor]] | None = None

    def cursors_of(key: str) -> list[LogCursor]:
        # built on first need: most ticks judge nothing, and there may be 100k cursors
        nonlocal index
        if index is None:
            index = _logs_index(ledger)
        return index.get(key, [])

    retryable_types = settings.resubmit.retryable_types
    for row in rows:
        key = str(row.key)
        record = ledger.jobs.get(key)
        if record is None:
            record = JobRecord(
                key=key,
                job_id=row.key.job_id,
                array_task=row.key.array_task,
                first_seen_at=iso(now),
            )
            ledger.jobs[key] = record
            ledger.mark_dirty()
        if record.classified_at is not None:
            # a requeued job runs again under the same id: classify its new run once more
            if not (row.state in ACTIVE_STATES and record.state != row.state):
                continue
            record.classified_at = None
            record.outcome = Outcome.RUNNING.value
            for cursor in cursors_of(key):
                # a requeue rewrites the log: read it again from the start
                cursor.done = False
                cursor.offset = 0
                cursor.scan_state = None
        _update_from_row(record, row)
        if not row.finished or row.key in active:
            if record.outcome != Outcome.RUNNING.value or record.state != row.state:
                record.outcome = Outcome.RUNNING.value
                record.state = row.state
                ledger.mark_dirty()
            continue
        # 22.05 fills a short job's JobName/WorkDir seconds after its State
        if is_placeholder(row):
            first = parse_iso(record.incomplete_since)
            if first is None:
                record.incomplete_since = iso(now)
                ledger.mark_dirty()
                continue
            if (now - first).total_seconds() < settings.watch.incomplete_row_grace_s:
                continue
        cursors = cursors_of(key)
        findings = [
            (
                LogScanner.from_state(table, c.path, c.scan_state)
                if c.scan_state
                else LogScanner(table, c.path)
            ).findings()
            for c in cursors
        ]
        verdict = decide(findings, row, settings.classify, retryable_types=retryable_types)
        record.state = row.state
        record.outcome = verdict.outcome.value
        record.error_type = verdict.error_type.value if verdict.error_type else None
        record.retryable = verdict.retryable
        record.hung = verdict.hung
        record.evidence = verdict.evidence.to_json() if verdict.evidence else None
        record.classified_at = iso(now)
        record.updated_at = iso(now)
        # name the .err in reports when there is one
        paths = sorted((c.path for c in cursors), key=lambda p: not p.endswith(".err"))
        record.log_file = paths[0] if paths else None
        _attach_config(settings, record)
        for c in cursors:
            c.done = True
            c.scan_state = None  # never read again: keep the ledger small
        ledger.mark_dirty()
        report.classified.append(key)
        resubmit.on_classified(ledger, record, settings, now)


def _update_from_row(record: JobRecord, row: SacctRow) -> None:
    from .slurm import PLACEHOLDER_JOB_NAME

    fields: dict[str, Any] = {
        "user": row.user or record.user,
        "exit_code": row.exit_code,
        "elapsed_s": row.elapsed_s,
        "total_cpu_s": row.total_cpu_s,
        "submitted_at": iso(row.submit) or record.submitted_at,
        "started_at": iso(row.start) or record.started_at,
    }
    if row.job_name not in ("", PLACEHOLDER_JOB_NAME):
        fields["job_name"] = row.job_name
    if row.work_dir:
        fields["work_dir"] = row.work_dir
    if row.submit_line:
        fields["submit_line"] = row.submit_line
    if row.finished:
        fields["finished_at"] = iso(row.end)
    # Every tick meets every running job again: set only what changed, so the record's
    # cached ledger row (dropped by any assignment) survives a tick that learns nothing.
    for name, value in fields.items():
        if getattr(record, name) != value:
            setattr(record, name, value)


def _attach_config(settings: Settings, record: JobRecord) -> None:
    """Map an array task to its experiment config, as analyze does."""
    if record.array_task is None or not settings.watch.results_dirs:
        return
    from .analyze import load_config

    candidates = [Path(p).expanduser() for p in settings.watch.results_dirs]
    if len(candidates) > 1:
        # several experiments: the one named in the job name, log path or working folder
        hay = " ".join(filter(None, [record.job_name, record.log_file or "", record.work_dir]))
        candidates = [c for c in candidates if c.name and c.name in hay][:1]
    for results_dir in candidates:
        problems: list[str] = []
        config_file, data, problem = load_config(results_dir, record.array_task, settings, problems)
        if config_file or problem:
            record.config_file = config_file or None
            record.config = {
                column: data.get(key)
                for column, key in settings.analyze.config_fields.items()
                if key in data
            }
            record.config_error = problem
            return


def _mark_vanished(
    ctx: TickContext, rows: list[SacctRow], queue: list[SqueueRow] | None, now: datetime
) -> None:
    """A job seen running that neither sacct nor squeue knows any more: record it."""
    if queue is None:
        return
    seen = {str(r.key) for r in rows} | {str(q.key) for q in queue}
    for record in ctx.ledger.jobs.values():
        if record.classified_at or record.key in seen or record.outcome != Outcome.RUNNING.value:
            continue
        last = parse_iso(record.updated_at) or parse_iso(record.first_seen_at)
        if last and now - last > _VANISH_AFTER:
            record.outcome = Outcome.UNKNOWN.value
            record.state = "VANISHED"
            record.classified_at = iso(now)
            record.evidence = {
                "text": "job vanished from sacct and squeue",
                "line_no": None,
                "source": "sacct",
            }
            ctx.ledger.mark_dirty()


# ---------------------------------------------------------------------------------------
# the service


def _make_context(settings: Settings, store: LedgerStore, ledger: Ledger) -> TickContext:
    from .slurm import SlurmRunner, current_user

    return TickContext(
        settings=settings,
        store=store,
        ledger=ledger,
        runner=SlurmRunner(),
        user=current_user(settings.slurm),
    )


def run_service(settings: Settings, *, once: bool) -> int:
    from .ledger import LedgerStore
    from .logsetup import configure_logging, get_logger
    from .sdnotify import SystemdNotifier

    configure_logging(settings.logging.level, settings.logging.format)
    log = get_logger("slurm_triage.service")
    store = LedgerStore(settings.ledger_path, retention_days=settings.watch.retention_days)
    with store:
        ledger = store.load()
        ledger.health = _merge_heartbeat(ledger.health, read_heartbeat(store.path.parent))
        for warning in store.warnings:
            log.warning("ledger", problem=warning)
            ledger.health.last_tick_errors.append(f"ledger: {warning}")
        ctx = _make_context(settings, store, ledger)
        if once:
            report = _logged_tick(ctx, log)
            return EXIT_OK if not report.errors else EXIT_FAILURE
        return _serve(ctx, log, SystemdNotifier())


def _logged_tick(ctx: TickContext, log: Any) -> TickReport:
    report = tick(ctx)
    log_method = log.warning if report.errors else log.info
    log_method(
        "tick",
        duration_s=round(report.duration_s, 3),
        sacct_rows=report.sacct_rows,
        squeue_rows=report.squeue_rows,
        files_read=report.files_read,
        classified=len(report.classified),
        errors=report.errors or None,
        saved=report.saved,
    )
    return report


def _serve(ctx: TickContext, log: Any, notifier: Any) -> int:
    from apscheduler.events import (
        EVENT_JOB_ERROR,
        EVENT_JOB_MAX_INSTANCES,
        EVENT_JOB_MISSED,
        JobExecutionEvent,
    )
    from apscheduler.schedulers.blocking import BlockingScheduler

    watch = ctx.settings.watch
    tick_lock = threading.Lock()
    last_ok = [time.monotonic()]
    stopping = threading.Event()

    def job() -> None:
        with tick_lock:
            if stopping.is_set():
                return
            report = _logged_tick(ctx, log)
            last_ok[0] = time.monotonic()
            failed = len(report.errors)
            notifier.status(
                f"last tick {report.started_at:%H:%M:%S}Z, {len(ctx.ledger.jobs)} jobs, "
                f"{failed} error(s)"
            )

    scheduler = BlockingScheduler(timezone=timezone.utc)

    def on_event(event: JobExecutionEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            log.warning("tick missed", scheduled=str(event.scheduled_run_time))
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            log.warning("tick skipped: previous tick still running")
        elif event.code == EVENT_JOB_ERROR:
            log.error("tick crashed", error=repr(event.exception))

    scheduler.add_listener(on_event, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES | EVENT_JOB_ERROR)
    scheduler.add_job(
        job,
        "interval",
        seconds=watch.interval_s,
        jitter=watch.jitter_s or None,
        max_instances=1,
        coalesce=True,
        misfire_grace_time=int(max(1, watch.misfire_grace_s)),
        next_run_time=datetime.now(timezone.utc),
        id="tick",
    )

    # the watchdog is fed only while ticks complete: a tick stuck for too long stops the
    # pings and systemd restarts us
    def watchdog_loop() -> None:
        assert notifier.watchdog_s
        stale_after = watch.interval_s * 3 + watch.jitter_s + 120
        while not stopping.wait(notifier.watchdog_s / 3):
            if time.monotonic() - last_ok[0] < stale_after:
                notifier.watchdog()

    if getattr(notifier, "watchdog_s", None):
        threading.Thread(target=watchdog_loop, name="watchdog", daemon=True).start()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stopping.set()
        notifier.stopping()
        threading.Thread(target=lambda: scheduler.shutdown(wait=True), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    notifier.ready(f"watching as {ctx.user}")
    log.info("started", pid=os.getpid(), interval_s=watch.interval_s, ledger=str(ctx.store.path))
    scheduler.start()
    # finish the tick in flight, then a final save
    with tick_lock:
        try:
            ctx.store.save(ctx.ledger)
        except LedgerError as exc:
            log.error("final save failed", error=str(exc))
            return EXIT_FAILURE
    log.info("stopped")
    return EXIT_OK


# ---------------------------------------------------------------------------------------
# status


@dataclass
class StatusResult:
    ledger_path: str
    daemon_running: bool | None
    jobs_watched: int
    jobs_active: int
    failures_last_day: dict[str, int]
    last_tick_started_at: str | None
    last_tick_finished_at: str | None
    last_tick_duration_s: float | None
    last_tick_errors: list[str]
    outbox_pending: int
    outbox_dead: int
    outbox_dead_errors: list[str]
    resubmit_paused: bool
    resubmit_paused_reason: str | None
    resubmit_pending_tasks: int
    resubmit_unresolved_intents: int

    exit_code: int = EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "ledger_path": self.ledger_path,
            "daemon_running": self.daemon_running,
            "jobs_watched": self.jobs_watched,
            "jobs_active": self.jobs_active,
            "failures_last_day": self.failures_last_day,
            "last_tick": {
                "started_at": self.last_tick_started_at,
                "finished_at": self.last_tick_finished_at,
                "duration_s": self.last_tick_duration_s,
                "errors": self.last_tick_errors,
            },
            "outbox": {
                "pending": self.outbox_pending,
                "dead": self.outbox_dead,
                "dead_errors": self.outbox_dead_errors,
            },
            "resubmit": {
                "paused": self.resubmit_paused,
                "paused_reason": self.resubmit_paused_reason,
                "pending_tasks": self.resubmit_pending_tasks,
                "unresolved_intents": self.resubmit_unresolved_intents,
            },
        }

    def render_text(self) -> str:
        running = {True: "running", False: "not running", None: "unknown"}[self.daemon_running]
        lines = [
            f"daemon: {running}   ledger: {self.ledger_path}",
            f"jobs watched: {self.jobs_watched} ({self.jobs_active} pending/running)",
        ]
        if self.last_tick_started_at:
            dur = (
                f" in {self.last_tick_duration_s:.2f}s"
                if self.last_tick_duration_s is not None
                else ""
            )
            lines.append(f"last tick: {self.last_tick_started_at}{dur}")
        else:
            lines.append("last tick: never")
        for err in self.last_tick_errors:
            lines.append(f"  error: {err}")
        if self.failures_last_day:
            parts = ", ".join(
                f"{n} {t}" for t, n in sorted(self.failures_last_day.items(), key=lambda kv: -kv[1])
            )
            lines.append(f"failures in the last 24 h: {parts}")
        else:
            lines.append("failures in the last 24 h: none")
        lines.append(
            f"slack outbox: {self.outbox_pending} pending, {self.outbox_dead} undeliverable"
        )
        for err in self.outbox_dead_errors:
            lines.append(f"  undeliverable: {err}")
        pause = f" — PAUSED: {self.resubmit_paused_reason}" if self.resubmit_paused else ""
        lines.append(
            f"resubmission: {self.resubmit_pending_tasks} task(s) waiting, "
            f"{self.resubmit_unresolved_intents} unresolved submission(s){pause}"
        )
        return "\n".join(lines)


def collect_status(settings: Settings, *, now: datetime | None = None) -> StatusResult:
    from .ledger import read_ledger

    now = now or utcnow()
    ledger = read_ledger(settings.ledger_path)
    ledger.health = _merge_heartbeat(ledger.health, read_heartbeat(settings.ledger_path.parent))
    day_ago = now - timedelta(days=1)
    failures: dict[str, int] = {}
    active = 0
    for record in ledger.jobs.values():
        if record.outcome in (Outcome.RUNNING.value, "pending"):
            active += 1
        if record.outcome == Outcome.FAILURE.value and record.error_type:
            finished = parse_iso(record.finished_at) or parse_iso(record.classified_at)
            if finished and finished >= day_ago:
                failures[record.error_type] = failures.get(record.error_type, 0) + 1
    pending = [m for m in ledger.outbox if m.state in ("pending", "sending")]
    dead = [m for m in ledger.outbox if m.state == "dead"]
    waiting = sum(1 for r in ledger.jobs.values() if r.resubmit == "pending")
    unresolved = sum(1 for i in ledger.intents.values() if i.state == "intent")
    health = ledger.health
    return StatusResult(
        ledger_path=str(settings.ledger_path),
        daemon_running=daemon_lock_held(settings.ledger_path),
        jobs_watched=len(ledger.jobs),
        jobs_active=active,
        failures_last_day=failures,
        last_tick_started_at=health.last_tick_started_at,
        last_tick_finished_at=health.last_tick_finished_at,
        last_tick_duration_s=health.last_tick_duration_s,
        last_tick_errors=list(health.last_tick_errors),
        outbox_pending=len(pending),
        outbox_dead=len(dead),
        outbox_dead_errors=sorted({m.last_error or "unknown error" for m in dead})[:5],
        resubmit_paused=ledger.resubmit.paused,
        resubmit_paused_reason=ledger.resubmit.paused_reason,
        resubmit_pending_tasks=waiting,
        resubmit_unresolved_intents=unresolved,
    )


def daemon_lock_held(ledger_path: Path) -> bool | None:
    """Whether a daemon holds the ledger lock (None when that cannot be told)."""
    import fcntl

    from .ledger import LOCK_NAME

    lock_path = ledger_path.parent / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
