"""Finding job logs, mapping file names to tasks, and reading only the new bytes of a log.

Two users: ``analyze`` walks a folder once (:func:`scan_log_tree`), the daemon follows
growing files tick after tick (:func:`read_new_bytes` / :func:`advance_cursor`).

File names: each pattern is a regular expression matched against the file *stem* (the name
without a suffix from ``analyze.log_suffixes``) with named groups ``job`` and optionally
``task`` and ``prefix``. The first pattern that matches wins. The defaults:

- ``slurm-JOBID`` / ``slurm-JOBID_TASK`` (Slurm's own default names): any job id.
- ``PREFIX_JOBID_TASK`` and ``PREFIX_JOBID`` (``_`` or ``-`` before the id), and a bare
  ``JOBID[_TASK]``: the job id needs at least 3 digits, and a number that reads as a year
  (1970-2099) or a date (YYYYMMDD) is *not* taken as a job id, so ``results_2024.err`` or
  ``sweep_20260125.err`` are skipped rather than misread. A cluster young enough to hand
  out such ids can set ``analyze.log_name_patterns``.
"""

from __future__ import annotations

import logging
import operator
import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, InputError
from .model import TaskKey

if TYPE_CHECKING:
    from .classify import ScanFindings, SignatureTable
    from .records import LogCursor
    from .settings import AnalyzeSettings

log = logging.getLogger(__name__)

# A number that is a year or a calendar date is far more often part of an experiment
# name than a job id; see the module docstring.
_NOT_A_DATE = r"(?!(?:19[7-9]\d|20\d\d)(?:(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))?(?:_|$))"

DEFAULT_LOG_NAME_PATTERNS: tuple[str, ...] = (
    r"^(?P<prefix>slurm)-(?P<job>\d+)(?:_(?P<task>\d+))?$",
    rf"^(?P<prefix>.+?)[_-]{_NOT_A_DATE}(?P<job>\d{{3,}})_(?P<task>\d+)$",
    rf"^(?P<prefix>.+?)[_-]{_NOT_A_DATE}(?P<job>\d{{3,}})$",
    rf"^{_NOT_A_DATE}(?P<job>\d{{3,}})(?:_(?P<task>\d+))?$",
)

# Bytes read per call; bounds memory whatever the file size.
CHUNK_SIZE = 1 << 20
# The first bytes of a file are fingerprinted so a rewrite in place (a requeued job's log is
# truncated and written again, same inode) is noticed even when it has already regrown.
HEAD_BYTES = 1024


@dataclass(frozen=True, slots=True)
class JobLogs:
    """The log files of one task: the ``.err`` and its sibling ``.out`` (either may be absent)."""

    key: TaskKey
    prefix: str
    err: Path | None
    out: Path | None
    mtime: float
    # bytes in both files when walked (0: unknown); sizes the work units of analyze
    size: int = 0

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.err, self.out) if p is not None]

    @property
    def main(self) -> Path:
        """The file to name in reports: the ``.err`` when there is one."""
        first = self.err or self.out
        assert first is not None  # a JobLogs always has at least one file
        return first


@dataclass(slots=True)
class LogTree:
    """What a walk of a log folder found."""

    jobs: list[JobLogs] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: int = 0  # files with a log suffix whose name did not match a pattern
    total_bytes: int = 0


def compile_patterns(patterns: Sequence[str] | None) -> list[re.Pattern[str]]:
    """The user's patterns, or the defaults when none are configured."""
    texts = list(patterns) if patterns else list(DEFAULT_LOG_NAME_PATTERNS)
    compiled: list[re.Pattern[str]] = []
    for text in texts:
        try:
            # DOTALL: a file name may contain a newline, and "." must still match it
            rx = re.compile(text, re.DOTALL)
        except re.error as exc:
            raise ConfigError(f"analyze.log_name_patterns: bad regex {text!r}: {exc}") from exc
        if "job" not in rx.groupindex:
            raise ConfigError(f"analyze.log_name_patterns: {text!r} has no (?P<job>...) group")
        compiled.append(rx)
    return compiled


def parse_log_name(
    name: str, patterns: Sequence[re.Pattern[str]] | Sequence[str] | None = None
) -> tuple[str, TaskKey] | None:
    """``"ttc_claude_4150554_12"`` -> ``("ttc_claude", TaskKey("4150554", 12))``; None if no match.

    ``name`` is a file stem (no suffix). A file name with a suffix also works when the
    suffix is not part of what the pattern matches (the defaults anchor on digits).
    """
    compiled: Sequence[re.Pattern[str]]
    if patterns and isinstance(patterns[0], str):
        compiled = compile_patterns([str(p) for p in patterns])
    elif patterns:
        compiled = [p for p in patterns if isinstance(p, re.Pattern)]
    else:
        compiled = _default_compiled()
    for rx in compiled:
        m = rx.match(name)
        if m is None:
            continue
        job = m.group("job")
        if not job or not job.isdigit():
            continue
        task_text = m.groupdict().get("task")
        task = int(task_text) if task_text else None
        prefix = m.groupdict().get("prefix") or ""
        return prefix, TaskKey(str(int(job)), task)
    return None


_DEFAULTS_CACHE: list[re.Pattern[str]] = []


def _default_compiled() -> list[re.Pattern[str]]:
    if not _DEFAULTS_CACHE:
        _DEFAULTS_CACHE.extend(compile_patterns(None))
    return _DEFAULTS_CACHE


def _split_suffix(name: str, suffixes: Sequence[str]) -> tuple[str, str] | None:
    for suffix in suffixes:
        if suffix and name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return None


def _parse_stem(stem: str, patterns: Sequence[re.Pattern[str]]) -> tuple[str, TaskKey] | None:
    """``parse_log_name`` for patterns compiled already (the walk calls it per file)."""
    for rx in patterns:
        m = rx.match(stem)
        if m is None:
            continue
        groups = m.groupdict()
        job = groups["job"]
        if not job or not job.isdigit():
            continue
        task_text = groups.get("task")
        return groups.get("prefix") or "", TaskKey(
            str(int(job)), int(task_text) if task_text else None
        )
    return None


def _child_maker(folder: Path) -> Callable[[str], Path]:
    """``folder / name`` for a name from ``scandir`` (never a separator in it).

    ``Path._make_child_relpath`` skips re-parsing the name (4x cheaper; thousands of
    files per walk); the public operator is the fallback where it does not exist."""
    make = getattr(folder, "_make_child_relpath", None)
    if callable(make):
        return make  # type: ignore[no-any-return]
    return folder.joinpath


def scan_log_tree(
    log_dir: Path,
    settings: AnalyzeSettings,
    *,
    on_jobs: Callable[[list[JobLogs]], None] | None = None,
) -> LogTree:
    """Walk ``log_dir`` recursively and group log files by task.

    Symlinked folders are followed once (a loop is detected by device and inode); an
    unreadable subfolder is a warning, not an error. Two log sets for the same task (a copy
    in another folder) keep the newest and warn. ``on_jobs`` gets each folder's log sets
    as soon as the folder is read (including one a later folder's copy replaces).
    """
    patterns = compile_patterns(settings.log_name_patterns)
    suffixes = list(settings.log_suffixes) or [".err", ".out"]
    suffix_tuple = tuple(s for s in suffixes if s)
    err_suffix = suffixes[0]
    tree = LogTree()
    by_key: dict[TaskKey, tuple[JobLogs, tuple[int, int, str]]] = {}

    try:
        root_st = os.stat(log_dir)
    except OSError as exc:
        raise InputError(f"cannot read log folder {log_dir}: {exc.strerror}") from exc
    seen_dirs: set[tuple[int, int]] = {(root_st.st_dev, root_st.st_ino)}
    # strings, not Path objects: building a Path per file was most of the walk's time
    stack: list[tuple[str, Path]] = [(os.fspath(log_dir), log_dir)]
    while stack:
        folder_s, folder = stack.pop()
        try:
            with os.scandir(folder_s) as it:
                entries = sorted(it, key=operator.attrgetter("name"))
        except OSError as exc:
            if folder == log_dir:
                raise InputError(f"cannot read log folder {log_dir}: {exc.strerror}") from exc
            tree.warnings.append(f"skipped unreadable folder {folder}: {exc.strerror}")
            continue
        # stem -> [prefix, key, {suffix: name}, newest mtime, bytes]; the .err and the .out
        # share a stem, parsed once
        groups: dict[str, list[Any]] = {}
        unparsed: set[str] = set()
        subdirs: list[tuple[str, Path]] = []
        for entry in entries:
            name = entry.name
            try:
                if name.endswith(suffix_tuple) and not entry.is_dir():
                    split = _split_suffix(name, suffixes)
                    if split is None:
                        continue
                    stem, suffix = split
                    group = groups.get(stem)
                    if group is None:
                        parsed = None if stem in unparsed else _parse_stem(stem, patterns)
                        if parsed is None:
                            unparsed.add(stem)
                            log.debug("not a job log name, skipped: %s", entry.path)
                            tree.skipped += 1
                            continue
                    st = entry.stat()
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    if group is None:
                        group = groups[stem] = [parsed[0], parsed[1], {}, 0.0, 0]  # type: ignore[index]
                    group[2][suffix] = name
                    if st.st_mtime > group[3]:
                        group[3] = st.st_mtime
                    group[4] += st.st_size
                elif entry.is_dir():
                    st = entry.stat()
                    ident = (st.st_dev, st.st_ino)
                    if ident in seen_dirs:
                        log.debug("folder already visited (symlink loop?): %s", entry.path)
                        continue
                    seen_dirs.add(ident)
                    subdirs.append((entry.path, folder / name))
            except OSError as exc:
                tree.warnings.append(f"skipped {folder / name}: {exc.strerror}")
                continue
        # Reversed so the stack pops folders in name order: a stable output order.
        stack.extend(reversed(subdirs))
        if groups:
            found = _add_groups(tree, by_key, groups, folder, suffixes, err_suffix)
            if on_jobs is not None:
                on_jobs(found)

    tree.jobs = [job for job, _order in sorted(by_key.values(), key=operator.itemgetter(1))]
    return tree


def _add_groups(
    tree: LogTree,
    by_key: dict[TaskKey, tuple[JobLogs, tuple[int, int, str]]],
    groups: dict[str, list[Any]],
    folder: Path,
    suffixes: Sequence[str],
    err_suffix: str,
) -> list[JobLogs]:
    """One folder's log sets as JobLogs (returned), the newest kept when a task has two."""
    found: list[JobLogs] = []
    child = _child_maker(folder)
    other_suffixes = suffixes[1:]
    base = str(folder)
    base = base if base.endswith("/") else base + "/"  # str(folder / name), cheaper
    for prefix, key, files, mtime, size in groups.values():
        err = files.get(err_suffix)
        out = next((files[s] for s in other_suffixes if s in files), None)
        tree.total_bytes += size
        job = JobLogs(
            key=key,
            prefix=prefix,
            err=child(err) if err is not None else None,
            out=child(out) if out is not None else None,
            mtime=mtime,
            size=size,
        )
        found.append(job)
        main = base + str(err if err is not None else out)  # a group has one or both
        order = (*_job_sort(key), main)
        previous = by_key.get(key)
        if previous is not None:
            old = previous[0]
            keep, drop = (job, old) if job.mtime > old.mtime else (old, job)
            tree.warnings.append(
                f"two log sets for task {key}: {keep.main} and {drop.main};"
                f" using the newer {keep.main}"
            )
            if keep is job:
                by_key[key] = (job, order)
        else:
            by_key[key] = (job, order)
    return found


def _job_sort(key: TaskKey) -> tuple[int, int]:
    return (
        int(key.job_id) if key.job_id.isdigit() else 0,
        -1 if key.array_task is None else key.array_task,
    )


def find_job_logs(
    log_dir: Path, settings: AnalyzeSettings, warnings: list[str] | None = None
) -> list[JobLogs]:
    """The job logs under ``log_dir`` (see :func:`scan_log_tree`); warnings appended if given."""
    tree = scan_log_tree(log_dir, settings)
    if warnings is not None:
        warnings.extend(tree.warnings)
    return tree.jobs


# ---------------------------------------------------------------------------------------
# The daemon's walk: every tick, over possibly 100,000 files


class LogWalker:
    """Lists job log files cheaply, tick after tick.

    Unlike :func:`scan_log_tree` it neither sorts, pairs nor stats: the daemon looks a path
    up in its cursors first and stats only files whose job is still open, so a tick over a
    large, quiet tree costs one ``getdents`` per folder and a dict lookup per file. Names
    are parsed once per process (they never change).
    """

    def __init__(self, settings: AnalyzeSettings) -> None:
        self.patterns = compile_patterns(settings.log_name_patterns)
        self.suffixes = tuple(s for s in settings.log_suffixes if s) or (".err", ".out")
        self._names: dict[str, TaskKey | None] = {}

    def key_of(self, name: str) -> TaskKey | None:
        """The task a log file name belongs to (cached), None when it is not a job log."""
        try:
            return self._names[name]
        except KeyError:
            pass
        split = _split_suffix(name, self.suffixes)
        parsed = parse_log_name(split[0], self.patterns) if split is not None else None
        key = parsed[1] if parsed is not None else None
        if len(self._names) > 1_000_000:
            self._names.clear()  # bounded memory on a tree that churns names
        self._names[name] = key
        return key

    def walk(self, log_dir: Path, warnings: list[str]) -> Iterable[tuple[str, os.DirEntry[str]]]:
        """(path, entry) of every file with a log suffix under ``log_dir``.

        Symlinked folders are followed once (loops detected by device and inode);
        unreadable folders become warnings. Raises InputError when ``log_dir`` itself
        cannot be read.
        """
        try:
            root = os.stat(log_dir)
        except OSError as exc:
            raise InputError(f"cannot read log folder {log_dir}: {exc.strerror}") from exc
        seen = {(root.st_dev, root.st_ino)}
        stack = [os.fspath(log_dir)]
        suffixes = self.suffixes
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = list(it)
            except OSError as exc:
                if folder == os.fspath(log_dir):
                    raise InputError(f"cannot read log folder {log_dir}: {exc.strerror}") from exc
                warnings.append(f"skipped unreadable folder {folder}: {exc.strerror}")
                continue
            for entry in entries:
                name = entry.name
                if name.endswith(suffixes):
                    yield entry.path, entry
                    continue
                try:
                    if entry.is_dir(follow_symlinks=True):
                        st = entry.stat(follow_symlinks=True)
                        ident = (st.st_dev, st.st_ino)
                        if ident not in seen:
                            seen.add(ident)
                            stack.append(entry.path)
                except OSError:
                    continue


# ---------------------------------------------------------------------------------------
# The daemon's incremental reader


@dataclass(frozen=True, slots=True)
class FileStat:
    dev: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStat:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def stat_log(path: Path | str) -> FileStat | None:
    """The file's identity and size, or None when it does not exist (yet)."""
    try:
        return FileStat.of(os.stat(path))
    except FileNotFoundError:
        return None


def restart_reason(cursor: LogCursor, st: FileStat) -> str | None:
    """Why reading must start again from byte 0, or None to continue at ``cursor.offset``.

    Pure: compares what the cursor remembers with a fresh stat. The head fingerprint
    (checked separately, it needs a read) catches a rewrite that has regrown past the offset.
    """
    if cursor.inode == 0 and cursor.offset == 0:
        return None  # never read yet
    if (st.dev, st.inode) != (cursor.dev, cursor.inode):
        return "rotated"
    if st.size < cursor.offset:
        return "truncated"
    if cursor.mtime_ns and st.mtime_ns < cursor.mtime_ns:
        return "rewritten"
    return None


def _head_signature(data: bytes) -> str:
    import hashlib  # the daemon's path only: analyze never fingerprints

    return f"{len(data)}:{hashlib.sha1(data, usedforsecurity=False).hexdigest()}"


@dataclass(slots=True)
class CursorRead:
    """The outcome of one :func:`read_new_bytes` call."""

    cursor: LogCursor
    bytes_read: int = 0
    restarted: str | None = None  # "rotated", "truncated", "rewritten"
    missing: bool = False
    more: bool = False  # stopped at max_bytes; call again to read the rest


def read_new_bytes(
    cursor: LogCursor,
    sink: Callable[[bytes], None],
    *,
    on_restart: Callable[[str], None] | None = None,
    max_bytes: int | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> CursorRead:
    """Feed the bytes written since ``cursor.offset`` to ``sink``, in bounded chunks.

    Updates ``cursor`` in place (dev, inode, size, offset, mtime_ns, head; not
    ``scan_state``, which is the caller's). On truncation, rotation or rewrite,
    ``on_restart(reason)`` runs first so the caller can drop its scanner state, then the
    file is read from byte 0.
    ``max_bytes`` bounds one call (a huge file is read over several ticks).
    Raises OSError when the file exists but cannot be read.
    """
    path = cursor.path
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return CursorRead(cursor=cursor, missing=True)
    result = CursorRead(cursor=cursor)
    try:
        st = FileStat.of(os.fstat(fd))
        reason = restart_reason(cursor, st)
        if reason is None and cursor.offset > 0 and cursor.head:
            want = int(cursor.head.split(":", 1)[0])
            if _head_signature(os.pread(fd, want, 0)) != cursor.head:
                reason = "rewritten"
        if reason is not None:
            result.restarted = reason
            if on_restart is not None:
                on_restart(reason)
            cursor.offset = 0
            cursor.head = ""
            cursor.done = False
        cursor.dev, cursor.inode = st.dev, st.inode
        budget = max_bytes if max_bytes is not None else st.size
        # Read up to the size seen now; bytes appended meanwhile wait for the next call.
        end = min(st.size, cursor.offset + budget)
        pos = cursor.offset
        while pos < end:
            data = os.pread(fd, min(chunk_size, end - pos), pos)
            if not data:
                break  # shrank under us; the next call sees the truncation
            sink(data)
            pos += len(data)
        result.bytes_read = pos - cursor.offset
        cursor.offset = pos
        cursor.size = st.size
        cursor.mtime_ns = st.mtime_ns
        result.more = pos < st.size
        if (not cursor.head or int(cursor.head.split(":", 1)[0]) < HEAD_BYTES) and pos > 0:
            cursor.head = _head_signature(os.pread(fd, min(pos, HEAD_BYTES), 0))
    finally:
        os.close(fd)
    return result


def advance_cursor(
    cursor: LogCursor,
    table: SignatureTable,
    *,
    max_bytes: int | None = None,
) -> tuple[ScanFindings | None, CursorRead]:
    """Read a log's new bytes through a classifier scanner resumed from ``cursor.scan_state``.

    Returns the findings over the whole file so far (None if the file does not exist yet).
    """
    from .classify import LogScanner

    scanner: Any = (
        LogScanner.from_state(table, cursor.path, cursor.scan_state)
        if cursor.scan_state and cursor.offset > 0
        else LogScanner(table, cursor.path)
    )

    def restart(_reason: str) -> None:
        nonlocal scanner
        scanner = LogScanner(table, cursor.path)

    read = read_new_bytes(cursor, scanner.feed, on_restart=restart, max_bytes=max_bytes)
    if read.missing:
        return None, read
    cursor.scan_state = scanner.state()
    return scanner.findings(), read


def iter_paths(jobs: Iterable[JobLogs]) -> Iterable[Path]:
    for job in jobs:
        yield from job.paths
