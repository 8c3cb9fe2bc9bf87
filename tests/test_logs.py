from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.errors import ConfigError, InputError
from daemon.logs import (
    find_job_logs,
    parse_log_name,
    read_new_bytes,
    restart_reason,
    scan_log_tree,
    stat_log,
)
from daemon.model import TaskKey
from daemon.records import LogCursor
from daemon.settings import AnalyzeSettings


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("ttc_claude_4150554_12", ("ttc_claude", TaskKey("4150554", 12))),
        ("prefix_with_underscores_4150554", ("prefix_with_underscores", TaskKey("4150554"))),
        ("slurm-4150554_3", ("slurm", TaskKey("4150554", 3))),
        ("slurm-4150554", ("slurm", TaskKey("4150554"))),
        ("slurm-8", ("slurm", TaskKey("8"))),  # Slurm's own name: any id, even tiny
        ("exp-v2-4150554", ("exp-v2", TaskKey("4150554"))),
        ("exp_20260125_4150554_3", ("exp_20260125", TaskKey("4150554", 3))),
        ("4150554_7", ("", TaskKey("4150554", 7))),
        ("train_123", ("train", TaskKey("123"))),
    ],
)
def test_parse_log_name_defaults(stem: str, expected: tuple[str, TaskKey]) -> None:
    assert parse_log_name(stem) == expected


@pytest.mark.parametrize(
    "stem",
    [
        "results_2024",  # a year, not a job id
        "sweep_20260125",  # a date, not a job id
        "x_2024_5",
        "train_12",  # too short to be trusted as a job id
        "notes",
        "slurm-abc",
    ],
)
def test_parse_log_name_rejects_ambiguous(stem: str) -> None:
    assert parse_log_name(stem) is None


def test_custom_pattern() -> None:
    pats = [r"^(?P<job>\d+)\.(?P<task>\d+)\.(?P<prefix>\w+)$"]
    assert parse_log_name("77.4.eval", pats) == ("eval", TaskKey("77", 4))
    assert parse_log_name("ttc_claude_4150554_12", pats) is None


def test_custom_pattern_without_job_group_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="job"):
        scan_log_tree(tmp_path, AnalyzeSettings(log_name_patterns=[r"^(?P<id>\d+)$"]))


def _touch(path: Path, text: str = "x\n", mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_scan_pairs_err_and_out_recursively(tmp_path: Path) -> None:
    _touch(tmp_path / "a_4150554_1.err")
    _touch(tmp_path / "a_4150554_1.out")
    _touch(tmp_path / "sub" / "deeper" / "b_4150560_2.err")
    _touch(tmp_path / "slurm-4150600.out")
    _touch(tmp_path / "results_2024.err")  # skipped, not misread
    _touch(tmp_path / "README.md")
    tree = scan_log_tree(tmp_path, AnalyzeSettings())
    keys = {str(j.key): j for j in tree.jobs}
    assert set(keys) == {"4150554_1", "4150560_2", "4150600"}
    pair = keys["4150554_1"]
    assert pair.err == tmp_path / "a_4150554_1.err"
    assert pair.out == tmp_path / "a_4150554_1.out"
    assert keys["4150560_2"].out is None
    assert keys["4150600"].err is None and keys["4150600"].out is not None
    assert keys["4150600"].main == tmp_path / "slurm-4150600.out"
    assert tree.skipped == 1


def test_symlink_loop_is_visited_once(tmp_path: Path) -> None:
    _touch(tmp_path / "d" / "a_4150554_1.err")
    (tmp_path / "d" / "loop").symlink_to(tmp_path)
    jobs = find_job_logs(tmp_path, AnalyzeSettings())
    assert [str(j.key) for j in jobs] == ["4150554_1"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_subfolder_is_a_warning(tmp_path: Path) -> None:
    _touch(tmp_path / "a_4150554_1.err")
    locked = tmp_path / "locked"
    _touch(locked / "a_4150554_2.err")
    locked.chmod(0)
    try:
        warnings: list[str] = []
        jobs = find_job_logs(tmp_path, AnalyzeSettings(), warnings)
    finally:
        locked.chmod(0o755)
    assert [str(j.key) for j in jobs] == ["4150554_1"]
    assert any("locked" in w for w in warnings)


def test_duplicate_task_keeps_newest_and_warns(tmp_path: Path) -> None:
    _touch(tmp_path / "old" / "a_4150554_1.err", mtime=1_000_000)
    _touch(tmp_path / "new" / "a_4150554_1.err", mtime=2_000_000)
    tree = scan_log_tree(tmp_path, AnalyzeSettings())
    assert len(tree.jobs) == 1
    assert tree.jobs[0].err == tmp_path / "new" / "a_4150554_1.err"
    assert any("two log sets" in w for w in tree.warnings)


def test_missing_root_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read log folder"):
        scan_log_tree(tmp_path / "nope", AnalyzeSettings())


# --- the daemon's incremental reader ---------------------------------------------------


def _read(cursor: LogCursor, **kw: int) -> tuple[bytes, str | None]:
    got: list[bytes] = []
    res = read_new_bytes(cursor, got.append, **kw)  # type: ignore[arg-type]
    return b"".join(got), res.restarted


def test_cursor_reads_only_appended_bytes(tmp_path: Path) -> None:
    p = tmp_path / "a.err"
    p.write_bytes(b"line one\nline t")
    cur = LogCursor(path=str(p), key="1_1")
    assert _read(cur) == (b"line one\nline t", None)
    assert cur.offset == 15
    assert _read(cur) == (b"", None)
    with open(p, "ab") as fh:
        fh.write(b"wo\nline three\n")
    assert _read(cur) == (b"wo\nline three\n", None)
    assert cur.offset == p.stat().st_size


def test_cursor_bounded_chunks_and_max_bytes(tmp_path: Path) -> None:
    p = tmp_path / "big.err"
    p.write_bytes(b"x" * 10_000)
    cur = LogCursor(path=str(p), key="1")
    chunks: list[bytes] = []
    res = read_new_bytes(cur, chunks.append, chunk_size=1000, max_bytes=4500)
    assert [len(c) for c in chunks] == [1000, 1000, 1000, 1000, 500]
    assert res.more and cur.offset == 4500
    chunks.clear()
    res = read_new_bytes(cur, chunks.append, chunk_size=4096)
    assert sum(map(len, chunks)) == 5500 and not res.more


def test_cursor_truncation_restarts(tmp_path: Path) -> None:
    p = tmp_path / "a.err"
    p.write_bytes(b"first run, long output\n")
    cur = LogCursor(path=str(p), key="1")
    _read(cur)
    p.write_bytes(b"short\n")  # truncated in place (same inode)
    resets: list[str] = []
    got: list[bytes] = []
    read_new_bytes(cur, got.append, on_restart=resets.append)
    assert resets == ["truncated"]
    assert b"".join(got) == b"short\n"


def test_cursor_rotation_restarts(tmp_path: Path) -> None:
    p = tmp_path / "a.err"
    p.write_bytes(b"old file\n")
    cur = LogCursor(path=str(p), key="1")
    _read(cur)
    os.rename(p, tmp_path / "a.err.1")
    p.write_bytes(b"new file, longer than the old one\n")
    data, reason = _read(cur)
    assert reason == "rotated"
    assert data == b"new file, longer than the old one\n"


def test_cursor_requeue_rewrite_that_regrew_is_detected(tmp_path: Path) -> None:
    # A requeued job's log is truncated and rewritten (same inode); by the next look it
    # may already be longer than before, so size alone cannot tell.
    p = tmp_path / "a.err"
    p.write_bytes(b"run 1: started\n")
    cur = LogCursor(path=str(p), key="1")
    _read(cur)
    with open(p, "r+b") as fh:
        fh.truncate(0)
        fh.write(b"run 2: started again, and much more output\n")
    data, reason = _read(cur)
    assert reason == "rewritten"
    assert data == b"run 2: started again, and much more output\n"


def test_cursor_missing_file(tmp_path: Path) -> None:
    cur = LogCursor(path=str(tmp_path / "not-yet.err"), key="1")
    res = read_new_bytes(cur, lambda b: None)
    assert res.missing and cur.offset == 0


def test_restart_reason_pure() -> None:
    st = stat_log(__file__)
    assert st is not None
    cur = LogCursor(path="x", key="1", dev=st.dev, inode=st.inode, offset=10, mtime_ns=st.mtime_ns)
    assert restart_reason(cur, st) is None
    cur.offset = st.size + 1
    assert restart_reason(cur, st) == "truncated"
    cur.offset, cur.inode = 10, st.inode + 1
    assert restart_reason(cur, st) == "rotated"
    cur.inode, cur.mtime_ns = st.inode, st.mtime_ns + 1
    assert restart_reason(cur, st) == "rewritten"


def test_examples_tree_names() -> None:
    root = Path(__file__).resolve().parents[1] / "examples" / "logs"
    tree = scan_log_tree(root, AnalyzeSettings())
    keys = {str(j.key) for j in tree.jobs}
    assert "4150554_0" in keys and "4151020_3" in keys
    assert "4151100" in keys and "4151200" in keys  # plain jobs
    assert tree.skipped == 1  # notes_2024.err
    assert len(tree.jobs) == 22


def test_unreadable_subfolder_is_a_warning_even_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # root ignores permission bits, so make scandir fail the way it does for a user.
    _touch(tmp_path / "a_4150554_1.err")
    _touch(tmp_path / "locked" / "a_4150554_2.err")
    real = os.scandir

    def scandir(path: str | os.PathLike[str]) -> object:
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    tree = scan_log_tree(tmp_path, AnalyzeSettings())
    assert [str(j.key) for j in tree.jobs] == ["4150554_1"]
    assert tree.warnings == [f"skipped unreadable folder {tmp_path / 'locked'}: Permission denied"]
