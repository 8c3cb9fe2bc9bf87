"""Pure Slack message building: ledger records in, ``(fallback_text, blocks)`` out.

No I/O, no clock: everything time-related comes in as arguments so the output is a
deterministic function of its inputs (the golden files under ``tests/golden/slack``
pin it). Slack's limits are enforced here, not at send time, so a message that leaves
this module is always postable: header ≤ 150 chars, a section's text ≤ 3000, ≤ 50
blocks, fallback text ≤ ~3000.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timezone
from pathlib import PurePath
from typing import Any

from .model import compress_ranges, expand_ranges
from .records import JobRecord
from .timeutil import parse_iso as _parse_time

MAX_HEADER = 150
MAX_SECTION = 3000
MAX_BLOCKS = 50
MAX_TEXT = 3000
MAX_EVIDENCE = 300
MAX_RANGES = 1500
MAX_CONFIG_LINE = 600
# groups beyond this never fit in 50 blocks next to the header, summary and overflow
HARD_MAX_GROUPS = 40

Blocks = list[dict[str, Any]]

# Order of types in a digest: the ones a human must act on first.
_TYPE_ORDER = [
    "billing",
    "code_error",
    "unknown",
    "oom",
    "time_limit",
    "json_parse",
    "cancelled",
    "rate_limit",
    "network",
    "empty_response",
    "node_fail",
    "preempted",
]


def escape(text: str) -> str:
    """Slack mrkdwn treats ``& < >`` as control characters; user text must not inject links."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def trim(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: max(0, limit - 1)] + "…"


def code(text: str) -> str:
    """Inline code span; a backtick inside would end the span early, so it is replaced."""
    return "`" + escape(text.replace("`", "ʼ")) + "`"


def dedup_hash(keys: Iterable[str]) -> str:
    joined = "\n".join(sorted(set(keys)))
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:16]


def fmt_time(text: str | None, *, rich: bool) -> str:
    """A ledger timestamp for humans; in blocks Slack renders it in the reader's time zone."""
    dt = _parse_time(text)
    if dt is None:
        return text or "?"
    utc = dt.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if not rich:
        return utc
    return f"<!date^{int(dt.timestamp())}^{{date_short_pretty}} {{time}}|{utc}>"


def _sort_key(rec: JobRecord) -> tuple[int, str, int]:
    job = int(rec.job_id) if rec.job_id.isdigit() else 0
    return (job, rec.job_id, -1 if rec.array_task is None else rec.array_task)


def ranges_text(indices: Sequence[int], limit: int = MAX_RANGES) -> str:
    """Compressed ranges; when too long, cut at a range boundary and say how many are left."""
    full = compress_ranges(list(indices))
    if len(full) <= limit:
        return full
    kept = full[: limit - 20].rsplit(",", 1)[0]
    shown = len(expand_ranges(kept))
    return f"{kept},… (+{len(set(indices)) - shown} more)"


# --- grouping -------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Failed tasks of one job that share one failure type."""

    error_type: str
    job_id: str
    job_name: str
    records: tuple[JobRecord, ...]

    @property
    def count(self) -> int:
        return len(self.records)

    def tasks_text(self) -> str:
        indices = [r.array_task for r in self.records if r.array_task is not None]
        plain = self.count - len(indices)
        parts = []
        if indices:
            parts.append(f"tasks {ranges_text(indices)}")
        if plain:
            parts.append("the whole job" if plain == 1 else f"{plain} runs")
        return ", ".join(parts)


def group_records(records: Sequence[JobRecord]) -> list[Group]:
    """type → job, types in urgency order, then the biggest groups first."""
    buckets: dict[tuple[str, str], list[JobRecord]] = {}
    for rec in records:
        buckets.setdefault((rec.error_type or "unknown", rec.job_id), []).append(rec)
    type_totals = Counter(t for (t, _), recs in buckets.items() for _ in recs)

    def order(item: tuple[tuple[str, str], list[JobRecord]]) -> tuple[int, int, int, str]:
        (etype, job_id), recs = item
        rank = _TYPE_ORDER.index(etype) if etype in _TYPE_ORDER else len(_TYPE_ORDER)
        job_num = int(job_id) if job_id.isdigit() else 0
        return (rank, -type_totals[etype], -len(recs), f"{job_num:020d}{job_id}")

    groups = []
    for (etype, job_id), recs in sorted(buckets.items(), key=order):
        recs_sorted = tuple(sorted(recs, key=_sort_key))
        names = Counter(r.job_name for r in recs_sorted if r.job_name)
        groups.append(
            Group(
                error_type=etype,
                job_id=job_id,
                job_name=names.most_common(1)[0][0] if names else "",
                records=recs_sorted,
            )
        )
    return groups


# --- one group's lines -------------------------------------------------------------------


def evidence_line(group: Group, *, rich: bool) -> str | None:
    """The most common deciding line of the group, with where it came from."""
    texts: Counter[str] = Counter()
    first: dict[str, dict[str, Any]] = {}
    for rec in group.records:
        ev = rec.evidence
        if not ev or not ev.get("text"):
            continue
        text = str(ev["text"]).strip()
        texts[text] += 1
        first.setdefault(text, ev)
    if not texts:
        return None
    text, n = texts.most_common(1)[0]
    ev = first[text]
    source = PurePath(str(ev.get("source") or "")).name or "log"
    where = f"{source}:{ev['line_no']}" if ev.get("line_no") is not None else source
    body = trim(" ".join(text.split()), MAX_EVIDENCE)
    extra = len(texts) - 1
    more = f" (+{extra} other wording{'s' if extra > 1 else ''})" if extra else ""
    if n < group.count and not extra:
        more = f" ({n} of {group.count} tasks)"
    if rich:
        return f"{code(body)} — _{escape(where)}_{more}"
    return f"{body} [{where}]{more}"


def _value_text(value: Any) -> str:
    return "null" if value is None else str(value)


def config_line(group: Group, *, rich: bool) -> str | None:
    """The config fields the tasks share, and the ones that tell them apart."""
    recs = [r for r in group.records if r.config]
    if not recs:
        return None
    fields = sorted({k for r in recs for k in r.config})
    shared: list[str] = []
    differ: list[str] = []
    for name in fields:
        values = [_value_text(r.config.get(name)) for r in recs]
        distinct = sorted(set(values), key=lambda v: (-values.count(v), v))
        if len(distinct) == 1 and len(recs) == len(group.records):
            shared.append(f"{name}={distinct[0]}")
        else:
            shown = ", ".join(distinct[:5]) + (
                f", +{len(distinct) - 5} more" if len(distinct) > 5 else ""
            )
            differ.append(f"{name} ∈ {{{shown}}}")
    parts = []
    if shared:
        label = "_all:_ " if rich else "all: "
        parts.append(label + ", ".join(shared))
    if differ:
        label = "_varies:_ " if rich else "varies: "
        parts.append(label + "; ".join(differ))
    line = trim(" · ".join(parts), MAX_CONFIG_LINE)
    return escape(line) if rich else line


def action_phrase(rec: JobRecord, *, rich: bool, resubmit_enabled: bool) -> str:
    """What was done or will be done about one failed task."""
    status = rec.resubmit
    when = fmt_time(rec.next_retry_at, rich=rich) if rec.next_retry_at else None
    if rec.hung:
        return "hung (no CPU time), not retried"
    if status == "submitted":
        new_job = (rec.retried_as or "").split("_", 1)[0]
        phrase = f"resubmitted as job {new_job}" if new_job else "resubmitted"
        return f"{phrase}, starts {when}" if when else phrase
    if status == "pending":
        return f"will retry at {when}" if when else "will retry"
    if status == "dry_run":
        return "would resubmit (dry run)"
    if status == "cap_reached":
        return "retry cap reached"
    if status == "cannot_rebuild":
        return "cannot rebuild the submit command"
    if status == "paused":
        return "resubmission paused (billing)"
    if status == "disabled":
        return "not retried (disabled for this type)"
    if status == "not_retryable" or not rec.retryable:
        return "not retryable"
    if not resubmit_enabled:
        return "retryable; automatic resubmission is off"
    return "retryable; awaiting resubmission"


def action_line(group: Group, *, rich: bool, resubmit_enabled: bool) -> str:
    phrases = Counter(
        action_phrase(r, rich=rich, resubmit_enabled=resubmit_enabled) for r in group.records
    )
    if len(phrases) == 1:
        return next(iter(phrases))
    return "; ".join(f"{p} ({n})" for p, n in phrases.most_common())


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def group_title(group: Group, *, rich: bool) -> str:
    name = f" {group.job_name}" if group.job_name else ""
    attempts = {r.attempt for r in group.records}
    retry = f", attempt {max(attempts)}" if max(attempts) > 1 else ""
    if rich:
        name_md = f" {code(group.job_name)}" if group.job_name else ""
        return (
            f"*{escape(group.error_type)}* · job {code(group.job_id)}{name_md} · "
            f"{escape(group.tasks_text())} ({group.count}{retry})"
        )
    return (
        f"{group.error_type}: job {group.job_id}{name} {group.tasks_text()} ({group.count}{retry})"
    )


def group_section_text(group: Group, *, resubmit_enabled: bool) -> str:
    lines = [group_title(group, rich=True)]
    ev = evidence_line(group, rich=True)
    if ev:
        lines.append(f"&gt; {ev}")
    cfg = config_line(group, rich=True)
    if cfg:
        lines.append(cfg)
    lines.append("→ " + action_line(group, rich=True, resubmit_enabled=resubmit_enabled))
    return trim("\n".join(lines), MAX_SECTION)


# --- messages -----------------------------------------------------------------------------


def _header(text: str) -> dict[str, Any]:
    return {
        "type": "header",
        "text": {"type": "plain_text", "text": trim(text, MAX_HEADER), "emoji": True},
    }


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": trim(text, MAX_SECTION)}}


def _context(text: str) -> dict[str, Any]:
    # a context element's text shares the section limit
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": trim(text, MAX_SECTION)}]}


def _fit_text(lines: Sequence[str], limit: int = MAX_TEXT) -> str:
    """Join lines up to ``limit``; what does not fit is counted, never cut mid-line."""
    out: list[str] = []
    used = 0
    for i, raw in enumerate(lines):
        line = trim(raw, limit // 2)
        reserve = 40 if i < len(lines) - 1 else 0  # room for the "… and N more" line
        cost = len(line) + (1 if out else 0)
        if out and used + cost + reserve > limit:
            out.append(f"… and {len(lines) - i} more lines")
            break
        out.append(line)
        used += cost
    return trim("\n".join(out), limit)


def _type_counts(records: Sequence[JobRecord]) -> list[tuple[str, int]]:
    counts = Counter(r.error_type or "unknown" for r in records)
    return sorted(
        counts.items(),
        key=lambda kv: (_TYPE_ORDER.index(kv[0]) if kv[0] in _TYPE_ORDER else 99, -kv[1]),
    )


def build_digest(
    records: Sequence[JobRecord],
    *,
    max_groups: int = 20,
    resubmit_enabled: bool = False,
    note: str | None = None,
) -> tuple[str, Blocks]:
    """One digest for a batch of failed tasks: type → job → array ranges.

    Large batches are summarised ("… and N more groups"), never split: a digest is one
    message whatever the number of failures.
    """
    recs = sorted(records, key=_sort_key)
    groups = group_records(recs)
    jobs = {r.job_id for r in recs}
    title = f"🔴 {_plural(len(recs), 'failed task')} in {_plural(len(jobs), 'job')}"
    by_type = " · ".join(f"{t} {n}" for t, n in _type_counts(recs))
    actions = Counter(
        action_phrase(r, rich=False, resubmit_enabled=resubmit_enabled).split(",")[0] for r in recs
    )
    action_summary = " · ".join(f"{p}: {n}" for p, n in actions.most_common(4))

    limit = max(1, min(max_groups, HARD_MAX_GROUPS))
    shown, rest = groups[:limit], groups[limit:]

    blocks: Blocks = [_header(title)]
    summary = f"{escape(by_type)}\n{escape(action_summary)}"
    if note:
        summary += f"\n_{escape(note)}_"
    blocks.append(_context(summary))
    for group in shown:
        blocks.append(_section(group_section_text(group, resubmit_enabled=resubmit_enabled)))
    if rest:
        blocks.append(_section(_overflow_text(rest, rich=True)))
    blocks = blocks[:MAX_BLOCKS]

    text_lines = [f"{title} — {by_type}"]
    if note:
        text_lines.append(note)
    for group in shown:
        line = group_title(group, rich=False)
        ev = evidence_line(group, rich=False)
        if ev:
            line += f": {trim(ev, 200)}"
        line += " → " + action_line(group, rich=False, resubmit_enabled=resubmit_enabled)
        text_lines.append(line)
    if rest:
        text_lines.append(_overflow_text(rest, rich=False))
    return _fit_text(text_lines), blocks


def _overflow_text(rest: Sequence[Group], *, rich: bool) -> str:
    n_tasks = sum(g.count for g in rest)
    head = f"… and {_plural(len(rest), 'more group')} ({_plural(n_tasks, 'task')}): "
    items = [f"{g.error_type} job {g.job_id} {g.tasks_text()}" for g in rest]
    body = "; ".join(items)
    if rich:
        return trim(f"_{escape(head)}_" + escape(body), MAX_SECTION)
    return trim(head + body, 1000)


def build_billing_alert(records: Sequence[JobRecord], *, paused: bool) -> tuple[str, Blocks]:
    recs = sorted(records, key=_sort_key)
    groups = group_records(recs)
    title = f"💳 Billing failure: {_plural(len(recs), 'task')} ran out of credit or quota"
    lines = []
    for g in groups[:10]:
        ev = evidence_line(g, rich=True)
        lines.append(
            f"job {code(g.job_id)} {escape(g.tasks_text())}" + (f"\n&gt; {ev}" if ev else "")
        )
    if len(groups) > 10:
        lines.append(f"… and {_plural(len(groups) - 10, 'more job')}")
    what = (
        "Automatic resubmission is *paused* until you run `slurm-triage resubmit --resume`."
        if paused
        else "Billing failures are never resubmitted; top up the account before re-running."
    )
    blocks: Blocks = [_header(title), _section("\n".join(lines)), _context(what)]
    first = groups[0] if groups else None
    ev_plain = evidence_line(first, rich=False) if first else None
    text = f"{title}. " + (f"{ev_plain}. " if ev_plain else "") + what.replace("*", "")
    return trim(text, MAX_TEXT), blocks


def build_alert(title: str, detail: str) -> tuple[str, Blocks]:
    """The daemon's own trouble: short, plain, actionable."""
    blocks: Blocks = [_header(title), _section(escape(detail))]
    return trim(f"{title}: {detail}", MAX_TEXT), blocks


def build_recovery(
    records: Sequence[JobRecord], jobs: Mapping[str, JobRecord]
) -> tuple[str, Blocks]:
    """Follow-up when tasks reported as failed later succeeded (a retry or a requeue)."""
    recs = sorted(records, key=_sort_key)
    by_job: dict[str, list[JobRecord]] = {}
    for r in recs:
        by_job.setdefault(r.job_id, []).append(r)
    lines = []
    for job_id, members in by_job.items():
        indices = [r.array_task for r in members if r.array_task is not None]
        tasks = f"tasks {ranges_text(indices)}" if indices else "the job"
        by = sorted({(r.recovered_by or "").split("_", 1)[0] for r in members} - {""})
        via = f" (by job {', '.join(by[:5])})" if by else ""
        lines.append(f"job {job_id} {tasks}{via}")
    title = f"✅ {_plural(len(recs), 'task')} recovered"
    body = _fit_text(lines, MAX_SECTION - 100)
    blocks: Blocks = [_section(f"*{escape(title)}*\n{escape(body)}")]
    return _fit_text([title + ": " + "; ".join(lines)]), blocks


def build_daily(
    *,
    day: str,
    failures: Sequence[JobRecord],
    recovered: int,
    resubmitted: int,
    running: int,
    undeliverable: int,
) -> tuple[str, Blocks]:
    title = f"📊 slurm-triage daily summary {day}"
    by_type = " · ".join(f"{t} {n}" for t, n in _type_counts(failures)) or "none"
    jobs = len({r.job_id for r in failures})
    lines = [
        f"failed tasks (24 h): {len(failures)} in {_plural(jobs, 'job')} — {by_type}",
        f"recovered: {recovered} · resubmitted: {resubmitted} · still running: {running}",
    ]
    if undeliverable:
        lines.append(f"undeliverable Slack messages: {undeliverable} (see `slurm-triage status`)")
    blocks: Blocks = [_header(title), _section(escape("\n".join(lines)))]
    return _fit_text([title, *lines]), blocks


def build_test_message(destination: str) -> tuple[str, Blocks]:
    text = f"✅ slurm-triage test message: Slack delivery to {destination} works."
    return text, [_section(escape(text))]
