"""Hostile and odd inputs, end to end through the real commands.

Every case must end with an answer (or a one-line error), never a traceback, and with
memory that does not depend on the input's size.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.classify import build_table
from daemon.cli import main
from daemon.logs import advance_cursor, read_new_bytes
from daemon.records import LogCursor
from daemon.settings import ClassifySettings
from tests.reliability.conftest import KEY_ERROR_TB, RATE_LIMIT_TB, REPO, make_rig

PEAK_RSS_LIMIT_MB = 200
NOBODY = ("--reuid=nobody", "--regid=nogroup", "--clear-groups")

# Runs a command and prints its peak RSS (KiB on Linux): RUSAGE_CHILDREN of a fresh
# parent counts that one child only, not whatever this pytest process ran before.
MEASURE = """
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=600)
sys.stdout.write(proc.stdout)
sys.stderr.write(proc.stderr)
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(proc.returncode)
"""


def run_measured(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, sys.executable, "-m", "daemon", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    peak_kb = int(proc.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return proc, peak_kb / 1024


def classify_json(capsys: pytest.CaptureFixture[str], *paths: Path) -> list[dict[str, object]]:
    capsys.readouterr()
    rc = main(["classify", *map(str, paths), "--json"])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    assert rc in (0, 1), out.err
    result = json.loads(out.out)
    assert isinstance(result, list)
    return result


# --------------------------------------------------------------------------- big and odd logs


@pytest.mark.slow
def test_two_gigabyte_log_is_classified_in_bounded_memory(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    big = logs / "sweep_4150554_7.err"
    # sparse: 2 GiB of zeros without a newline, then a real traceback
    subprocess.run(["truncate", "-s", "2G", str(big)], check=True, timeout=30)
    with open(big, "a") as fh:
        fh.write("\n" + RATE_LIMIT_TB)
    assert big.stat().st_size > 2 * 2**30

    proc, peak_mb = run_measured("classify", str(big), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (verdict,) = json.loads(proc.stdout.rsplit("PEAK_RSS_KB", 1)[0])
    assert verdict["error_type"] == "rate_limit"
    assert peak_mb < PEAK_RSS_LIMIT_MB, f"classify peak RSS {peak_mb:.0f} MB"

    proc, peak_mb = run_measured("analyze", str(logs), "--offline", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.rsplit("PEAK_RSS_KB", 1)[0])
    assert [f["error_type"] for f in result["failures"]] == ["rate_limit"]
    assert peak_mb < PEAK_RSS_LIMIT_MB, f"analyze peak RSS {peak_mb:.0f} MB"


def test_logs_without_newlines_binary_and_not_utf8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = {
        "no_newline_100_1.err": ("x" * 3_000_000 + KEY_ERROR_TB.replace("\n", " ")).encode(),
        "binary_100_2.err": bytes(range(256)) * 4000,
        "latin1_100_3.err": KEY_ERROR_TB.encode() + "café\n".encode("latin-1") * 1000,
        "utf16_100_4.err": KEY_ERROR_TB.encode("utf-16"),
        "nul_100_5.err": b"\0" * 100_000 + b"\n" + KEY_ERROR_TB.encode(),
        "empty_100_6.err": b"",
        "cr_only_100_7.err": KEY_ERROR_TB.replace("\n", "\r").encode(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    result = classify_json(capsys, *(tmp_path / n for n in files))
    by_name = {Path(str(r["path"])).name: r for r in result}
    assert set(by_name) == set(files)
    for r in result:
        assert r["outcome"] in ("success", "failure", "running", "unknown")
    assert by_name["latin1_100_3.err"]["error_type"] == "code_error"
    assert by_name["nul_100_5.err"]["error_type"] == "code_error"


def test_file_truncated_while_being_read_is_reread_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "exp_200_1.err"
    path.write_bytes(b"loading\n" * 400_000)  # 3.2 MB: several chunks
    cursor = LogCursor(path=str(path), key="200_1")
    seen: list[int] = []

    def sink(chunk: bytes) -> None:
        seen.append(len(chunk))
        if len(seen) == 1:  # the job was requeued: Slurm truncates and rewrites the log
            path.write_text(KEY_ERROR_TB)

    read = read_new_bytes(cursor, sink, chunk_size=1 << 20)
    assert read.bytes_read == sum(seen) <= 3_200_000
    table = build_table(ClassifySettings())
    findings, again = advance_cursor(cursor, table)
    assert again.restarted == "truncated"
    assert findings is not None
    assert cursor.offset == path.stat().st_size


def test_file_deleted_while_being_read(tmp_path: Path) -> None:
    path = tmp_path / "exp_200_2.err"
    path.write_bytes(b"step\n" * 500_000)
    cursor = LogCursor(path=str(path), key="200_2")

    def sink(_chunk: bytes) -> None:
        if path.exists():
            path.unlink()  # the open descriptor still reads the old inode to its end

    read = read_new_bytes(cursor, sink, chunk_size=1 << 18)
    assert read.bytes_read == 2_500_000
    again = read_new_bytes(cursor, lambda _c: None)
    assert again.missing and again.bytes_read == 0


# --------------------------------------------------------------------------- folders and names


def test_symlink_loops_and_odd_file_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = tmp_path / "logs"
    (logs / "sub").mkdir(parents=True)
    os.symlink(logs, logs / "sub" / "loop")  # a folder containing itself
    os.symlink(logs / "sub", logs / "sub" / "loop2")
    os.symlink(logs / "missing", logs / "dangling.err")
    os.symlink("self_1234_9.err", logs / "self_1234_9.err")  # a link to itself: ELOOP
    odd = [
        "with space_1000_1",
        "new\nline_1000_2",
        "meta $(touch PWNED);|&`id`_1000_3",
        "quote'\"_1000_4",
        "-rf_1000_5",
    ]
    for name in odd:
        (logs / "sub" / f"{name}.err").write_text(KEY_ERROR_TB)
    out_csv = tmp_path / "out.csv"
    capsys.readouterr()
    rc = main(["analyze", str(logs), "--offline", "--csv", str(out_csv), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err
    data = json.loads(captured.out)
    assert sorted(f["array_id"] for f in data["failures"]) == [1, 2, 3, 4, 5]
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert sorted(Path(r["log_file"]).name for r in rows) == sorted(f"{n}.err" for n in odd)
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder another user can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="triage-rel-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_unreadable_subfolder_is_a_warning_not_a_failure(shared_tmp: Path) -> None:
    """Root reads every folder, so the command runs as ``nobody`` (setpriv), for real."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run the command as another user")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    probe = subprocess.run(
        [setpriv, *NOBODY, sys.executable, "-c", "import pydantic, daemon.cli"],
        env=env,
        cwd="/",
        capture_output=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip("this Python's packages are not readable by nobody (installed under /root)")
    logs = shared_tmp / "logs"
    (logs / "private").mkdir(parents=True)
    (logs / "exp_300_1.err").write_text(KEY_ERROR_TB)
    (logs / "private" / "exp_300_2.err").write_text(KEY_ERROR_TB)
    (logs / "exp_300_3.err").write_text(KEY_ERROR_TB)
    (logs / "exp_300_3.err").chmod(0o000)
    (logs / "private").chmod(0o700)
    for p in (logs, logs / "exp_300_1.err"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    home = shared_tmp / "home"
    home.mkdir(mode=0o777)
    home.chmod(0o777)
    proc = subprocess.run(
        [
            setpriv,
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            sys.executable,
            "-m",
            "daemon",
            "analyze",
            str(logs),
            "--offline",
            "--json",
            "--csv",
            str(home / "out.csv"),
        ],
        cwd=home,
        env={**env, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [f["array_id"] for f in data["failures"]] == [1]
    assert "private" in json.dumps(data) or "private" in proc.stderr


def test_unreadable_subfolder_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same as root, where EACCES has to be injected: scandir of one folder fails."""
    logs = tmp_path / "logs"
    (logs / "private").mkdir(parents=True)
    (logs / "exp_300_1.err").write_text(KEY_ERROR_TB)
    (logs / "private" / "exp_300_2.err").write_text(KEY_ERROR_TB)
    real_scandir = os.scandir
    private = str(logs / "private")

    def scandir(path: Any = ".") -> Any:
        if str(path) == private:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    capsys.readouterr()
    rc = main(["analyze", str(logs), "--offline", "--json", "--csv", str(tmp_path / "o.csv")])
    out = capsys.readouterr()
    assert rc == 0 and "Traceback" not in out.err, out.err
    data = json.loads(out.out)
    assert [f["array_id"] for f in data["failures"]] == [1]
    assert "private" in out.out + out.err


def test_unreadable_log_folder_itself_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    rc = main(["analyze", str(tmp_path / "nope"), "--offline"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err and len(err.strip().splitlines()) <= 2


# --------------------------------------------------------------------------- configs and settings


def test_malformed_deep_and_huge_config_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs, res = tmp_path / "logs", tmp_path / "res"
    (res / "configs").mkdir(parents=True)
    logs.mkdir()
    configs = {
        1: b"{not json",
        2: b"[" * 200_000 + b"]" * 200_000,  # deep nesting: RecursionError in json
        3: b'{"reasoning_model": "' + b"x" * (40 * 2**20) + b'"}',  # 40 MiB
        4: b"\xff\xfe garbage",
        5: b"[1, 2, 3]",
        6: b'{"reasoning_model": "claude", "reasoning_token_budget": 1024}',
    }
    for task, data in configs.items():
        (res / "configs" / f"config_{task:04d}.json").write_bytes(data)
        (logs / f"exp_400_{task}.err").write_text(KEY_ERROR_TB)
    capsys.readouterr()
    rc = main(["analyze", str(logs), str(res), "--offline", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err
    data = json.loads(captured.out)
    assert len(data["failures"]) == 6
    text = json.dumps(data) + captured.err
    assert "nested too deeply" in text and "larger than" in text


def test_regression_deeply_nested_config_json_crashed_analyze(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``json.loads`` raises RecursionError (not JSONDecodeError) on deep nesting: analyze
    died with a traceback on one bad config file."""
    from daemon.analyze import load_config
    from daemon.settings import Settings

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "config_0001.json").write_text("[" * 100_000)
    warnings: list[str] = []
    _path, data, problem = load_config(tmp_path, 1, Settings(), warnings)
    assert data == {} and problem is not None and "nested too deeply" in problem


def test_world_readable_settings_with_a_token_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "settings.toml"
    cfg.write_text(
        '[slack]\nmode = "bot"\nbot_token = "xoxb-1-secret-value"\nchannel = "C0ALERTS"\n'
    )
    cfg.chmod(0o644)
    capsys.readouterr()
    main(["config", "check", "--config", str(cfg)])
    out = capsys.readouterr()
    assert "readable by other users" in out.out + out.err
    assert "chmod 600" in out.out + out.err
    assert "xoxb-1-secret-value" not in out.out + out.err
    cfg.chmod(0o600)
    main(["config", "check", "--config", str(cfg)])
    out = capsys.readouterr()
    assert "readable by other users" not in out.out + out.err


# --------------------------------------------------------------------------- no shell, ever


def test_submitline_with_shell_metacharacters_reaches_sbatch_literally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = make_rig(tmp_path, monkeypatch, None)
    canary = tmp_path / "PWNED"
    hostile = [f"$(touch {canary})", ";", "touch", f"{canary}2", "|", f"`touch {canary}3`", "&&"]
    line = "sbatch --array=0-1 run.sh " + " ".join(hostile)
    job = rig.fake.add_job(
        "sweep",
        array="0-1",
        work_dir=rig.work,
        submit_line=line,
        output=f"{rig.logs}/sweep_%A_%a.out",
        error=f"{rig.logs}/sweep_%A_%a.err",
    )
    rig.fake.finish(f"{job}_1", "FAILED", err=RATE_LIMIT_TB)
    monkeypatch.chdir(tmp_path)
    assert rig.once() == 0
    subs = [s for s in rig.fake.submissions() if s["job_id"]]
    assert len(subs) == 1
    argv = subs[0]["argv"]
    # sacct's SubmitLine is split on blanks only (it lost the quoting); each word arrives
    # as one argv element, nothing is interpreted
    words = " ".join(hostile).split()
    assert argv[-len(words) :] == words, argv
    assert "--array=1" in argv
    assert not list(tmp_path.rglob("PWNED*"))


def test_regression_log_name_with_a_newline_was_silently_skipped() -> None:
    """``.`` in the name patterns did not match a newline, so a job named with one (its
    log ``exp\\nv2_1000_2.err``) was never read: a failure nobody heard of."""
    from daemon.logs import parse_log_name
    from daemon.model import TaskKey

    assert parse_log_name("new\nline_1000_2") == ("new\nline", TaskKey("1000", 2))
