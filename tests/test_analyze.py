from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from daemon.analyze import run_analyze
from daemon.cli import main
from daemon.errors import InputError
from daemon.settings import Settings

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
GOLDEN = Path(__file__).parent / "golden" / "analyze"
EXP = "results/ttc_scaling_20260125"

# Written by hand from the example logs (see examples/generate.py), not computed by the code.
EXPECTED_FAILURES = {
    "4150554_2": "rate_limit",
    "4150554_4": "network",
    "4150554_5": "empty_response",
    "4150554_6": "node_fail",
    "4150554_7": "preempted",
    "4150554_8": "json_parse",
    "4150554_9": "time_limit",
    "4150554_10": "oom",
    "4150554_11": "billing",
    "4150554_12": "cancelled",
    "4150554_13": "code_error",
    "4150554_15": "rate_limit",
    "4150554_16": "rate_limit",
    "4151020_17": "network",  # the re-run failed again; 4150554_17 is superseded
    "4151200": "code_error",
}
NEVER_LISTED = {"4150554_0", "4150554_1", "4150554_3", "4150554_17", "4151020_3", "4151100"}


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The examples copied to a temp folder with fixed mtimes, cwd there, TZ=UTC."""
    dst = tmp_path / "ex"
    shutil.copytree(EXAMPLES, dst, ignore=shutil.ignore_patterns("failed_jobs.csv", "*.py"))
    base = 1769349720  # 2026-01-25 14:02:00 UTC
    for i, p in enumerate(sorted((dst / "logs").iterdir())):
        os.utime(p, (base + 60 * (i // 2), base + 60 * (i // 2)))
    monkeypatch.chdir(dst)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield dst
    monkeypatch.delenv("TZ")
    time.tzset()


def _golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
    assert path.exists(), f"missing golden {path}; create it with UPDATE_GOLDEN=1 pytest {__file__}"
    expected = path.read_text()
    assert actual == expected, (
        f"{name} differs from the golden file; if the change is intended, update it with "
        f"UPDATE_GOLDEN=1 pytest tests/test_analyze.py"
    )


def test_examples_types_written_by_hand(tree: Path) -> None:
    result = run_analyze(Settings(), log_dir=Path("logs"), results_dir=Path(EXP), offline=True)
    rows = list(csv.DictReader(io.StringIO(Path(EXP, "failed_jobs.csv").read_text())))
    got = {(r["job_id"] + (f"_{r['array_id']}" if r["array_id"] else "")): r for r in rows}
    assert {k: r["error_type"] for k, r in got.items()} == EXPECTED_FAILURES
    assert not NEVER_LISTED & set(got)
    # retryable = the design's default policy
    assert got["4150554_2"]["retryable"] == "true" and got["4150554_11"]["retryable"] == "false"
    # config mapping; the malformed config leaves its columns empty and is reported
    assert got["4150554_2"]["reasoning_model"] == "claude-sonnet-4-5"
    assert got["4150554_2"]["reasoning_budget"] == "16384"
    assert got["4150554_13"]["reasoning_model"] == ""
    assert any("config_0013.json" in w and "malformed" in w for w in result.warnings)
    s = result.summary
    assert (s.total, s.successful, s.failed, s.recovered) == (22, 4, 15, 1)
    assert s.unknown == 1  # 4150554_14: an unrecognised error and no sacct state offline
    cmds = {c.job_id: c for c in result.commands}
    assert cmds["4150554"].array == "2,4-7,15-16"
    assert "<SCRIPT for job ttc_claude>" in cmds["4150554"].command
    assert cmds["4151020"].array == "17"
    assert result.exit_code == 0


def test_examples_golden_csv_text_json(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "logs", EXP, "--offline"]) == 0
    _golden("examples.txt", capsys.readouterr().out)
    _golden("failed_jobs.csv", Path(EXP, "failed_jobs.csv").read_text())
    assert main(["analyze", "logs", EXP, "--offline", "--json"]) == 0
    _golden("examples.json", capsys.readouterr().out)


def test_json_shape(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "logs", EXP, "--offline", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"summary", "failures", "recovered", "commands", "clusters", "warnings"} <= set(data)
    assert set(data["summary"]) >= {
        "total",
        "successful",
        "failed",
        "failed_by_type",
        "recovered",
        "excluded_active",
        "unknown",
    }
    f = data["failures"][0]
    assert set(f) >= {"key", "job_id", "array_id", "error_type", "retryable", "evidence", "config"}
    assert set(data["commands"][0]) >= {"job_id", "array", "command", "source"}
    assert data["recovered"] == [
        {
            "key": "4150554_3",
            "error_type": "rate_limit",
            "recovered_by": "4151020_3",
            "log_file": "logs/ttc_claude_4150554_3.err",
        }
    ]


def test_jobs_filter_still_sees_recovery(tree: Path) -> None:
    r = run_analyze(Settings(), log_dir=Path("logs"), jobs=["4150554"], offline=True)
    keys = {str(t.key) for t in r.tasks}
    assert "4151020_3" not in keys and "4150554_3" in keys
    assert next(t for t in r.tasks if str(t.key) == "4150554_3").recovered_by is not None
    assert Path("failed_jobs.csv").exists()  # no RESULTS_DIR: current folder


def test_csv_override(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere.csv"
    run_analyze(Settings(), log_dir=Path("logs"), results_dir=Path(EXP), csv_path=out, offline=True)
    assert out.read_text().startswith("job_id,")
    assert not Path(EXP, "failed_jobs.csv").exists()


def test_binary_and_non_utf8_logs(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "bin_4150554_1.err").write_bytes(
        b"\x00\xff\xfe garbage \x89PNG\r\n\x1a\n" * 100
        + b'\xe9t\xe9 Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
        + b"KeyError: 'caf\xe9'\n"
    )
    r = run_analyze(Settings(), log_dir=logs, csv_path=tmp_path / "f.csv", offline=True)
    [t] = r.tasks
    assert str(t.verdict.error_type) == "code_error"


def test_missing_folder_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(tmp_path / "nope"), "--offline"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"slurm-triage: error: log folder not found: {tmp_path / 'nope'}"


def test_not_a_folder(tmp_path: Path) -> None:
    f = tmp_path / "file.err"
    f.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        run_analyze(Settings(), log_dir=f, offline=True)


def test_empty_folder_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert (
        main(["analyze", str(tmp_path / "empty"), "--offline", "--csv", str(tmp_path / "c")]) == 1
    )
    err = capsys.readouterr().err
    assert "no job logs found in" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_results_folder(tree: Path) -> None:
    with pytest.raises(InputError, match="results folder not found"):
        run_analyze(Settings(), log_dir=Path("logs"), results_dir=Path("nope"), offline=True)


def test_unreadable_log_is_a_warning(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A dangling symlink named like a log, and (as non-root) a file with mode 000.
    Path("logs/ttc_claude_4150554_99.err").symlink_to("gone.err")
    locked = Path("logs/ttc_claude_4150554_98.err")
    locked.write_text("x\n")
    locked.chmod(0)
    r = run_analyze(Settings(), log_dir=Path("logs"), results_dir=Path(EXP), offline=True)
    assert any("ttc_claude_4150554_99.err" in w for w in r.warnings)
    if os.geteuid() != 0:
        assert any("ttc_claude_4150554_98.err" in w for w in r.warnings)
    assert r.summary.failed == 15


def test_missing_slurm_commands_are_warnings(tree: Path) -> None:
    settings = Settings(slurm={"sacct": "/nonexistent/sacct", "squeue": "/nonexistent/squeue"})
    r = run_analyze(settings, log_dir=Path("logs"), results_dir=Path(EXP), offline=False)
    assert any(w.startswith("squeue unavailable") for w in r.warnings)
    assert any(w.startswith("sacct unavailable") for w in r.warnings)
    assert r.summary.failed == 15


def test_progress_on_stderr(tree: Path) -> None:
    buf = io.StringIO()
    run_analyze(Settings(), log_dir=Path("logs"), offline=True, progress=True, progress_stream=buf)
    assert buf.getvalue().endswith("analyzed 22/22 files\n")


def test_a_success_in_the_err_leaves_the_out_unread(tmp_path: Path) -> None:
    """decide() stops at a success, so the worker does not read the task's other log."""
    from daemon import analyze

    err, out = tmp_path / "x_1_0.err", tmp_path / "x_1_0.out"
    err.write_text("✅ Experiment results saved\n")
    out.write_text("RuntimeError: boom\n")
    analyze._init_worker(Settings().classify)
    found = analyze._scan_files([str(err), str(out)])
    assert [getattr(f, "source", f) for f in found] == [str(err)]
    err.write_text("still working\n")
    found = analyze._scan_files([str(err), str(out)])
    assert [getattr(f, "source", f) for f in found] == [str(err), str(out)]


def _sweep(root: Path, folders: int, tasks: int) -> None:
    """Array tasks spread over folders; every fourth one fails with a rate limit."""
    for f in range(folders):
        sub = root / f"part_{f}"
        sub.mkdir(parents=True)
        for t in range(tasks):
            task = f * tasks + t
            body = f"INFO start {task}\n" + (
                "Traceback (most recent call last):\n"
                '  File "x.py", line 1, in <module>\n'
                "openai.RateLimitError: Error code: 429\n"
                if task % 4 == 0
                else "results saved\n"
            )
            (sub / f"sweep_5001_{task}.err").write_text(body)
            (sub / f"sweep_5001_{task}.out").write_text("step 1\n")


def test_worker_pool_gives_the_serial_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool starts while the walk is still going (folder by folder); its verdicts and
    warnings equal a scan in this process."""
    from daemon import analyze

    _sweep(tmp_path / "logs", folders=4, tasks=30)
    # a copy of one task in a later folder: the newer is kept, both are scanned
    (tmp_path / "logs" / "part_3" / "sweep_5001_1.err").write_text("KeyError: 'a'\n")
    serial = run_analyze(
        Settings(), log_dir=tmp_path / "logs", csv_path=tmp_path / "s.csv", offline=True
    )
    started: list[int] = []
    real_add = analyze._ScanPool.add

    def add(self: analyze._ScanPool, jobs: list[analyze.JobLogs]) -> None:
        real_add(self, jobs)
        if self.pool is not None and not started:
            started.append(len(self.futures))

    monkeypatch.setattr(analyze, "PARALLEL_MIN_FILES", 20)
    monkeypatch.setattr(analyze._ScanPool, "add", add)
    pooled = run_analyze(
        Settings(), log_dir=tmp_path / "logs", csv_path=tmp_path / "p.csv", offline=True
    )
    assert started and started[0] < 120  # it began before the walk had found every task
    assert Path(tmp_path / "p.csv").read_text() == Path(tmp_path / "s.csv").read_text()
    assert pooled.to_json()["failures"] == serial.to_json()["failures"]
    assert pooled.warnings == serial.warnings
    assert pooled.summary == serial.summary
    assert serial.summary.failed == 30 + 1  # 120 / 4 rate limits, and the KeyError copy


def test_console_command_prints_everything_before_its_fast_exit(tree: Path) -> None:
    """``python -m daemon`` (the console entry) ends analyze with os._exit: the output
    must be complete, the status kept, and a reader that goes away is no traceback."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SLURM_TRIAGE_")}
    argv = [sys.executable, "-m", "daemon", "analyze", "logs", EXP, "--offline"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (GOLDEN / "examples.txt").read_text()
    missing = subprocess.run(
        [*argv[:4], "nowhere", "--offline"], capture_output=True, text=True, env=env, timeout=120
    )
    assert missing.returncode == 1
    assert missing.stderr == "slurm-triage: error: log folder not found: nowhere\n"
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything is written (`| true`)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0
    assert err == b""  # no "Exception ignored ... BrokenPipeError" from a late flush
