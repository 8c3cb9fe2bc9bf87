"""Reports over classified tasks: CSV, summary figures, clusters, re-run commands.

Pure functions over :class:`TaskResult` lists (writing the CSV is the one I/O edge, done
atomically). ``analyze`` builds the task results; this module decides what is shown.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import re
import shlex
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError
from .fsutil import atomic_write
from .model import ErrorType, Outcome, SacctRow, TaskKey, Verdict, compress_ranges
from .submitline import _LONG, _REQUIRED, _SHORT_VALUE, _resolve_long

if TYPE_CHECKING:
    from .settings import Settings

FIXED_HEAD = ["job_id", "job_name", "array_id", "error_type"]
FIXED_TAIL = ["config_file", "retryable", "log_file", "evidence"]

# A re-run job usually carries the original's name plus a marker; the experiment is the same.
_RERUN_SUFFIX = re.compile(r"(?:[_-](?:re-?run|retry|resubmit(?:ted)?|requeued?|again)\d*)+$", re.I)


@dataclass(slots=True)
class TaskResult:
    """One attempt of one task (a plain job, or an array task in one job) and its verdict."""

    key: TaskKey
    job_name: str
    verdict: Verdict
    log_file: str = ""
    when: datetime | None = None  # sacct End when known, else the log's mtime
    sacct: SacctRow | None = None
    config_file: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    config_error: str | None = None
    recovered_by: TaskKey | None = None  # a later attempt of the same task succeeded
    superseded_by: TaskKey | None = None  # a later attempt exists and did not succeed

    @property
    def failed(self) -> bool:
        return self.verdict.outcome is Outcome.FAILURE

    @property
    def current_failure(self) -> bool:
        """A failure that still needs attention: not recovered, not retried since."""
        return self.failed and self.recovered_by is None and self.superseded_by is None


def experiment_of(job_name: str, key: TaskKey) -> str:
    """Attempts with the same experiment name and array index are the same task.

    An unnamed job (``slurm-123.out``, no sacct) is its own experiment: nothing links it.
    """
    base = _RERUN_SUFFIX.sub("", job_name.strip())
    return base if base else f"#{key.job_id}"


def _job_order(key: TaskKey) -> tuple[int, str]:
    return (int(key.job_id), "") if key.job_id.isdigit() else (0, key.job_id)


def link_attempts(tasks: Sequence[TaskResult]) -> None:
    """Mark earlier attempts of a task as recovered (a later one succeeded) or superseded.

    Attempts of one task: same experiment (job name without a re-run marker) and same
    array index, ordered by job id. A requeue keeps its job id and rewrites its log, so it
    needs no linking. Plain jobs (no array index) are linked by name only when they share
    the name, which is how one re-submits a single job.
    """
    groups: dict[tuple[str, int | None], list[TaskResult]] = defaultdict(list)
    for t in tasks:
        groups[(experiment_of(t.job_name, t.key), t.key.array_task)].append(t)
    for attempts in groups.values():
        attempts.sort(key=lambda t: _job_order(t.key))
        for i, t in enumerate(attempts):
            t.recovered_by = None
            t.superseded_by = None
            if not t.failed:
                continue
            later = [a for a in attempts[i + 1 :] if a.key.job_id != t.key.job_id]
            success = next((a for a in later if a.verdict.outcome is Outcome.SUCCESS), None)
            if success is not None:
                t.recovered_by = success.key
            elif later:
                t.superseded_by = later[-1].key


# ---------------------------------------------------------------------------------------
# CSV


def csv_header(settings: Settings) -> list[str]:
    return [*FIXED_HEAD, *settings.analyze.config_fields.keys(), *FIXED_TAIL]


def config_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def evidence_text(verdict: Verdict) -> str:
    ev = verdict.evidence
    if ev is None:
        return ""
    if ev.line_no is None:
        return f"{Path(ev.source).name}: {ev.text}"
    return f"{Path(ev.source).name}:{ev.line_no}: {ev.text}"


def csv_row(task: TaskResult, settings: Settings) -> list[str]:
    v = task.verdict
    return [
        task.key.job_id,
        task.job_name,
        "" if task.key.array_task is None else str(task.key.array_task),
        str(v.error_type) if v.error_type is not None else "",
        *(config_value(task.config.get(k)) for k in settings.analyze.config_fields.values()),
        task.config_file,
        "true" if v.retryable else "false",
        task.log_file,
        evidence_text(v),
    ]


def failures(tasks: Iterable[TaskResult]) -> list[TaskResult]:
    """The rows of the CSV: current failures, in job/array order."""
    rows = [t for t in tasks if t.current_failure]
    rows.sort(
        key=lambda t: (_job_order(t.key), t.key.array_task if t.key.array_task is not None else -1)
    )
    return rows


def render_csv(tasks: Iterable[TaskResult], settings: Settings) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_header(settings))
    for t in failures(tasks):
        writer.writerow(csv_row(t, settings))
    return buf.getvalue()


def write_csv(path: Path, tasks: Iterable[TaskResult], settings: Settings) -> int:
    """Write the CSV atomically (temp file beside it, fsync, rename). Returns the row count."""
    text = render_csv(tasks, settings)
    try:
        atomic_write(path, text.encode("utf-8"))
    except OSError as exc:
        raise InputError(f"cannot write CSV {path}: {exc.strerror}") from exc
    return text.count("\n") - 1


# ---------------------------------------------------------------------------------------
# Summary


@dataclass(slots=True)
class Summary:
    total: int = 0  # task attempts analyzed (excluding active ones)
    successful: int = 0
    failed: int = 0  # current failures (the CSV rows)
    failed_by_type: dict[str, int] = field(default_factory=dict)
    retryable: int = 0
    recovered: int = 0  # failed attempts a later attempt fixed
    retried_again: int = 0  # failed attempts whose later attempt did not succeed (yet)
    excluded_active: int = 0  # pending/running, per squeue or sacct
    unknown: int = 0  # neither success nor failure could be established

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "successful": self.successful,
            "failed": self.failed,
            "failed_by_type": dict(self.failed_by_type),
            "retryable": self.retryable,
            "recovered": self.recovered,
            "retried_again": self.retried_again,
            "excluded_active": self.excluded_active,
            "unknown": self.unknown,
        }


def summarize(tasks: Sequence[TaskResult], *, excluded_active: int = 0) -> Summary:
    s = Summary(excluded_active=excluded_active)
    by_type: Counter[str] = Counter()
    for t in tasks:
        s.total += 1
        outcome = t.verdict.outcome
        if outcome is Outcome.SUCCESS:
            s.successful += 1
        elif outcome is Outcome.FAILURE:
            if t.recovered_by is not None:
                s.recovered += 1
            elif t.superseded_by is not None:
                s.retried_again += 1
            else:
                s.failed += 1
                by_type[str(t.verdict.error_type or ErrorType.UNKNOWN)] += 1
                if t.verdict.retryable:
                    s.retryable += 1
        elif outcome is Outcome.RUNNING:
            s.excluded_active += 1
        else:
            s.unknown += 1
    order = {str(e): i for i, e in enumerate(ErrorType)}
    s.failed_by_type = dict(sorted(by_type.items(), key=lambda kv: (-kv[1], order.get(kv[0], 99))))
    return s


# ---------------------------------------------------------------------------------------
# Clusters


@dataclass(slots=True)
class Cluster:
    error_type: str
    count: int
    start: datetime | None
    end: datetime | None
    shared: dict[str, str]  # CSV config column -> the value every task in the cluster has
    keys: list[str]
    text: str

    def to_json(self) -> dict[str, Any]:
        return {
            "error_type": self.error_type,
            "count": self.count,
            "start": self.start.isoformat(timespec="seconds") if self.start else None,
            "end": self.end.isoformat(timespec="seconds") if self.end else None,
            "shared": dict(self.shared),
            "tasks": list(self.keys),
            "text": self.text,
        }


def _shared_fields(group: Sequence[TaskResult], settings: Settings) -> dict[str, str]:
    shared: dict[str, str] = {}
    for column, key in settings.analyze.config_fields.items():
        values = {config_value(t.config.get(key)) for t in group}
        if len(values) == 1:
            (value,) = values
            if value:
                shared[column] = value
    return shared


def _fmt_span(start: datetime, end: datetime) -> str:
    if start.date() == end.date():
        day = start.strftime("%Y-%m-%d")
        if start.strftime("%H:%M") == end.strftime("%H:%M"):
            return f"at {start:%H:%M} on {day}"
        return f"between {start:%H:%M} and {end:%H:%M} on {day}"
    return f"between {start:%Y-%m-%d %H:%M} and {end:%Y-%m-%d %H:%M}"


def _describe(etype: str, group: Sequence[TaskResult], shared: dict[str, str], span: str) -> str:
    noun = "failure" if len(group) == 1 else "failures"
    text = f"{len(group)} {etype} {noun}"
    if span:
        text += f" {span}"
    if shared:
        text += ", all " + ", ".join(f"{k}={v}" for k, v in shared.items())
    return text


def find_clusters(tasks: Iterable[TaskResult], settings: Settings) -> list[Cluster]:
    """Failures of one type that bunch up in time, or that all share a config value.

    Time clusters: sorted by time, a cluster grows while a failure is within
    ``cluster_window_s`` of the cluster's first one; kept when it has at least
    ``cluster_min_count`` failures. A type whose failures are not all in one time cluster
    but all share a config value is called out by that value.
    """
    window = settings.analyze.cluster_window_s
    min_count = max(1, settings.analyze.cluster_min_count)
    by_type: dict[str, list[TaskResult]] = defaultdict(list)
    for t in failures(tasks):
        by_type[str(t.verdict.error_type or ErrorType.UNKNOWN)].append(t)
    out: list[Cluster] = []
    for etype in [str(e) for e in ErrorType]:
        group = by_type.get(etype, [])
        if len(group) < min_count:
            continue
        timed = sorted(
            (t for t in group if t.when is not None), key=lambda t: t.when or datetime.min
        )
        covered = 0
        i = 0
        while i < len(timed):
            first = timed[i].when
            assert first is not None
            j = i
            while j + 1 < len(timed):
                nxt = timed[j + 1].when
                assert nxt is not None
                if (nxt - first).total_seconds() > window:
                    break
                j += 1
            members = timed[i : j + 1]
            if len(members) >= min_count:
                last = members[-1].when
                assert last is not None
                shared = _shared_fields(members, settings)
                out.append(
                    Cluster(
                        error_type=etype,
                        count=len(members),
                        start=first,
                        end=last,
                        shared=shared,
                        keys=[str(m.key) for m in members],
                        text=_describe(etype, members, shared, _fmt_span(first, last)),
                    )
                )
                covered += len(members)
            i = j + 1
        if covered < len(group):
            shared = _shared_fields(group, settings)
            if shared:
                out.append(
                    Cluster(
                        error_type=etype,
                        count=len(group),
                        start=None,
                        end=None,
                        shared=shared,
                        keys=[str(t.key) for t in group],
                        text=_describe(etype, group, shared, ""),
                    )
                )
    return out


# ---------------------------------------------------------------------------------------
# Re-run commands


@dataclass(slots=True)
class RerunCommand:
    job_id: str
    job_name: str
    array: str | None  # compressed indices, None for a plain job
    tasks: list[str]
    command: str  # a shell line for a human to run (quoted)
    source: str  # "submit_line", "settings", "placeholder"
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "job_name": self.job_name,
            "array": self.array,
            "tasks": list(self.tasks),
            "command": self.command,
            "source": self.source,
            "note": self.note,
        }


_ARRAY_OPT = re.compile(r"^(?:--array=(?P<long>.*)|-a(?P<short>.+))$")


def _takes_next_word(arg: str) -> bool:
    """Is ``arg`` an sbatch option whose value is the following word (``--chdir DIR``, ``-J X``)?"""
    if arg.startswith("--"):
        if "=" in arg:
            return False
        name = _resolve_long(arg[2:])
        return name is not None and _LONG[name] == _REQUIRED
    return len(arg) == 2 and arg[0] == "-" and arg[1] in _SHORT_VALUE


def strip_array_option(args: Sequence[str]) -> tuple[list[str], str | None]:
    """Remove ``--array=X``/``--array X``/``-a X``/``-aX``; return the rest and any throttle.

    Only options before the script are sbatch's; the script's own arguments are kept as is.
    """
    out: list[str] = []
    throttle: str | None = None
    i = 0
    in_options = True
    while i < len(args):
        arg = args[i]
        spec: str | None = None
        if in_options:
            m = _ARRAY_OPT.match(arg)
            if m:
                spec = m.group("long") if m.group("long") is not None else m.group("short")
            elif arg in ("--array", "-a") and i + 1 < len(args):
                spec = args[i + 1]
                i += 1
            elif _takes_next_word(arg) and i + 1 < len(args):
                # ``--chdir DIR``: DIR is the option's value, not the script.
                out.extend((arg, args[i + 1]))
                i += 2
                continue
            elif not arg.startswith("-"):
                in_options = False  # the script; what follows belongs to it
        if spec is not None:
            if "%" in spec:
                throttle = spec.split("%", 1)[1]
        else:
            out.append(arg)
        i += 1
    return out, throttle


def _split_submit_line(line: str) -> list[str]:
    # SubmitLine loses the user's quoting; shlex is right for the common case and a plain
    # split is the honest fallback when quotes no longer balance.
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


def _quote(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def build_command(
    job_id: str,
    job_name: str,
    indices: Sequence[int],
    sacct: SacctRow | None,
    settings: Settings,
) -> RerunCommand:
    array = compress_ranges(list(indices)) if indices else None
    tasks = [f"{job_id}_{i}" for i in sorted(set(indices))] if indices else [job_id]

    def array_args(throttle: str | None) -> list[str]:
        return [f"--array={array}{'%' + throttle if throttle else ''}"] if array else []

    if sacct is not None and sacct.submit_line.strip():
        argv = _split_submit_line(sacct.submit_line)
        if argv and Path(argv[0]).name == "sbatch":
            rest, throttle = strip_array_option(argv[1:])
            line = _quote(["sbatch", *array_args(throttle), *rest])
            if sacct.work_dir:
                line = f"cd {shlex.quote(sacct.work_dir)} && {line}"
            return RerunCommand(job_id, job_name, array, tasks, line, "submit_line")
    for script in settings.resubmit.scripts:
        if job_name and fnmatch.fnmatchcase(job_name, script.job_name):
            line = _quote(
                ["sbatch", *array_args(None), *script.sbatch_args, script.script, *script.args]
            )
            if script.work_dir:
                line = f"cd {shlex.quote(script.work_dir)} && {line}"
            return RerunCommand(job_id, job_name, array, tasks, line, "settings")
    placeholder = f"<SCRIPT for job {job_name or job_id}>"
    line = f"{_quote(['sbatch', *array_args(None)])} {placeholder}"
    return RerunCommand(
        job_id,
        job_name,
        array,
        tasks,
        line,
        "placeholder",
        note="cannot rebuild the submit command (no sacct SubmitLine, no resubmit.scripts entry)",
    )


def build_commands(
    tasks: Iterable[TaskResult], settings: Settings
) -> tuple[list[RerunCommand], list[str]]:
    """One command per original job for its retryable current failures, and comment lines
    naming the failures left out because they are not retryable."""
    retry: dict[str, list[TaskResult]] = defaultdict(list)
    skipped: dict[str, list[TaskResult]] = defaultdict(list)
    for t in failures(tasks):
        (retry if t.verdict.retryable else skipped)[t.key.job_id].append(t)
    commands: list[RerunCommand] = []
    for job_id in sorted(retry, key=lambda j: _job_order(TaskKey(j))):
        group = retry[job_id]
        indices = [t.key.array_task for t in group if t.key.array_task is not None]
        sacct = next((t.sacct for t in group if t.sacct is not None and t.sacct.submit_line), None)
        name = next((t.job_name for t in group if t.job_name), "")
        commands.append(build_command(job_id, name, indices, sacct, settings))
    comments: list[str] = []
    for job_id in sorted(skipped, key=lambda j: _job_order(TaskKey(j))):
        by_type: dict[str, list[int | None]] = defaultdict(list)
        for t in skipped[job_id]:
            by_type[str(t.verdict.error_type or ErrorType.UNKNOWN)].append(t.key.array_task)
        parts = []
        for etype, idx in by_type.items():
            numbered = [i for i in idx if i is not None]
            where = f"[{compress_ranges(numbered)}]" if numbered else ""
            parts.append(f"{job_id}{where} {etype}")
        comments.append("# not retryable, left out: " + "; ".join(parts))
    return commands, comments
