"""Opt-in resubmission: a pure retry policy and an exactly-once submit protocol.

Policy (``plan``): which failed tasks go back to Slurm, grouped one ``sbatch`` per
original job, with what delay (``--begin=now+N``) and resource changes. It reads the
ledger and never changes it; ``apply_plan`` writes its decisions.

Protocol (``execute``): intent saved → ``sbatch`` → new job id saved. The intent's id is
also the submission's tag (``--comment=slurm-triage:<id>``), so when a crash or an
``sbatch`` timeout leaves an intent without a job id, ``reconcile`` finds the job in
squeue/sacct instead of submitting it again. An unresolved intent blocks its tasks;
only after it was looked for in several ticks and a grace period is it abandoned and
the tasks planned again.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import SlurmError, SlurmParseError, SlurmTimeout, SubmitError, UsageError
from .faults import crash_point
from .model import NEVER_RETRYABLE, ErrorType, SacctRow, SqueueRow, compress_ranges
from .records import JobRecord, ResubmitState, SubmitIntent
from .settings import Settings, TypePolicy
from .submitline import (
    TAG_PREFIX,
    CannotRebuild,
    Exists,
    SubmitCommand,
    build_argv,
    escalate,
    format_mem,
    format_time_s,
    from_script_setting,
    match_script_setting,
    parse_mem_mib,
    parse_submit_line,
    parse_time_s,
)
from .timeutil import iso as _iso
from .timeutil import parse_iso as _parse_iso

if TYPE_CHECKING:
    from .slurm import Runner

# An intent whose sbatch outcome is unknown is looked for in this many ticks' squeue and
# sacct, and for at least this long, before it is declared abandoned and planned again.
# A job sbatch accepted is in squeue at once (pending), so two misses mean it never ran.
ABANDON_AFTER_CHECKS = 2
ABANDON_AFTER_S = 300.0

# record.resubmit values the policy may (re)decide. Terminal ones are absent:
# submitted, not_retryable, cap_reached, hung.
_OPEN_STATUSES: frozenset[str | None] = frozenset(
    {
        None,
        "pending",
        "deferred",
        "paused",
        "submit_failed",
        "disabled",
        "cannot_rebuild",
        "dry_run",
    }
)


class LedgerView(Protocol):
    jobs: dict[str, JobRecord]
    intents: dict[str, SubmitIntent]
    resubmit: ResubmitState

    def mark_dirty(self) -> None: ...


def _error_type(rec: JobRecord) -> ErrorType | None:
    try:
        return ErrorType(rec.error_type) if rec.error_type else None
    except ValueError:
        return None


def file_exists(path: str) -> bool:
    return Path(path).is_file()


# --- policy (pure) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    key: str
    status: str  # the record's new ``resubmit`` value
    note: str


@dataclass(frozen=True, slots=True)
class PlannedSubmission:
    """One sbatch call: failed tasks of one original job sharing one rebuilt command."""

    job_id: str
    task_keys: tuple[str, ...]
    array_spec: str | None  # "38-47,49%4"; None for a plain job
    command: SubmitCommand
    overrides: tuple[tuple[str, str], ...]
    begin_delay_s: int
    error_types: tuple[str, ...]
    attempt: int  # attempt number the new tasks carry
    notes: tuple[str, ...] = ()  # escalation remarks

    def argv(self, tag: str, sbatch: str = "sbatch") -> list[str]:
        return build_argv(
            self.command,
            tag=tag,
            sbatch=sbatch,
            array=self.array_spec,
            begin_delay_s=self.begin_delay_s,
            overrides=dict(self.overrides),
        )


@dataclass(slots=True)
class Plan:
    submissions: list[PlannedSubmission] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    pause_reason: str | None = None  # a billing failure asks to pause everything
    storm: bool = False


def backoff_delay_s(
    policy: TypePolicy, attempt: int, *, storm_factor: float, jitter: float, rng: random.Random
) -> int:
    """``base * 2**(attempt-1)`` capped at max_delay, times the storm factor, ± jitter."""
    delay: float = min(policy.base_delay_s * (2.0 ** max(0, attempt - 1)), policy.max_delay_s)
    delay *= storm_factor
    if jitter > 0:
        delay *= 1.0 + rng.uniform(-jitter, jitter)
    return max(0, round(delay))


def in_storm(jobs: Iterable[JobRecord], settings: Settings, now: datetime) -> bool:
    rs = settings.resubmit
    since = now - timedelta(seconds=rs.storm_window_s)
    count = 0
    for rec in jobs:
        if rec.outcome != "failure" or rec.error_type != ErrorType.RATE_LIMIT.value:
            continue
        stamp = _parse_iso(rec.finished_at or rec.classified_at)
        if stamp is not None and since <= stamp <= now:
            count += 1
    return count >= rs.storm_threshold


def rebuild_command(rec: JobRecord, settings: Settings, exists: Exists) -> SubmitCommand:
    """From SubmitLine+WorkDir, else the settings scripts table; raises CannotRebuild."""
    first: CannotRebuild | None = None
    if rec.submit_line.strip():
        try:
            return parse_submit_line(rec.submit_line, rec.work_dir, exists)
        except CannotRebuild as exc:
            first = exc
    entry = match_script_setting(rec.job_name, settings.resubmit.scripts)
    if entry is not None:
        return from_script_setting(entry, rec.work_dir, exists)
    if first is not None:
        raise first
    raise CannotRebuild("cannot rebuild the submit command (no SubmitLine, no scripts entry)")


def _escalation(
    rec: JobRecord, etype: ErrorType, policy: TypePolicy, cmd: SubmitCommand
) -> tuple[tuple[tuple[str, str], ...], str]:
    if policy.escalate_factor is None or policy.escalate_factor <= 1.0:
        return (), ""
    factor = policy.escalate_factor
    if etype is ErrorType.TIME_LIMIT:
        opt = cmd.option("time")
        try:
            current = parse_time_s(opt.value) if opt and opt.value else rec.elapsed_s
            ceiling = parse_time_s(policy.escalate_ceiling) if policy.escalate_ceiling else None
        except ValueError:
            return (), "time limit not escalated: unreadable --time or ceiling"
        if not current:
            return (), "time limit not escalated: the current limit is unknown"
        new = escalate(current, factor, ceiling)
        return (
            ("time", format_time_s(new)),
        ), f"--time {format_time_s(current)} → {format_time_s(new)}"
    if etype is ErrorType.OOM:
        name = next((n for n in ("mem", "mem-per-cpu", "mem-per-gpu") if cmd.option(n)), None)
        if name is None:
            return (), "memory not escalated: the submit command sets no --mem"
        value = cmd.option(name).value or ""  # type: ignore[union-attr]
        try:
            current = parse_mem_mib(value)
            ceiling = parse_mem_mib(policy.escalate_ceiling) if policy.escalate_ceiling else None
        except ValueError:
            return (), f"memory not escalated: unreadable --{name} or ceiling"
        new = escalate(current, factor, ceiling)
        return ((name, format_mem(new)),), f"--{name} {format_mem(current)} → {format_mem(new)}"
    return (), ""


def _job_matches(rec: JobRecord, jobs: Sequence[str]) -> bool:
    origin_job = rec.origin_key.split("_", 1)[0]
    return any(j in (rec.key, rec.job_id, origin_job, rec.origin_key) for j in jobs)


def plan(
    ledger: LedgerView,
    settings: Settings,
    now: datetime,
    rng: random.Random,
    *,
    user: str,
    exists: Exists = file_exists,
    types: Sequence[ErrorType] | None = None,
    jobs: Sequence[str] | None = None,
    manual: bool = False,
) -> Plan:
    """Decide, without side effects, what to resubmit and why not for the rest.

    ``manual`` = the ``resubmit`` command: ``resubmit.enabled`` does not apply and a
    type named with ``--type`` is allowed even when its policy is disabled (never a
    type in NEVER_RETRYABLE). Caps, pause and ownership always apply.
    """
    rs = settings.resubmit
    dry_run = rs.dry_run and not manual
    out = Plan()
    paused = ledger.resubmit.paused
    blocked = {k for it in ledger.intents.values() if it.state == "intent" for k in it.task_keys}
    candidates: list[tuple[JobRecord, ErrorType, TypePolicy]] = []
    for rec in sorted(ledger.jobs.values(), key=lambda r: r.key):
        if rec.outcome != "failure" or rec.recovered_by or rec.retried_as:
            continue
        if rec.resubmit not in _OPEN_STATUSES or rec.key in blocked:
            continue
        if dry_run and rec.resubmit == "dry_run":
            continue  # already reported what the daemon would do
        etype = _error_type(rec)
        if etype is ErrorType.BILLING:
            # Before any filter: a billing failure stops everything, whatever was asked.
            if not paused and out.pause_reason is None:
                ev = (rec.evidence or {}).get("text", "")
                out.pause_reason = f"billing failure in job {rec.key}" + (f": {ev}" if ev else "")
            out.decisions.append(
                Decision(
                    rec.key, "not_retryable", "billing: never resubmitted; resubmission paused"
                )
            )
            continue
        if jobs is not None and not _job_matches(rec, jobs):
            continue
        if types is not None and etype not in types:
            continue
        if etype is None or etype in NEVER_RETRYABLE:
            name = etype.value if etype else "unclassified"
            out.decisions.append(
                Decision(rec.key, "not_retryable", f"{name} failures are never resubmitted")
            )
            continue
        if rec.hung:
            out.decisions.append(
                Decision(
                    rec.key, "hung", "hung (CPU time ≈ 0 until the time limit): not resubmitted"
                )
            )
            continue
        if rec.user != user:
            owner = rec.user or "unknown"
            out.decisions.append(
                Decision(rec.key, "not_retryable", f"not resubmitted: owned by {owner}, not {user}")
            )
            continue
        policy = rs.types.get(etype)
        explicitly_asked = manual and types is not None and etype in types
        if policy is None or not (policy.enabled or explicitly_asked):
            out.decisions.append(
                Decision(rec.key, "disabled", f"not resubmitted: {etype.value} resubmission is off")
            )
            continue
        if not manual and not rs.enabled:
            out.decisions.append(
                Decision(rec.key, "disabled", "not resubmitted: resubmission is off")
            )
            continue
        if rec.attempt >= policy.max_attempts:
            out.decisions.append(
                Decision(
                    rec.key,
                    "cap_reached",
                    f"retry cap reached ({rec.attempt} of {policy.max_attempts} attempts)",
                )
            )
            continue
        candidates.append((rec, etype, policy))

    if paused or out.pause_reason is not None:
        reason = ledger.resubmit.paused_reason if paused else out.pause_reason
        for rec, _, _ in candidates:
            out.decisions.append(
                Decision(
                    rec.key,
                    "paused",
                    f"resubmission paused ({reason}); run: slurm-triage resubmit --resume",
                )
            )
        return out

    groups: dict[
        tuple[str, SubmitCommand, tuple[tuple[str, str], ...]],
        list[tuple[JobRecord, ErrorType, TypePolicy, str]],
    ] = {}
    for rec, etype, policy in candidates:
        try:
            cmd = rebuild_command(rec, settings, exists)
        except CannotRebuild as exc:
            out.decisions.append(Decision(rec.key, "cannot_rebuild", str(exc)))
            continue
        overrides, note = _escalation(rec, etype, policy, cmd)
        groups.setdefault((rec.job_id, cmd, overrides), []).append((rec, etype, policy, note))

    out.storm = in_storm(ledger.jobs.values(), settings, now)
    storm_factor = rs.storm_factor if out.storm else 1.0
    hour_ago = now - timedelta(hours=1)
    recent = [t for t in ledger.resubmit.submission_times if (s := _parse_iso(t)) and s > hour_ago]
    budget = rs.max_per_hour - len(recent)
    for (job_id, cmd, overrides), members in groups.items():
        if budget <= 0:
            for rec, *_ in members:
                out.decisions.append(
                    Decision(
                        rec.key,
                        "deferred",
                        f"hourly cap of {rs.max_per_hour} submissions reached; retried later",
                    )
                )
            continue
        budget -= 1
        delay = max(
            backoff_delay_s(
                policy, rec.attempt, storm_factor=storm_factor, jitter=rs.jitter_fraction, rng=rng
            )
            for rec, _, policy, _ in members
        )
        indices = [rec.array_task for rec, *_ in members if rec.array_task is not None]
        array_spec: str | None = None
        if indices:
            array_spec = compress_ranges(indices)
            throttle = cmd.array_throttle()
            if throttle:
                array_spec += f"%{throttle}"
        out.submissions.append(
            PlannedSubmission(
                job_id=job_id,
                task_keys=tuple(rec.key for rec, *_ in members),
                array_spec=array_spec,
                command=cmd,
                overrides=overrides,
                begin_delay_s=delay,
                error_types=tuple(sorted({e.value for _, e, _, _ in members})),
                attempt=max(rec.attempt for rec, *_ in members) + 1,
                notes=tuple(sorted({n for *_, n in members if n})),
            )
        )
    return out


def apply_decisions(ledger: LedgerView, decisions: Iterable[Decision]) -> int:
    """Write decisions to the records; marks dirty only for real changes."""
    changed = 0
    for d in decisions:
        rec = ledger.jobs.get(d.key)
        if rec is None or (rec.resubmit == d.status and rec.resubmit_note == d.note):
            continue
        rec.resubmit = d.status
        rec.resubmit_note = d.note
        changed += 1
    if changed:
        ledger.mark_dirty()
    return changed


def pause(ledger: LedgerView, reason: str, now: datetime) -> None:
    ledger.resubmit.paused = True
    ledger.resubmit.paused_reason = reason
    ledger.resubmit.paused_at = _iso(now)
    ledger.mark_dirty()


def lift_pause(ledger: LedgerView) -> bool:
    """Lift a billing pause; paused tasks are planned again. Returns whether it was paused."""
    was = ledger.resubmit.paused
    if was:
        ledger.resubmit.paused = False
        ledger.resubmit.paused_reason = None
        ledger.resubmit.paused_at = None
        ledger.mark_dirty()
    return was


# --- protocol (edges) --------------------------------------------------------------------


@dataclass(slots=True)
class SubmissionOutcome:
    intent_id: str
    state: str  # "submitted", "failed", "intent" (unknown: timeout), "dry_run"
    task_keys: list[str]
    argv: list[str]
    new_job_id: str | None = None
    error: str | None = None
    begin_delay_s: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "intent_id": self.intent_id,
            "state": self.state,
            "task_keys": self.task_keys,
            "argv": self.argv,
            "new_job_id": self.new_job_id,
            "error": self.error,
            "begin_delay_s": self.begin_delay_s,
            "notes": self.notes,
        }


def new_intent_id() -> str:
    return uuid.uuid4().hex[:16]


def record_submitted(
    ledger: LedgerView, intent: SubmitIntent, new_job_id: str, now: datetime
) -> list[str]:
    """Settle an intent as submitted and add the child records. Returns the child keys.

    A child the tick already created from sacct (before the intent was reconciled) keeps
    its observations and only gains its lineage.
    """
    stamp = _iso(now)
    intent.state = "submitted"
    intent.new_job_id = new_job_id
    intent.submitted_at = intent.submitted_at or stamp
    intent.error = None
    children: list[str] = []
    retry_at = _iso(now + timedelta(seconds=intent.begin_delay_s))
    for old_key in intent.task_keys:
        parent = ledger.jobs.get(old_key)
        if parent is None:
            continue
        key = new_job_id if parent.array_task is None else f"{new_job_id}_{parent.array_task}"
        child = ledger.jobs.get(key)
        if child is None:
            child = JobRecord(
                key=key,
                job_id=new_job_id,
                array_task=parent.array_task,
                job_name=parent.job_name,
                user=parent.user,
                state="PENDING",
                outcome="pending",
                work_dir=intent.work_dir,
                submit_line=" ".join(intent.argv),
                config_file=parent.config_file,
                config=dict(parent.config),
                config_error=parent.config_error,
                submitted_at=stamp,
                first_seen_at=stamp,
                updated_at=stamp,
            )
            ledger.jobs[key] = child
        child.origin = parent.origin_key
        child.parent = parent.key
        child.attempt = parent.attempt + 1
        if child.outcome == "success":
            # the tick classified it before this intent was reconciled: close the loop now
            _mark_recovered(ledger, child, now)
        parent.retried_as = key
        parent.resubmit = "submitted"
        parent.resubmit_note = f"resubmitted as job {new_job_id} at {stamp}"
        parent.next_retry_at = retry_at
        parent.updated_at = stamp
        children.append(key)
    ledger.mark_dirty()
    return children


def execute(
    ledger: LedgerView,
    submissions: Sequence[PlannedSubmission],
    settings: Settings,
    runner: Runner,
    now: datetime,
    save: Callable[[], object],
    *,
    dry_run: bool = False,
) -> list[SubmissionOutcome]:
    """Run the submit protocol for each planned submission, saving around every sbatch."""
    from .slurm import SlurmCommandFailed, parse_sbatch_parsable

    outcomes: list[SubmissionOutcome] = []
    for sub in submissions:
        intent_id = new_intent_id()
        argv = sub.argv(intent_id, settings.slurm.sbatch)
        intent = SubmitIntent(
            intent_id=intent_id,
            created_at=_iso(now),
            origin_job_id=sub.job_id,
            task_keys=list(sub.task_keys),
            array_spec=sub.array_spec,
            argv=argv,
            work_dir=sub.command.work_dir,
            error_type=",".join(sub.error_types),
            attempt=sub.attempt,
            begin_delay_s=sub.begin_delay_s,
        )
        result = SubmissionOutcome(
            intent_id,
            "intent",
            list(sub.task_keys),
            argv,
            None,
            None,
            sub.begin_delay_s,
            list(sub.notes),
        )
        outcomes.append(result)
        if dry_run:
            intent.state = result.state = "dry_run"
            ledger.intents[intent_id] = intent
            _set_tasks(ledger, sub.task_keys, "dry_run", "dry run: would run " + " ".join(argv))
            continue
        ledger.intents[intent_id] = intent
        # Counted before sbatch runs: an attempt whose fate is unknown still loads the cluster.
        ledger.resubmit.submission_times.append(_iso(now))
        _set_tasks(ledger, sub.task_keys, "pending", f"submitting (intent {intent_id})")
        save()
        crash_point("resubmit.before_sbatch")
        try:
            output = runner.run(argv, timeout=settings.slurm.sbatch_timeout_s, cwd=intent.work_dir)
        except SlurmTimeout as exc:
            # sbatch may have accepted the job: leave the intent open for reconcile().
            intent.error = result.error = f"{exc}; looking for the job by its tag"
            ledger.mark_dirty()
            save()
            continue
        except SlurmError as exc:
            detail = exc.stderr.strip() if isinstance(exc, SlurmCommandFailed) else ""
            intent.state = result.state = "failed"
            intent.error = result.error = str(exc) + (
                f" ({detail})" if detail and detail not in str(exc) else ""
            )
            _set_tasks(ledger, sub.task_keys, "submit_failed", f"sbatch refused: {intent.error}")
            save()
            continue
        crash_point("resubmit.after_sbatch")
        try:
            new_job_id = parse_sbatch_parsable(output.stdout)
        except SlurmParseError as exc:
            intent.error = result.error = f"{exc}; looking for the job by its tag"
            ledger.mark_dirty()
            save()
            continue
        record_submitted(ledger, intent, new_job_id, now)
        result.state, result.new_job_id = "submitted", new_job_id
        save()
    return outcomes


def _set_tasks(ledger: LedgerView, keys: Iterable[str], status: str, note: str) -> None:
    for key in keys:
        rec = ledger.jobs.get(key)
        if rec is not None:
            rec.resubmit = status
            rec.resubmit_note = note
    ledger.mark_dirty()


@dataclass(slots=True)
class ReconcileReport:
    found: list[tuple[str, str]] = field(default_factory=list)  # (intent_id, job id)
    abandoned: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)


def reconcile(
    ledger: LedgerView,
    sacct_rows: Sequence[SacctRow] | None,
    squeue_rows: Sequence[SqueueRow] | None,
    now: datetime,
) -> ReconcileReport:
    """Settle open intents by finding their tag in squeue (%k) or sacct (Comment, SubmitLine).

    ``None`` rows = that query failed this tick: a miss then proves nothing and is not
    counted towards abandoning the intent.
    """
    report = ReconcileReport()
    open_intents = [it for it in ledger.intents.values() if it.state == "intent"]
    if not open_intents:
        return report
    found: dict[str, str] = {}
    for q in squeue_rows or ():
        if q.comment.startswith(TAG_PREFIX):
            found.setdefault(q.comment, q.key.job_id)
    for s in sacct_rows or ():
        if s.comment.startswith(TAG_PREFIX):
            found.setdefault(s.comment, s.key.job_id)
        elif TAG_PREFIX in s.submit_line:
            for word in s.submit_line.split():
                if word.startswith("--comment=" + TAG_PREFIX):
                    found.setdefault(word.removeprefix("--comment="), s.key.job_id)
    complete = sacct_rows is not None and squeue_rows is not None
    for intent in open_intents:
        job_id = found.get(TAG_PREFIX + intent.intent_id)
        if job_id is not None:
            record_submitted(ledger, intent, job_id, now)
            report.found.append((intent.intent_id, job_id))
            continue
        if not complete:
            report.waiting.append(intent.intent_id)
            continue
        intent.checks += 1
        ledger.mark_dirty()
        created = _parse_iso(intent.created_at) or now
        age = (now - created).total_seconds()
        if intent.checks >= ABANDON_AFTER_CHECKS and age >= ABANDON_AFTER_S:
            intent.state = "abandoned"
            intent.error = (
                f"not found in squeue or sacct after {intent.checks} checks; sbatch never "
                "accepted it"
            )
            _set_tasks(
                ledger,
                intent.task_keys,
                "submit_failed",
                "the previous submission was never accepted by Slurm; planned again",
            )
            report.abandoned.append(intent.intent_id)
        else:
            report.waiting.append(intent.intent_id)
    return report


def _mark_recovered(ledger: LedgerView, record: JobRecord, now: datetime) -> None:
    """Every ancestor of a successful retry (up to the original) is recovered by it."""
    seen: set[str] = set()
    key = record.parent
    while key and key not in seen:
        seen.add(key)
        anc = ledger.jobs.get(key)
        if anc is None:
            break
        anc.recovered_by = record.key
        anc.updated_at = _iso(now)
        key = anc.parent
    origin = ledger.jobs.get(record.origin) if record.origin else None
    if origin is not None and origin.recovered_by != record.key:
        origin.recovered_by = record.key
    ledger.mark_dirty()


def on_classified(ledger: LedgerView, record: JobRecord, settings: Settings, now: datetime) -> None:
    """Close the loop when a task finishes: recovered lineage, or cap reached."""
    if not record.parent and not record.origin:
        return
    if record.outcome == "success":
        _mark_recovered(ledger, record, now)
        return
    if record.outcome != "failure":
        return
    etype = _error_type(record)
    policy = settings.resubmit.types.get(etype) if etype is not None else None
    if (
        policy is not None
        and etype not in NEVER_RETRYABLE
        and record.attempt >= policy.max_attempts
    ):
        record.resubmit = "cap_reached"
        record.resubmit_note = (
            f"failed again on attempt {record.attempt}; retry cap of "
            f"{policy.max_attempts} attempts reached"
        )
        ledger.mark_dirty()


# --- the tick and the command ------------------------------------------------------------


@dataclass(slots=True)
class ResubmitReport:
    enabled: bool = True
    dry_run: bool = False
    paused: bool = False
    paused_reason: str | None = None
    newly_paused: bool = False
    storm: bool = False
    outcomes: list[SubmissionOutcome] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    @property
    def submitted(self) -> list[SubmissionOutcome]:
        return [o for o in self.outcomes if o.state == "submitted"]

    @property
    def failed(self) -> list[SubmissionOutcome]:
        return [o for o in self.outcomes if o.state == "failed"]

    def to_json(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for d in self.decisions:
            counts[d.status] = counts.get(d.status, 0) + 1
        return {
            "enabled": self.enabled,
            "dry_run": self.dry_run,
            "paused": self.paused,
            "paused_reason": self.paused_reason,
            "newly_paused": self.newly_paused,
            "storm": self.storm,
            "submissions": [o.to_json() for o in self.outcomes],
            "not_submitted": counts,
        }


def _mark_disabled(ledger: LedgerView, settings: Settings) -> list[Decision]:
    enabled_types = {t.value for t, p in settings.resubmit.types.items() if p.enabled}
    decisions = [
        Decision(rec.key, "disabled", "not resubmitted: resubmission is off")
        for rec in ledger.jobs.values()
        if rec.outcome == "failure"
        and rec.resubmit is None
        and not rec.retried_as
        and not rec.recovered_by
        and (rec.retryable or rec.error_type in enabled_types)
        and _error_type(rec) not in NEVER_RETRYABLE
    ]
    apply_decisions(ledger, decisions)
    return decisions


def process_tick(
    ledger: LedgerView,
    settings: Settings,
    runner: Runner,
    now: datetime,
    save: Callable[[], object],
    *,
    rng: random.Random | None = None,
    user: str | None = None,
    exists: Exists = file_exists,
    types: Sequence[ErrorType] | None = None,
    jobs: Sequence[str] | None = None,
    manual: bool = False,
    dry_run: bool | None = None,
) -> ResubmitReport:
    """Policy + protocol for one tick (or one manual run). Call ``reconcile`` first."""
    rs = settings.resubmit
    is_dry = rs.dry_run if dry_run is None else dry_run
    report = ResubmitReport(enabled=rs.enabled or manual, dry_run=is_dry)
    if not rs.enabled and not manual:
        report.decisions = _mark_disabled(ledger, settings)
        report.paused = ledger.resubmit.paused
        report.paused_reason = ledger.resubmit.paused_reason
        return report
    from .slurm import current_user

    decided = plan(
        ledger,
        settings,
        now,
        rng or random.Random(),
        user=user or current_user(settings.slurm),
        exists=exists,
        types=types,
        jobs=jobs,
        manual=manual,
    )
    if decided.pause_reason is not None:
        pause(ledger, decided.pause_reason, now)
        report.newly_paused = True
    apply_decisions(ledger, decided.decisions)
    report.decisions = decided.decisions
    report.storm = decided.storm
    report.outcomes = execute(
        ledger, decided.submissions, settings, runner, now, save, dry_run=is_dry
    )
    report.paused = ledger.resubmit.paused
    report.paused_reason = ledger.resubmit.paused_reason
    return report


@dataclass(slots=True)
class ResubmitResult:
    report: ResubmitReport
    resumed: bool = False
    reconciled: ReconcileReport | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.report.failed else 0

    def to_json(self) -> dict[str, Any]:
        data = self.report.to_json()
        data["resumed"] = self.resumed
        data["warnings"] = self.warnings
        data["reasons"] = [
            {"key": d.key, "status": d.status, "note": d.note} for d in self.report.decisions
        ]
        return data

    def render_text(self) -> str:
        r = self.report
        lines = [f"warning: {w}" for w in self.warnings]
        if self.resumed:
            lines.append("resubmission resumed (billing pause lifted)")
        if r.paused:
            lines.append(
                f"resubmission is PAUSED: {r.paused_reason}; "
                "lift it with: slurm-triage resubmit --resume"
            )
        for o in r.outcomes:
            tasks = ", ".join(o.task_keys)
            cmd = " ".join(o.argv)
            if o.state == "submitted":
                lines.append(f"resubmitted {tasks} as job {o.new_job_id}: {cmd}")
            elif o.state == "dry_run":
                lines.append(f"would resubmit {tasks}: {cmd}")
            elif o.state == "failed":
                lines.append(f"FAILED to resubmit {tasks}: {o.error}")
            else:
                lines.append(f"submitted {tasks}? {o.error} (the daemon will look for it)")
            lines.extend(f"  {n}" for n in o.notes)
        for d in r.decisions:
            lines.append(f"not resubmitted {d.key}: {d.note}")
        if not r.outcomes and not r.decisions:
            lines.append("nothing to resubmit")
        return "\n".join(lines)


def run_manual(
    settings: Settings,
    *,
    dry_run: bool,
    types: Sequence[str] | None,
    jobs: Sequence[str] | None,
    resume: bool,
    runner: Runner | None = None,
    now: datetime | None = None,
) -> ResubmitResult:
    """``slurm-triage resubmit``: the daemon's path, on demand, under the ledger lock."""
    from .ledger import LedgerStore
    from .slurm import SlurmRunner, current_user, query_sacct, query_squeue

    wanted: list[ErrorType] | None = None
    if types:
        wanted = []
        for name in types:
            try:
                etype = ErrorType(name.strip().lower())
            except ValueError as exc:
                known = ", ".join(t.value for t in ErrorType)
                raise UsageError(f"--type: unknown failure type {name!r} (one of {known})") from exc
            if etype in NEVER_RETRYABLE:
                raise UsageError(f"--type: {etype.value} failures are never resubmitted")
            wanted.append(etype)
    runner = runner or SlurmRunner()
    now = now or datetime.now(timezone.utc)
    user = current_user(settings.slurm)
    is_dry = dry_run or settings.resubmit.dry_run
    result = ResubmitResult(report=ResubmitReport())
    with LedgerStore(settings.ledger_path, retention_days=settings.watch.retention_days) as store:
        ledger = store.load()
        result.warnings.extend(store.warnings)
        if resume:
            result.resumed = lift_pause(ledger)
        if any(it.state == "intent" for it in ledger.intents.values()):
            sacct_rows: list[SacctRow] | None
            squeue_rows: list[SqueueRow] | None
            start = min(
                (_parse_iso(it.created_at) or now for it in ledger.intents.values()),
                default=now,
            ) - timedelta(minutes=10)
            try:
                squeue_rows = query_squeue(runner, settings.slurm, user=user)
            except SlurmError as exc:
                squeue_rows = None
                result.warnings.append(f"squeue: {exc}")
            try:
                sacct_rows = query_sacct(runner, settings.slurm, user=user, start=start)
            except SlurmError as exc:
                sacct_rows = None
                result.warnings.append(f"sacct: {exc}")
            result.reconciled = reconcile(ledger, sacct_rows, squeue_rows, now)

        def save() -> None:
            if not is_dry:
                store.save(ledger, now=now)

        result.report = process_tick(
            ledger,
            settings,
            runner,
            now,
            save,
            user=user,
            types=wanted,
            jobs=jobs,
            manual=True,
            dry_run=is_dry,
        )
        save()
    return result


__all__ = [
    "ABANDON_AFTER_CHECKS",
    "ABANDON_AFTER_S",
    "Decision",
    "LedgerView",
    "Plan",
    "PlannedSubmission",
    "ReconcileReport",
    "ResubmitReport",
    "ResubmitResult",
    "SubmitError",
    "apply_decisions",
    "backoff_delay_s",
    "execute",
    "on_classified",
    "plan",
    "process_tick",
    "reconcile",
    "record_submitted",
    "run_manual",
]
