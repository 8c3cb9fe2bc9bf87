from __future__ import annotations

import csv
import io
from datetime import datetime
from pathlib import Path

import pytest

from daemon.errors import InputError
from daemon.model import ErrorType, Evidence, Outcome, SacctRow, TaskKey, Verdict
from daemon.report import (
    TaskResult,
    build_command,
    build_commands,
    csv_header,
    experiment_of,
    find_clusters,
    link_attempts,
    render_csv,
    strip_array_option,
    summarize,
    write_csv,
)
from daemon.settings import ScriptSetting, Settings


def _fail(
    key: str,
    etype: ErrorType,
    *,
    name: str = "ttc_claude",
    retryable: bool = True,
    when: datetime | None = None,
    config: dict[str, object] | None = None,
    sacct: SacctRow | None = None,
) -> TaskResult:
    return TaskResult(
        key=TaskKey.parse(key),
        job_name=name,
        verdict=Verdict(
            Outcome.FAILURE,
            etype,
            retryable,
            Evidence("anthropic.RateLimitError: Error code: 429", 42, f"/logs/{name}_{key}.err"),
        ),
        log_file=f"/logs/{name}_{key}.err",
        when=when,
        config=dict(config or {}),
        sacct=sacct,
    )


def _ok(key: str, name: str = "ttc_claude") -> TaskResult:
    return TaskResult(key=TaskKey.parse(key), job_name=name, verdict=Verdict(Outcome.SUCCESS))


def _sacct(key: str, submit_line: str, work_dir: str = "/home/u/exp") -> SacctRow:
    return SacctRow(
        job_id=key,
        job_id_raw="1",
        key=TaskKey.parse(key),
        job_name="ttc_claude",
        user="u",
        state="FAILED",
        state_raw="FAILED",
        exit_code=1,
        exit_signal=0,
        submit=None,
        start=None,
        end=None,
        elapsed_s=None,
        total_cpu_s=None,
        timelimit_s=None,
        work_dir=work_dir,
        submit_line=submit_line,
        comment="",
        reason="",
    )


def test_csv_header_is_exactly_the_contract() -> None:
    assert ",".join(csv_header(Settings())) == (
        "job_id,job_name,array_id,error_type,reasoning_model,baseline_model,model_order,"
        "reasoning_budget,competition_level,config_file,retryable,log_file,evidence"
    )


def test_csv_row_reads_reasoning_token_budget_and_quotes() -> None:
    t = _fail(
        "4150554_38",
        ErrorType.RATE_LIMIT,
        config={
            "reasoning_model": "claude-sonnet-4-5",
            "reasoning_token_budget": 4096,
            "model_order": ["a", "b"],
            "competition_level": "hard, really",
        },
    )
    t.config_file = "res/configs/config_0038.json"
    rows = list(csv.reader(io.StringIO(render_csv([t], Settings()))))
    assert rows[1] == [
        "4150554",
        "ttc_claude",
        "38",
        "rate_limit",
        "claude-sonnet-4-5",
        "",
        '["a", "b"]',
        "4096",
        "hard, really",
        "res/configs/config_0038.json",
        "true",
        "/logs/ttc_claude_4150554_38.err",
        "ttc_claude_4150554_38.err:42: anthropic.RateLimitError: Error code: 429",
    ]


def test_recovered_and_superseded_attempts() -> None:
    a3 = _fail("100_3", ErrorType.RATE_LIMIT)
    a4 = _fail("100_4", ErrorType.NETWORK)
    a5 = _fail("100_5", ErrorType.NETWORK)
    b3 = _ok("200_3", name="ttc_claude_rerun")  # recovers 100_3
    b4 = _fail("200_4", ErrorType.NETWORK, name="ttc_claude_rerun")  # supersedes 100_4
    other = _ok("300_5", name="ttc_gpt")  # another experiment: does not recover 100_5
    tasks = [b3, a3, a4, b4, a5, other]
    link_attempts(tasks)
    assert a3.recovered_by == TaskKey("200", 3)
    assert a4.superseded_by == TaskKey("200", 4) and a4.recovered_by is None
    assert a5.recovered_by is None and a5.superseded_by is None
    rows = list(csv.reader(io.StringIO(render_csv(tasks, Settings()))))[1:]
    assert [(r[0], r[2]) for r in rows] == [("100", "5"), ("200", "4")]
    s = summarize(tasks)
    assert (s.total, s.successful, s.failed, s.recovered, s.retried_again) == (6, 2, 2, 1, 1)
    assert s.failed_by_type == {"network": 2}


def test_experiment_name_without_rerun_marker() -> None:
    assert experiment_of("ttc_claude_rerun", TaskKey("1")) == "ttc_claude"
    assert experiment_of("ttc_claude-retry2", TaskKey("1")) == "ttc_claude"
    assert experiment_of("", TaskKey("77")) == "#77"


def test_summary_counts_running_and_unknown() -> None:
    tasks = [
        _ok("1_0"),
        TaskResult(TaskKey("1", 1), "x", Verdict(Outcome.RUNNING)),
        TaskResult(TaskKey("1", 2), "x", Verdict(Outcome.UNKNOWN)),
        _fail("1_3", ErrorType.CODE_ERROR, retryable=False),
    ]
    s = summarize(tasks)
    assert (s.successful, s.excluded_active, s.unknown, s.failed, s.retryable) == (1, 1, 1, 1, 0)


def test_commands_compress_ranges_and_leave_out_non_retryable() -> None:
    tasks = [_fail(f"4150554_{i}", ErrorType.RATE_LIMIT) for i in [*range(38, 48), 49]]
    tasks.append(_fail("4150554_50", ErrorType.CODE_ERROR, retryable=False))
    tasks.append(_fail("4150554_52", ErrorType.BILLING, retryable=False))
    cmds, comments = build_commands(tasks, Settings())
    assert len(cmds) == 1
    assert cmds[0].array == "38-47,49"
    assert cmds[0].command == "sbatch --array=38-47,49 <SCRIPT for job ttc_claude>"
    assert cmds[0].source == "placeholder"
    assert comments == ["# not retryable, left out: 4150554[50] code_error; 4150554[52] billing"]


def test_command_from_submit_line_replaces_array_and_keeps_throttle() -> None:
    row = _sacct(
        "4150554_3",
        "sbatch --array=0-99%10 -p gpu --job-name=ttc_claude run ttc.sh --array=x",
        work_dir="/home/u/my exp",
    )
    cmd = build_command("4150554", "ttc_claude", [3, 4, 5, 9], row, Settings())
    assert cmd.source == "submit_line"
    # the script's own "--array=x" argument is not sbatch's and stays
    assert cmd.command == (
        "cd '/home/u/my exp' && sbatch --array=3-5,9%10 -p gpu --job-name=ttc_claude"
        " run ttc.sh --array=x"
    )


@pytest.mark.parametrize(
    ("args", "rest", "throttle"),
    [
        (["-a", "1-3", "x.sh"], ["x.sh"], None),
        (["-a1-3%2", "x.sh"], ["x.sh"], "2"),
        (["--array", "1-3", "-p", "q", "x.sh", "-a", "5"], ["-p", "q", "x.sh", "-a", "5"], None),
    ],
)
def test_strip_array_option(args: list[str], rest: list[str], throttle: str | None) -> None:
    assert strip_array_option(args) == (rest, throttle)


def test_command_from_settings_scripts_table() -> None:
    settings = Settings(
        resubmit={
            "scripts": [
                ScriptSetting(
                    job_name="ttc_*",
                    script="scripts/run ttc.sh",
                    sbatch_args=["--time=02:00:00"],
                    work_dir="/home/u/exp",
                )
            ]
        }
    )
    cmd = build_command("4150554", "ttc_claude", [1, 2], None, settings)
    assert cmd.source == "settings"
    assert (
        cmd.command == "cd /home/u/exp && sbatch --array=1-2 --time=02:00:00 'scripts/run ttc.sh'"
    )


def test_plain_job_command_has_no_array() -> None:
    cmd = build_command("4151200", "", [], None, Settings())
    assert cmd.array is None
    assert "--array" not in cmd.command and "<SCRIPT for job 4151200>" in cmd.command


def test_clusters_in_time_with_shared_config() -> None:
    cfg = {"reasoning_model": "claude-sonnet-4-5"}
    tasks = [
        _fail(
            "1_1",
            ErrorType.RATE_LIMIT,
            when=datetime(2026, 1, 25, 14, 2),
            config={**cfg, "baseline_model": "a"},
        ),
        _fail(
            "1_2",
            ErrorType.RATE_LIMIT,
            when=datetime(2026, 1, 25, 14, 5),
            config={**cfg, "baseline_model": "b"},
        ),
        _fail("1_3", ErrorType.RATE_LIMIT, when=datetime(2026, 1, 25, 14, 9), config=cfg),
        _fail(
            "1_4",
            ErrorType.RATE_LIMIT,
            when=datetime(2026, 1, 25, 18, 0),
            config={"reasoning_model": "other"},
        ),
        _fail(
            "1_5",
            ErrorType.OOM,
            when=datetime(2026, 1, 25, 10, 0),
            config={"reasoning_model": "big"},
        ),
        _fail(
            "1_6",
            ErrorType.OOM,
            when=datetime(2026, 1, 25, 13, 0),
            config={"reasoning_model": "big"},
        ),
        _fail(
            "1_7",
            ErrorType.OOM,
            when=datetime(2026, 1, 25, 16, 0),
            config={"reasoning_model": "big"},
        ),
    ]
    texts = [c.text for c in find_clusters(tasks, Settings())]
    assert texts == [
        "3 rate_limit failures between 14:02 and 14:09 on 2026-01-25,"
        " all reasoning_model=claude-sonnet-4-5",
        "3 oom failures, all reasoning_model=big",
    ]


def test_write_csv_atomic_and_error(tmp_path: Path) -> None:
    target = tmp_path / "failed_jobs.csv"
    target.write_text("old\n")
    n = write_csv(target, [_fail("1_1", ErrorType.NETWORK)], Settings())
    assert n == 1
    assert target.read_text().startswith("job_id,job_name,array_id,error_type,")
    assert [p.name for p in tmp_path.iterdir()] == ["failed_jobs.csv"]  # no temp left over
    with pytest.raises(InputError, match="cannot write CSV"):
        write_csv(tmp_path / "missing" / "x.csv", [], Settings())
