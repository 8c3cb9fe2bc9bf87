"""The fake Slurm (tests/fakeslurm) against the real parsers and the real 22.05.8 fixtures."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from daemon import slurm
from daemon.errors import SlurmParseError, SlurmTimeout
from daemon.model import TaskKey
from daemon.settings import SlurmSettings
from daemon.slurm import (
    DELIMITER,
    SACCT_FIELDS,
    SlurmCommandFailed,
    SlurmRunner,
    is_placeholder,
    parse_sacct,
    parse_sbatch_parsable,
    query_sacct,
    query_squeue,
    sacct_argv,
    squeue_argv,
)

sys.path.insert(0, str(Path(__file__).parent))
from fakeslurm.controller import FakeSlurm

FIXTURES = Path(__file__).parent / "fixtures" / "slurm"


class EnvRunner(SlurmRunner):
    """The real runner, with the fake's environment (PATH, FAKESLURM_STATE)."""

    def __init__(self, fake: FakeSlurm) -> None:
        self.fake = fake

    def run(self, argv, *, timeout, cwd=None, env=None):  # type: ignore[no-untyped-def]
        return super().run(argv, timeout=timeout, cwd=cwd, env=env or self.fake.env())


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeSlurm]:
    slurm.reset_field_memory()
    yield FakeSlurm(tmp_path, user="alice")
    slurm.reset_field_memory()


@pytest.fixture
def runner(fake: FakeSlurm) -> EnvRunner:
    return EnvRunner(fake)


SETTINGS = SlurmSettings(user="alice")


def sacct_text(runner: EnvRunner, **kw: object) -> str:
    return runner.run(sacct_argv(SETTINGS, user="alice", **kw), timeout=10).stdout  # type: ignore[arg-type]


# --------------------------------------------------------------------------- behaviour


def test_lifecycle_through_the_real_parsers(fake: FakeSlurm, runner: EnvRunner) -> None:
    arr = fake.add_job("exp", array="0-3", comment="slurm-triage:abc")
    single = fake.add_job("single")
    fake.start(single)
    fake.finish(f"{arr}_1", "FAILED")
    fake.finish(f"{arr}_2", "TIMEOUT")

    rows = {str(r.key): r for r in query_sacct(runner, SETTINGS)}
    assert rows[f"{arr}_1"].state == "FAILED" and rows[f"{arr}_1"].exit_code == 1
    assert rows[f"{arr}_2"].state == "TIMEOUT"
    # started tasks got their own raw ids; unstarted ones are still the grouped row
    assert rows[f"{arr}_1"].job_id_raw not in {arr, rows[f"{arr}_2"].job_id_raw}
    assert rows[f"{arr}_0"].extra["array_group"] == f"{arr}_[0,3]"
    assert rows[single].state == "RUNNING" and rows[single].end is None
    assert rows[f"{arr}_1"].comment == "slurm-triage:abc"

    active = {str(r.key): r.state for r in query_squeue(runner, SETTINGS)}
    assert active == {f"{arr}_0": "PENDING", f"{arr}_3": "PENDING", single: "RUNNING"}


def test_last_array_task_to_start_keeps_the_master_id(fake: FakeSlurm) -> None:
    arr = fake.add_job("exp", array="0-2")
    for t in (2, 0, 1):
        fake.finish(f"{arr}_{t}")
    raw = {j["key"]: j["raw_id"] for j in fake.jobs()}
    assert raw[f"{arr}_1"] == arr
    assert len(set(raw.values())) == 3


def test_sacct_honours_job_ids_user_and_window(fake: FakeSlurm, runner: EnvRunner) -> None:
    t0 = datetime(2026, 1, 25, 12, 0, 0)
    fake.set_now(t0)
    old = fake.add_job("old")
    fake.finish(old, "COMPLETED", end=t0 + timedelta(minutes=5))
    fake.set_now(t0 + timedelta(hours=2))
    new = fake.add_job("new")
    fake.finish(new, "FAILED")
    other = fake.add_job("theirs", user="bob")
    fake.finish(other, "FAILED")

    keys = lambda text: [str(r.key) for r in parse_sacct(text)]  # noqa: E731
    assert keys(sacct_text(runner, start=t0 + timedelta(hours=1))) == [new]
    assert keys(sacct_text(runner, start=t0)) == [old, new]
    assert keys(sacct_text(runner, start=t0, end=t0 + timedelta(minutes=30))) == [old]
    assert keys(sacct_text(runner, job_ids=[other])) == [other]


def test_sacct_without_x_prints_steps_and_header_without_noheader(
    fake: FakeSlurm, runner: EnvRunner
) -> None:
    job = fake.add_job("j")
    fake.finish(job, "COMPLETED")
    argv = [a for a in sacct_argv(SETTINGS, user="alice") if a not in {"-X", "--noheader"}]
    lines = runner.run(argv, timeout=10).stdout.splitlines()
    assert lines[0].split(DELIMITER)[:2] == ["JobID", "JobIDRaw"]
    assert [ln.split(DELIMITER)[0] for ln in lines[1:]] == [job, f"{job}.batch", f"{job}.extern"]
    assert [str(r.key) for r in parse_sacct("\n".join(lines[1:]) + "\n")] == [job]


def test_squeue_without_r_groups_pending_array(fake: FakeSlurm, runner: EnvRunner) -> None:
    arr = fake.add_job("exp", array="0-5")
    fake.start(f"{arr}_0")
    argv = [a for a in squeue_argv(SETTINGS, user="alice") if a != "-r"]
    ids = [ln.split(DELIMITER)[0] for ln in runner.run(argv, timeout=10).stdout.splitlines()]
    assert sorted(ids) == sorted([f"{arr}_0", f"{arr}_[1-5]"])


def test_sbatch_records_submission_and_creates_tasks(
    fake: FakeSlurm, runner: EnvRunner, tmp_path: Path
) -> None:
    work = tmp_path / "exp"
    work.mkdir()
    (work / "run.sh").write_text(
        "#!/bin/bash\n#SBATCH --job-name=from-directive\n#SBATCH --output=logs/x_%A_%a.out\necho\n"
    )
    argv = ["sbatch", "--parsable", "--array=3,5-6", "--comment=slurm-triage:i1", "run.sh", "arg1"]
    out = runner.run(argv, timeout=10, cwd=work)
    job = parse_sbatch_parsable(out.stdout)
    (sub,) = fake.submissions()
    assert sub == {"argv": argv, "cwd": str(work), "job_id": job, "rc": 0}
    tasks = {j["key"]: j for j in fake.jobs()}
    assert sorted(tasks) == [f"{job}_3", f"{job}_5", f"{job}_6"]
    assert tasks[f"{job}_5"]["name"] == "from-directive"
    assert tasks[f"{job}_5"]["submit_line"] == " ".join(argv)
    rows = query_squeue(runner, SETTINGS)
    assert {r.comment for r in rows} == {"slurm-triage:i1"}
    logs = fake.finish(f"{job}_5", "FAILED", err="Traceback\nKeyError: 'x'\n")
    assert logs == [work / "logs" / f"x_{job}_5.out"]


def test_sbatch_begin_is_pending_with_reason(
    fake: FakeSlurm, runner: EnvRunner, tmp_path: Path
) -> None:
    (tmp_path / "a.sh").write_text("#!/bin/bash\n")
    job = parse_sbatch_parsable(
        runner.run(
            ["sbatch", "--parsable", "--begin=now+300", "a.sh"], timeout=10, cwd=tmp_path
        ).stdout
    )
    (row,) = query_sacct(runner, SETTINGS, job_ids=[job])
    assert (row.state, row.reason) == ("PENDING", "BeginTime")


def test_sbatch_errors_like_real(fake: FakeSlurm, runner: EnvRunner, tmp_path: Path) -> None:
    with pytest.raises(SlurmCommandFailed) as info:
        runner.run(["sbatch", "--bogus-option", "x.sh"], timeout=10, cwd=tmp_path)
    assert info.value.rc == 255
    with pytest.raises(SlurmCommandFailed, match="Unable to open file"):
        runner.run(["sbatch", "--parsable", "missing.sh"], timeout=10, cwd=tmp_path)
    assert [s["rc"] for s in fake.submissions()] == [255, 1]
    assert fake.jobs() == []


def test_scancel(fake: FakeSlurm, runner: EnvRunner) -> None:
    job = fake.add_job("long")
    fake.start(job)
    runner.run(["scancel", job], timeout=10)
    (row,) = query_sacct(runner, SETTINGS)
    assert row.state == "CANCELLED"
    assert row.state_raw == f"CANCELLED by {os.getuid()}"
    # real 22.05.8 scancel is silent and exits 0 for an unknown job id
    out = runner.run(["scancel", "424242"], timeout=10)
    assert (out.rc, out.stdout, out.stderr) == (0, "", "")


# --------------------------------------------------------------------------- faults


def test_fail_next_is_one_shot(fake: FakeSlurm, runner: EnvRunner) -> None:
    fake.fail_next("sacct", 1, "sacct: error: Problem talking to the database: Connection refused")
    with pytest.raises(SlurmCommandFailed, match="Problem talking to the database"):
        query_sacct(runner, SETTINGS)
    assert query_sacct(runner, SETTINGS) == []


def test_hang_makes_the_runner_time_out_once(fake: FakeSlurm, runner: EnvRunner) -> None:
    fake.hang("squeue", 30)
    with pytest.raises(SlurmTimeout):
        query_squeue(runner, SlurmSettings(user="alice", timeout_s=0.5))
    # the killed call had already recorded itself and used up the fault
    assert query_squeue(runner, SlurmSettings(user="alice", timeout_s=10)) == []
    assert len(fake.calls("squeue")) == 2


def test_garbage_is_a_parse_error(fake: FakeSlurm, runner: EnvRunner) -> None:
    fake.garbage("sacct", "<html>maintenance</html>\n")
    with pytest.raises(SlurmParseError, match="sacct line 1"):
        query_sacct(runner, SETTINGS)


def test_placeholder_rows(fake: FakeSlurm, runner: EnvRunner) -> None:
    job = fake.add_job("real-name")
    fake.finish(job, "FAILED")
    fake.placeholder_rows(job)
    (row,) = query_sacct(runner, SETTINGS)
    assert row.job_name == "allocation" and is_placeholder(row)
    fake.placeholder_rows(job, on=False)
    (row,) = query_sacct(runner, SETTINGS)
    assert row.job_name == "real-name" and not is_placeholder(row)


def test_sbatch_accepts_then_hangs(fake: FakeSlurm, runner: EnvRunner, tmp_path: Path) -> None:
    (tmp_path / "a.sh").write_text("#!/bin/bash\n")
    fake.sbatch_hang_after_submit(30)
    with pytest.raises(SlurmTimeout):
        runner.run(
            ["sbatch", "--parsable", "--comment=slurm-triage:t1", "a.sh"], timeout=0.5, cwd=tmp_path
        )
    # the job exists although the caller never saw its id: the tag must find it
    (row,) = query_sacct(runner, SETTINGS)
    assert row.comment == "slurm-triage:t1"


def test_sacct_field_fallback_end_to_end(fake: FakeSlurm, runner: EnvRunner) -> None:
    job = fake.add_job("j")
    fake.finish(job, "FAILED")
    fake.reject_fields("SubmitLine")
    (row,) = query_sacct(runner, SETTINGS)
    assert row.key == TaskKey(job) and row.submit_line == ""
    query_sacct(runner, SETTINGS)
    formats = [next(a for a in argv if a.startswith("--format=")) for argv in fake.calls("sacct")]
    assert ["SubmitLine" in f for f in formats] == [True, False, False]


# --------------------------------------------------------------------------- shape vs real 22.05.8

META = FIXTURES / "capture_meta.json"
needs_capture = pytest.mark.skipif(
    not META.exists(),
    reason="no real capture yet: run tests/fixtures/slurm/capture.py on the testbed",
)


def _shape(field: str, value: str) -> str:
    """A value's form, without its particulars (ids, dates, paths, names differ)."""
    f = field.lower()
    if f in {"jobname", "user", "comment", "submitline"}:
        return "text" if value else "empty"
    if f == "workdir":
        return "abs" if value.startswith("/") else value
    if f in {"jobid", "jobidraw", "%i", "%a"}:
        return re.sub(r"\d+", "9", re.sub(r"\[[^\]]*\]", "[R]", value))
    if f == "state":
        return re.sub(r"by \d+", "by N", value)
    if f == "nodelist":
        return value if value == "None assigned" else "node"
    if f == "reason":
        return value
    return re.sub(r"\d", "9", value)


def _shapes(text: str, fields: list[str], delim: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {f: set() for f in fields}
    for line in text.splitlines():
        cols = line.split(delim)
        assert len(cols) == len(fields), line
        for f, v in zip(fields, cols, strict=True):
            out[f].add(_shape(f, v))
    return out


def _mirror_capture(fake: FakeSlurm, work: Path) -> None:
    """The capture script's jobs, built in the fake."""
    for name in ("ok.sh", "fail.sh", "sleep.sh"):
        (work / name).write_text("#!/bin/bash\n")
    (work / "array.sh").write_text("#!/bin/bash\n#SBATCH --output=exp_%A_%a.out\n")
    env = fake.env()
    run = lambda *a: EnvRunner(fake).run(["sbatch", "--parsable", *a], timeout=10, cwd=work)  # noqa: E731
    ids = {
        "ok": run("ok.sh"),
        "fail": run("fail.sh"),
        "array": run("--array=0-3", "array.sh"),
        "tagged": run("--comment=slurm-triage:abc", "--job-name=tagged job", "ok.sh"),
        "pipe": run("--comment=a|b c", "--wrap=echo a | cat", "ok.sh"),
        "cancel": run("sleep.sh"),
        "running": run("--job-name=running", "sleep.sh"),
        "pending": run("--begin=now+1hour", "ok.sh"),
        "pending_array": run("--begin=now+1hour", "--array=0-5%2", "ok.sh"),
    }
    j = {k: v.stdout.strip() for k, v in ids.items()}
    assert env
    fake.finish(j["ok"], total_cpu=0.0)
    fake.finish(j["fail"], "FAILED", total_cpu=0.0)
    for t in range(4):
        fake.finish(f"{j['array']}_{t}", "FAILED" if t % 2 else "COMPLETED", total_cpu=0.0)
    fake.finish(j["tagged"], total_cpu=0.0)
    fake.finish(j["pipe"], total_cpu=0.0)
    fake.start(j["cancel"])
    fake.start(j["running"])
    EnvRunner(fake).run(["scancel", j["cancel"]], timeout=10)


@needs_capture
def test_sacct_output_has_the_real_shape(
    fake: FakeSlurm, runner: EnvRunner, tmp_path: Path
) -> None:
    meta = json.loads(META.read_text())
    fields = list(meta["fields"])
    assert fields == list(SACCT_FIELDS)
    real_text = (FIXTURES / "sacct_mixed.txt").read_text()
    real = _shapes(real_text, fields, DELIMITER)
    _mirror_capture(fake, tmp_path)
    fake_text = sacct_text(runner)
    mine = _shapes(fake_text, fields, DELIMITER)
    for f in fields:
        assert mine[f] <= real[f], f"{f}: fake prints {mine[f] - real[f]}, real only {real[f]}"
    # the capture also holds other tests' jobs (OOM, TIMEOUT, "CANCELLED" without "by");
    # the wordings the mirrored jobs produce must all be there
    assert {"COMPLETED", "FAILED", "RUNNING", "CANCELLED by N"} <= mine["State"]
    assert mine["Comment"] == {"text", "empty"}


@needs_capture
def test_squeue_output_has_the_real_shape(
    fake: FakeSlurm, runner: EnvRunner, tmp_path: Path
) -> None:
    fields = ["%i", "%A", "%T", "%j", "%u", "%k"]
    real = _shapes((FIXTURES / "squeue_mixed.txt").read_text(), fields, DELIMITER)
    _mirror_capture(fake, tmp_path)
    mine = _shapes(runner.run(squeue_argv(SETTINGS), timeout=10).stdout, fields, DELIMITER)
    # only pending/running jobs are asked for; shapes of ids, states and comments agree
    assert mine["%i"] == real["%i"]
    assert mine["%T"] == real["%T"]
    assert mine["%k"] == real["%k"]


@needs_capture
@pytest.mark.parametrize(
    "name",
    [
        "sacct_invalid_field",
        "sbatch_invalid_option",
        "sbatch_missing_script",
        "squeue_invalid_job",
        "squeue_invalid_state",
        "scancel_invalid_job",
    ],
)
def test_error_messages_match_real(
    name: str, fake: FakeSlurm, runner: EnvRunner, tmp_path: Path
) -> None:
    meta = json.loads(META.read_text())[name]
    real_stderr = (FIXTURES / f"{name}.stderr").read_text()
    (tmp_path / "ok.sh").write_text("#!/bin/bash\n")
    if meta["rc"] == 0:  # scancel of an unknown id: silent success in 22.05.8
        out = runner.run(meta["argv"], timeout=10, cwd=tmp_path)
        assert (out.stdout, out.stderr) == (meta["stdout"], real_stderr)
        return
    with pytest.raises(SlurmCommandFailed) as info:
        runner.run(meta["argv"], timeout=10, cwd=tmp_path)
    assert info.value.rc == meta["rc"]
    assert info.value.stderr == real_stderr


@needs_capture
def test_sbatch_parsable_output_matches_real(
    fake: FakeSlurm, runner: EnvRunner, tmp_path: Path
) -> None:
    (tmp_path / "ok.sh").write_text("#!/bin/bash\n")
    out = runner.run(["sbatch", "--parsable", "ok.sh"], timeout=10, cwd=tmp_path).stdout
    real = (FIXTURES / "sbatch_parsable.txt").read_text()
    assert re.sub(r"\d+", "9", out) == re.sub(r"\d+", "9", real) == "9\n"
