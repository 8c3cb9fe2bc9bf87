"""``slurm-triage analyze``: the seed workflow, once, over a folder of job logs.

Walk the logs (logs.py), ask Slurm once each which tasks are still active (squeue) and
how the jobs ended (one batched sacct), classify every task (classify.py), link re-runs
to the tasks they recovered, map array tasks to their config files, and report (report.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

# imported before the worker processes fork, so they inherit it rather than each import it
from .classify import build_table, decide, pack_findings, scan_findings, unpack_findings
from .errors import InputError, SlurmError, TriageError
from .logs import JobLogs, scan_log_tree
from .model import ACTIVE_STATES, ErrorType, Outcome, SacctRow, TaskKey, Verdict
from .report import (
    Cluster,
    RerunCommand,
    Summary,
    TaskResult,
    build_commands,
    csv_row,
    evidence_text,
    experiment_of,
    failures,
    find_clusters,
    link_attempts,
    summarize,
    write_csv,
)

if TYPE_CHECKING:
    from concurrent.futures import Future, ProcessPoolExecutor

    from .classify import PackedFindings, ScanFindings, SignatureTable
    from .settings import ClassifySettings, Settings

# Below these, starting worker processes costs more than it saves.
PARALLEL_MIN_FILES = 400
PARALLEL_MIN_BYTES = 64 << 20
PROGRESS_INTERVAL_S = 0.2
# Work units for the pool: up to this many small jobs, a job this big goes alone.
BATCH_JOBS = 64
BATCH_MAX_BYTES = 8 << 20


@dataclass(slots=True)
class AnalyzeResult:
    log_dir: Path
    csv_path: Path
    csv_rows: int
    summary: Summary
    tasks: list[TaskResult]
    settings: Settings
    commands: list[RerunCommand]
    not_retried: list[str]
    clusters: list[Cluster]
    warnings: list[str] = field(default_factory=list)
    offline: bool = True

    @property
    def exit_code(self) -> int:
        # Finding failures is the command doing its job, not failing at it.
        return 0

    def _task_json(self, t: TaskResult) -> dict[str, Any]:
        row = csv_row(t, self.settings)
        v = t.verdict
        return {
            "key": str(t.key),
            "job_id": t.key.job_id,
            "job_name": t.job_name,
            "array_id": t.key.array_task,
            "error_type": str(v.error_type) if v.error_type else None,
            "retryable": v.retryable,
            "hung": v.hung,
            "evidence": v.evidence.to_json() if v.evidence else None,
            "config": dict(zip(self.settings.analyze.config_fields, row[4:-4], strict=True)),
            "config_file": t.config_file or None,
            "config_error": t.config_error,
            "log_file": t.log_file or None,
            "when": t.when.isoformat(timespec="seconds") if t.when else None,
        }

    def to_json(self) -> dict[str, Any]:
        recovered = [t for t in self.tasks if t.failed and t.recovered_by is not None]
        summary = self.summary.to_json()
        summary["csv_path"] = str(self.csv_path)
        summary["offline"] = self.offline
        return {
            "summary": summary,
            "failures": [self._task_json(t) for t in failures(self.tasks)],
            "recovered": [
                {
                    "key": str(t.key),
                    "error_type": str(t.verdict.error_type) if t.verdict.error_type else None,
                    "recovered_by": str(t.recovered_by),
                    "log_file": t.log_file or None,
                }
                for t in recovered
            ],
            "commands": [c.to_json() for c in self.commands],
            "not_retried": list(self.not_retried),
            "clusters": [c.to_json() for c in self.clusters],
            "warnings": list(self.warnings),
        }

    def render_text(self) -> str:
        s = self.summary
        lines: list[str] = []
        mode = "--offline: logs only" if self.offline else "logs + squeue + sacct"
        lines.append(f"Analyzed {s.total} task attempts in {self.log_dir} ({mode})")
        lines.append(f"  successful:                {s.successful}")
        lines.append(f"  failed:                    {s.failed} ({s.retryable} retryable)")
        for etype, n in s.failed_by_type.items():
            lines.append(f"    {etype:<24}{n}")
        lines.append(f"  recovered by a later run:  {s.recovered}")
        if s.retried_again:
            lines.append(f"  failed again in a re-run:  {s.retried_again}")
        lines.append(f"  running/pending, excluded: {s.excluded_active}")
        lines.append(f"  no verdict (unknown):      {s.unknown}")
        lines.append(f"CSV: {self.csv_path} ({self.csv_rows} rows)")
        rows = failures(self.tasks)
        if rows:
            lines.append("")
            lines.append("Failures:")
            for t in rows:
                etype = str(t.verdict.error_type or ErrorType.UNKNOWN)
                lines.append(f"  {t.key!s:<14} {etype:<15} {evidence_text(t.verdict)}")
        recovered = [t for t in self.tasks if t.failed and t.recovered_by is not None]
        if recovered:
            lines.append("")
            lines.append("Recovered (not listed for re-run):")
            for t in recovered:
                etype = str(t.verdict.error_type or ErrorType.UNKNOWN)
                lines.append(f"  {t.key!s:<14} {etype:<15} recovered by {t.recovered_by}")
        if self.clusters:
            lines.append("")
            lines.append("Clusters:")
            lines.extend(f"  {c.text}" for c in self.clusters)
        lines.append("")
        if self.commands or self.not_retried:
            lines.append("Re-run commands (retryable failures only):")
            for c in self.commands:
                n = len(c.tasks)
                lines.append(f"# job {c.job_id} ({c.job_name or 'unnamed'}): {n} task(s)")
                if c.note:
                    lines.append(f"# {c.note}")
                lines.append(c.command)
            lines.extend(self.not_retried)
        else:
            lines.append("Nothing to re-run.")
        if self.warnings:
            lines.append("")
            lines.append("Warnings:")
            lines.extend(f"  {w}" for w in self.warnings)
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Scanning (optionally in worker processes)

_WORKER_TABLE: SignatureTable | None = None


_WORKER_SETTINGS: ClassifySettings | None = None


def _init_worker(classify_settings: ClassifySettings) -> None:
    global _WORKER_TABLE, _WORKER_SETTINGS
    if _WORKER_TABLE is not None and _WORKER_SETTINGS == classify_settings:
        return  # inherited from the parent through fork
    _WORKER_TABLE = build_table(classify_settings)
    _WORKER_SETTINGS = classify_settings


def _scan_files(paths: Sequence[Path | str]) -> list[ScanFindings | str]:
    """Findings per file, or an error message for a file that could not be read."""
    assert _WORKER_TABLE is not None
    out: list[ScanFindings | str] = []
    for path in paths:
        if out and not isinstance(out[-1], str) and out[-1].success is not None:
            break  # a success decides the task (decide): its other log need not be read
        try:
            out.append(scan_findings(path, _WORKER_TABLE))
        except OSError as exc:
            out.append(f"cannot read {path}: {exc.strerror or exc}")
        except TriageError as exc:
            out.append(f"cannot read {path}: {exc}")
    return out


def _size(job: JobLogs) -> int:
    if job.size:
        return job.size
    total = 0
    for p in job.paths:
        try:
            total += p.stat().st_size
        except OSError:
            pass  # reported when it is read
    return total


def _batches(jobs: Sequence[JobLogs]) -> list[list[JobLogs]]:
    """Jobs grouped for the workers, biggest work first: a big job alone (its file takes a
    worker for a while), small ones in runs of BATCH_JOBS (one pickle round trip per batch
    instead of per job)."""
    sized = [(_size(job), i) for i, job in enumerate(jobs)]
    big = sorted(((n, i) for n, i in sized if n >= BATCH_MAX_BYTES), reverse=True)
    out: list[list[JobLogs]] = [[jobs[i]] for _n, i in big]
    run: list[JobLogs] = []
    run_bytes = 0
    for n, i in sized:
        if n >= BATCH_MAX_BYTES:
            continue
        run.append(jobs[i])
        run_bytes += n
        if len(run) >= BATCH_JOBS or run_bytes >= BATCH_MAX_BYTES:
            out.append(run)
            run, run_bytes = [], 0
    if run:
        out.append(run)
    return out


def _scan_batch(batch: Sequence[Sequence[str]]) -> list[list[PackedFindings | str]]:
    """``_scan_files`` for each job of a batch, in a worker process (packed for the trip)."""
    return [
        [r if isinstance(r, str) else pack_findings(r) for r in _scan_files(paths)]
        for paths in batch
    ]


class _ScanPool:
    """Scans the jobs handed to ``add`` (as the walk finds them) and gives each job's
    results back on request.

    Worker processes start once the work is big enough to pay for them; jobs handed over
    before that wait. So on a large tree the workers scan the first folders while the
    walk goes on, and build their own signature table meanwhile (forked early, they do
    not inherit one). A small tree is scanned in this process."""

    def __init__(self, classify_settings: ClassifySettings) -> None:
        self.settings = classify_settings
        self.pool: ProcessPoolExecutor | None = None
        self.waiting: list[JobLogs] = []
        self.waiting_bytes = 0
        self.futures: dict[int, tuple[Future[list[list[PackedFindings | str]]], int]] = {}
        self.parallel = (os.cpu_count() or 1) > 1

    def add(self, jobs: Sequence[JobLogs]) -> None:
        self.waiting.extend(jobs)
        self.waiting_bytes += sum(_size(job) for job in jobs)
        if self.pool is None and not (
            self.parallel
            and (
                len(self.waiting) >= PARALLEL_MIN_FILES or self.waiting_bytes >= PARALLEL_MIN_BYTES
            )
        ):
            return
        if self.pool is None:
            from concurrent.futures import ProcessPoolExecutor  # only for a big tree

            self.pool = ProcessPoolExecutor(
                max_workers=min(os.cpu_count() or 1, 8),
                initializer=_init_worker,
                initargs=(self.settings,),
            )
        for batch in _batches(self.waiting):
            # strings: a Path pickles as its parts and is parsed again on the other side
            future = self.pool.submit(_scan_batch, [[str(p) for p in job.paths] for job in batch])
            for i, job in enumerate(batch):
                self.futures[id(job)] = (future, i)
        self.waiting, self.waiting_bytes = [], 0

    def result(self, job: JobLogs) -> list[ScanFindings | str]:
        """The findings (or read errors) of each of ``job``'s files, in order."""
        submitted = self.futures.pop(id(job), None)
        if submitted is not None:
            future, i = submitted
            return [r if isinstance(r, str) else unpack_findings(r) for r in future.result()[i]]
        _init_worker(self.settings)
        return _scan_files(job.paths)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """``\\ranalyzed 1200/5000 files`` on a terminal, redrawn at most every 0.2 s."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total = total
        self.stream = stream
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if done < self.total and now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last = now
        self.shown = True
        self.stream.write(f"\ranalyzed {done}/{self.total} files")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.shown:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------
# Slurm


def _query_slurm(
    settings: Settings, job_ids: list[str], warnings: list[str]
) -> tuple[set[TaskKey], dict[TaskKey, SacctRow]]:
    """Active tasks (squeue, one call) and sacct rows (one batched call). Failures warn."""
    from .slurm import SlurmRunner, query_sacct, query_squeue

    runner = SlurmRunner()
    active: set[TaskKey] = set()
    rows: dict[TaskKey, SacctRow] = {}
    try:
        # By user, not by id: squeue rejects a list holding an id it no longer knows.
        for q in query_squeue(runner, settings.slurm, user=settings.slurm.user):
            active.add(q.key)
    except SlurmError as exc:
        warnings.append(f"squeue unavailable, pending/running tasks not excluded: {exc}")
    if job_ids:
        try:
            for r in query_sacct(runner, settings.slurm, job_ids=job_ids):
                rows[r.key] = r
        except SlurmError as exc:
            warnings.append(f"sacct unavailable, classifying from logs only: {exc}")
    return active, rows


# ---------------------------------------------------------------------------------------
# Configs


# An experiment config is a few KiB; a bigger file is not one, and reading it whole per
# task would make memory depend on it.
MAX_CONFIG_BYTES = 16 * 2**20


class _ConfigTooLarge(Exception):
    pass


def load_config(
    results_dir: Path | None, task: int | None, settings: Settings, warnings: list[str]
) -> tuple[str, dict[str, Any], str | None]:
    """(config file shown in the CSV, its JSON object, a problem) for an array task."""
    if results_dir is None or task is None:
        return "", {}, None
    try:
        rel = settings.analyze.config_pattern.format(task=task)
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(
            f"analyze.config_pattern {settings.analyze.config_pattern!r}: {exc}"
        ) from exc
    path = results_dir / rel
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise _ConfigTooLarge
        data = json.loads(raw.decode("utf-8"))
    except _ConfigTooLarge:
        problem = f"config {path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; not read"
    except RecursionError:
        problem = f"malformed config {path}: nested too deeply"
    except FileNotFoundError:
        problem = f"no config for task {task}: {path} not found"
        warnings.append(problem)
        return "", {}, problem
    except OSError as exc:
        problem = f"cannot read config {path}: {exc.strerror}"
    except UnicodeDecodeError:
        problem = f"malformed config {path}: not UTF-8"
    except json.JSONDecodeError as exc:
        problem = f"malformed config {path}: {exc.msg} at line {exc.lineno}"
    else:
        if isinstance(data, dict):
            return str(path), data, None
        problem = f"malformed config {path}: not a JSON object"
    warnings.append(problem + " (config columns left empty)")
    return str(path), {}, problem


# ---------------------------------------------------------------------------------------
# The command


def _select(jobs: list[JobLogs], wanted: list[str] | None) -> list[JobLogs]:
    if not wanted:
        return jobs
    ids = {w for w in wanted if "_" not in w}
    keys = {w for w in wanted if "_" in w}
    return [j for j in jobs if j.key.job_id in ids or str(j.key) in keys]


def _default_csv_path(results_dir: Path | None) -> Path:
    return (results_dir if results_dir is not None else Path(".")) / "failed_jobs.csv"


def _check_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_dir():
        raise InputError(f"{what} is not a folder: {path}")


def run_analyze(
    settings: Settings,
    *,
    log_dir: Path,
    results_dir: Path | None = None,
    jobs: list[str] | None = None,
    csv_path: Path | None = None,
    offline: bool = False,
    progress: bool = False,
    progress_stream: TextIO | None = None,
) -> AnalyzeResult:
    _check_dir(log_dir, "log folder")
    if results_dir is not None:
        _check_dir(results_dir, "results folder")
    target = csv_path if csv_path is not None else _default_csv_path(results_dir)
    if target.is_dir():
        raise InputError(f"--csv points at a folder: {target}")

    scans = _ScanPool(settings.classify)
    try:
        return _analyze(
            settings, scans, log_dir, results_dir, jobs, target, offline, progress, progress_stream
        )
    finally:
        scans.close()


def _analyze(
    settings: Settings,
    scans: _ScanPool,
    log_dir: Path,
    results_dir: Path | None,
    jobs: list[str] | None,
    target: Path,
    offline: bool,
    progress: bool,
    progress_stream: TextIO | None,
) -> AnalyzeResult:
    # Offline and without --jobs every job found is read: the workers get them folder by
    # folder while the walk goes on.
    early = offline and not jobs
    tree = scan_log_tree(log_dir, settings.analyze, on_jobs=scans.add if early else None)
    warnings = list(tree.warnings)
    if not tree.jobs:
        raise InputError(
            f"no job logs found in {log_dir} (looked for {', '.join(settings.analyze.log_suffixes)}"
            " files named like PREFIX_JOBID_TASK or slurm-JOBID)"
        )
    selected = _select(tree.jobs, jobs)
    if not selected:
        raise InputError(f"no job logs for jobs {','.join(jobs or [])} in {log_dir}")
    if jobs:
        # Later attempts of the selected tasks are read too: they decide "recovered".
        chosen = {id(j) for j in selected}
        names = {experiment_of(j.prefix, j.key) for j in selected}
        first = min(int(j.key.job_id) for j in selected)
        selected = [
            j
            for j in tree.jobs
            if id(j) in chosen
            or (
                experiment_of(j.prefix, j.key) in names
                and int(j.key.job_id) > first
                and j.key.array_task is not None
            )
        ]
        extra_ids = {id(j) for j in selected} - chosen
    else:
        extra_ids = set()

    job_ids = sorted({j.key.job_id for j in selected}, key=int)
    active: set[TaskKey] = set()
    sacct_rows: dict[TaskKey, SacctRow] = {}
    if not offline:
        active, sacct_rows = _query_slurm(settings, job_ids, warnings)

    retryable = settings.resubmit.retryable_types

    seen_keys = {j.key for j in selected}
    tasks: list[TaskResult] = []
    extra_tasks: set[int] = set()
    to_scan: list[JobLogs] = []
    for job in selected:
        row = sacct_rows.get(job.key)
        if job.key in active or (row is not None and row.state in ACTIVE_STATES):
            # Kept as "running": an earlier failed attempt of it is being retried already.
            tasks.append(_task(job, Verdict(outcome=Outcome.RUNNING), row))
            if id(job) in extra_ids:
                extra_tasks.add(id(tasks[-1]))
        else:
            to_scan.append(job)

    if not early:
        scans.add(to_scan)
    meter = _Progress(len(to_scan), (progress_stream or sys.stderr) if progress else None)
    try:
        for done, job in enumerate(to_scan, 1):
            results = scans.result(job)
            meter(done)
            row = sacct_rows.get(job.key)
            found: list[ScanFindings] = []
            for r in results:
                if isinstance(r, str):
                    warnings.append(r)
                else:
                    found.append(r)
            if not found and row is None:
                continue  # nothing readable and nothing from Slurm: no verdict possible
            verdict = decide(found, row, settings.classify, retryable_types=retryable)
            tasks.append(_task(job, verdict, row))
            if id(job) in extra_ids:
                extra_tasks.add(id(tasks[-1]))
    finally:
        meter.close()

    # Tasks sacct knows of but that left no log (a node failure before the job started).
    for key, row in sorted(sacct_rows.items()):
        if key in seen_keys or not row.finished or key in active:
            continue
        if any(key.job_id == j.key.job_id for j in selected if id(j) in extra_ids):
            continue
        verdict = decide([], row, settings.classify, retryable_types=retryable)
        tasks.append(
            TaskResult(key=key, job_name=row.job_name, verdict=verdict, when=row.end, sacct=row)
        )

    link_attempts(tasks)
    tasks = [t for t in tasks if id(t) not in extra_tasks]
    for t in failures(tasks):
        t.config_file, t.config, t.config_error = load_config(
            results_dir, t.key.array_task, settings, warnings
        )
    summary = summarize(tasks)
    rows = write_csv(target, tasks, settings)
    commands, not_retried = build_commands(tasks, settings)
    return AnalyzeResult(
        log_dir=log_dir,
        csv_path=target,
        csv_rows=rows,
        summary=summary,
        tasks=tasks,
        settings=settings,
        commands=commands,
        not_retried=not_retried,
        clusters=find_clusters(tasks, settings),
        warnings=warnings,
        offline=offline,
    )


def _task(job: JobLogs, verdict: Verdict, row: SacctRow | None) -> TaskResult:
    name = row.job_name if row is not None and row.job_name else ""
    if not name and job.prefix != "slurm":  # slurm-JOBID.out names no job
        name = job.prefix
    when = row.end if row is not None and row.end is not None else None
    return TaskResult(
        key=job.key,
        job_name=name,
        verdict=verdict,
        log_file=str(job.main),
        when=when or datetime.fromtimestamp(job.mtime),
        sacct=row,
    )


__all__ = ["AnalyzeResult", "load_config", "run_analyze"]
