"""SubmitLine parsing and sbatch argv rebuilding (pure; ``exists`` is injected).

SubmitLine strings are shaped like real Slurm 22.05 output: sacct prints sbatch's argv
joined by single spaces, quoting gone, relative script paths kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from daemon.settings import ScriptSetting
from daemon.submitline import (
    CannotRebuild,
    build_argv,
    escalate,
    format_mem,
    format_time_s,
    from_script_setting,
    parse_mem_mib,
    parse_submit_line,
    parse_time_s,
)

WORK = "/home/alice/exp"
GOLDEN = Path(__file__).parent / "golden" / "sbatch"


def exists_only(*rel: str):  # type: ignore[no-untyped-def]
    wanted = {os.path.join(WORK, r) for r in rel}
    return lambda path: path in wanted


def test_plain_array_line_round_trips_with_new_array_begin_and_tag() -> None:
    cmd = parse_submit_line(
        "sbatch --array=0-99%10 --partition=gpu -J ttc scripts/run_ttc_claude.sh",
        WORK,
        exists_only("scripts/run_ttc_claude.sh"),
    )
    assert cmd.script == "scripts/run_ttc_claude.sh"
    assert cmd.array_throttle() == 10
    argv = build_argv(cmd, tag="abc", array="38-47,49%10", begin_delay_s=300)
    assert argv == [
        "sbatch",
        "--parsable",
        "--partition=gpu",
        "-J",
        "ttc",
        "--array=38-47,49%10",
        "--begin=now+300",
        "--comment=slurm-triage:abc",
        "scripts/run_ttc_claude.sh",
    ]


def test_lost_quotes_in_an_option_value_are_refused() -> None:
    # typed: sbatch --comment="sweep two" run.sh ; sacct: --comment=sweep two run.sh
    with pytest.raises(CannotRebuild, match="ambiguous"):
        parse_submit_line("sbatch --comment=sweep two run.sh", WORK, exists_only("run.sh"))


def test_lost_quotes_in_a_separate_value_are_refused() -> None:
    with pytest.raises(CannotRebuild, match="ambiguous"):
        parse_submit_line("sbatch --job-name my job run.sh", WORK, exists_only("run.sh"))


def test_separate_values_and_short_options_are_parsed() -> None:
    cmd = parse_submit_line(
        "sbatch -p gpu -t 01:00:00 --mem 8G -c4 -o logs/%x_%A_%a.out run.sh --seed 3",
        WORK,
        exists_only("run.sh"),
    )
    assert cmd.option("partition").value == "gpu"  # type: ignore[union-attr]
    assert cmd.option("time").value == "01:00:00"  # type: ignore[union-attr]
    assert cmd.option("cpus-per-task").value == "4"  # type: ignore[union-attr]
    assert cmd.script_args == ("--seed", "3")  # options after the script belong to it


def test_long_option_prefix_is_accepted_like_getopt() -> None:
    cmd = parse_submit_line("sbatch --part=gpu run.sh", WORK, exists_only("run.sh"))
    assert cmd.option("partition").value == "gpu"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("", "no SubmitLine"),
        ("   ", "no SubmitLine"),
        ("srun python x.py", "not an sbatch command"),
        ("sbatch --wrap=python train.py", "--wrap"),
        ("sbatch --wrap python train.py", "--wrap"),
        ("sbatch --partition=gpu", "no script"),
        ("sbatch --frobnicate=1 run.sh", "unknown sbatch option"),
        ("sbatch -Z run.sh", "unknown sbatch option"),
        ("sbatch --parsable=yes run.sh", "takes no value"),
        ("sbatch --time", "has no value"),
        ("sbatch gone.sh", "script not found"),
    ],
)
def test_refusals_say_why(line: str, reason: str) -> None:
    with pytest.raises(CannotRebuild, match=reason):
        parse_submit_line(line, WORK, exists_only("run.sh"))


def test_missing_workdir_is_refused() -> None:
    with pytest.raises(CannotRebuild, match="WorkDir"):
        parse_submit_line("sbatch run.sh", "", lambda p: True)


def test_script_is_resolved_against_workdir_not_cwd() -> None:
    seen: list[str] = []

    def exists(path: str) -> bool:
        seen.append(path)
        return path == f"{WORK}/run.sh"

    parse_submit_line("sbatch run.sh", WORK, exists)
    assert seen[-1] == f"{WORK}/run.sh"


def test_absolute_script_path_is_used_as_is() -> None:
    cmd = parse_submit_line("/usr/bin/sbatch /opt/x/run.sh a", WORK, lambda p: p == "/opt/x/run.sh")
    assert cmd.script == "/opt/x/run.sh"


def test_shell_metacharacters_stay_literal_words() -> None:
    line = "sbatch --job-name=a;rm run.sh $(touch pwned) `id` ;echo"
    cmd = parse_submit_line(line, WORK, exists_only("run.sh"))
    argv = build_argv(cmd, tag="t")
    assert "--job-name=a;rm" in argv
    assert argv[argv.index("run.sh") + 1 :] == ["$(touch", "pwned)", "`id`", ";echo"]


def test_dropped_options_and_kept_job_name() -> None:
    cmd = parse_submit_line(
        "sbatch -a 1-5 -b now+60 -d afterok:12 --parsable --wait --comment=x -J keep run.sh",
        WORK,
        exists_only("run.sh"),
    )
    argv = build_argv(cmd, tag="t")
    assert argv == ["sbatch", "--parsable", "-J", "keep", "--comment=slurm-triage:t", "run.sh"]


def test_overrides_replace_in_place_or_append() -> None:
    cmd = parse_submit_line("sbatch -t 30 --mem=4G run.sh", WORK, exists_only("run.sh"))
    argv = build_argv(cmd, tag="t", overrides={"time": "01:00:00", "mem": "8G"})
    assert argv[:4] == ["sbatch", "--parsable", "--time=01:00:00", "--mem=8G"]
    cmd2 = parse_submit_line("sbatch run.sh", WORK, exists_only("run.sh"))
    assert "--mem=8G" in build_argv(cmd2, tag="t", overrides={"mem": "8G"})


def test_relative_chdir_is_pinned_to_workdir() -> None:
    cmd = parse_submit_line("sbatch -D sub run.sh", WORK, exists_only("run.sh"))
    assert f"--chdir={WORK}" in build_argv(cmd, tag="t")


def test_scripts_table_entry_builds_a_command() -> None:
    entry = ScriptSetting(
        job_name="ttc_*", script="run.sh", args=["a b"], sbatch_args=["-p", "gpu"]
    )
    cmd = from_script_setting(entry, WORK, exists_only("run.sh"))
    argv = build_argv(cmd, tag="t", array="1-2")
    assert argv == [
        "sbatch",
        "--parsable",
        "-p",
        "gpu",
        "--array=1-2",
        "--comment=slurm-triage:t",
        "run.sh",
        "a b",
    ]


def test_scripts_table_with_bad_sbatch_args_is_refused() -> None:
    entry = ScriptSetting(job_name="x", script="run.sh", sbatch_args=["gpu"])
    with pytest.raises(CannotRebuild, match="not an option"):
        from_script_setting(entry, WORK, exists_only("run.sh"))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("30:15", 1815),
        ("01:00:00", 3600),
        ("1-0", 86400),
        ("1-02:03", 93780),
        ("2-00:00:01", 172801),
    ],
)
def test_parse_time(text: str, seconds: int) -> None:
    assert parse_time_s(text) == seconds


def test_time_and_mem_formatting_and_escalation() -> None:
    assert format_time_s(93784) == "1-02:03:04"
    assert format_time_s(3600) == "01:00:00"
    assert parse_mem_mib("4G") == 4096
    assert parse_mem_mib("512") == 512
    assert parse_mem_mib("1T") == 1024 * 1024
    assert format_mem(8192) == "8G"
    assert format_mem(1500) == "1500M"
    assert escalate(4096, 2.0, 6144) == 6144
    assert escalate(4096, 2.0, None) == 8192
    assert escalate(8192, 2.0, 6144) == 8192  # never shrinks below the current value
    with pytest.raises(ValueError):
        parse_mem_mib("lots")
    with pytest.raises(ValueError):
        parse_time_s("1:2:3:4")


# --- golden argv files ---------------------------------------------------------------------

GOLDEN_CASES: dict[str, dict[str, object]] = {
    "array_throttle": {
        "submit_line": "sbatch --array=0-99%10 --partition=gpu --job-name=ttc_claude "
        "--output=logs/%x_%A_%a.out --error=logs/%x_%A_%a.err scripts/run_ttc_claude.sh",
        "script": "scripts/run_ttc_claude.sh",
        "array": "38-47,49%10",
        "begin_delay_s": 600,
        "overrides": {},
    },
    "plain_job_escalated": {
        "submit_line": "sbatch -p cpu -t 02:00:00 --mem=16G --dependency=afterok:99 "
        "train.sh --epochs 3",
        "script": "train.sh",
        "array": None,
        "begin_delay_s": 120,
        "overrides": {"time": "04:00:00", "mem": "32G"},
    },
    "metacharacters": {
        "submit_line": "sbatch --job-name=x;y run.sh $(rm -rf ~) `id` a|b",
        "script": "run.sh",
        "array": "3",
        "begin_delay_s": 0,
        "overrides": {},
    },
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_argv(name: str) -> None:
    case = GOLDEN_CASES[name]
    cmd = parse_submit_line(str(case["submit_line"]), WORK, exists_only(str(case["script"])))
    argv = build_argv(
        cmd,
        tag="0123456789abcdef",
        array=case["array"],  # type: ignore[arg-type]
        begin_delay_s=int(case["begin_delay_s"]),  # type: ignore[call-overload]
        overrides=case["overrides"],  # type: ignore[arg-type]
    )
    path = GOLDEN / f"{name}.json"
    doc = {"submit_line": case["submit_line"], "work_dir": WORK, "argv": argv}
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    assert path.exists(), (
        f"missing golden file {path}; create it with UPDATE_GOLDEN=1 pytest {__file__}"
    )
    expected = json.loads(path.read_text(encoding="utf-8"))
    assert argv == expected["argv"], (
        f"sbatch argv for {name!r} differs from {path}; if the change is intended, "
        f"regenerate with: UPDATE_GOLDEN=1 pytest {__file__}"
    )
