"""Property-based tests: every parser and the classifier, on any input, either answer or
raise the package's own error: never another exception, never a hang.

A hang fails the test: each example runs under a SIGALRM budget (generous, a few seconds;
a correctness bound against catastrophic regex backtracking, not a timing).
"""

from __future__ import annotations

import contextlib
import re
import signal
import string
from collections.abc import Iterator
from types import FrameType

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from daemon.classify import LogScanner, build_table, decide
from daemon.errors import SlurmParseError, SubmitError
from daemon.logs import parse_log_name
from daemon.model import TaskKey, compress_ranges, expand_ranges
from daemon.settings import ClassifySettings
from daemon.slurm import (
    DELIMITER,
    SACCT_FIELDS,
    parse_sacct,
    parse_sbatch_parsable,
    parse_squeue,
)
from daemon.submitline import parse_submit_line

BUDGET_S = 5
SETTINGS = settings(
    deadline=None,  # the alarm below is the hang detector; hypothesis timing would flake
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Hang(Exception):
    pass


@contextlib.contextmanager
def budget(seconds: int = BUDGET_S) -> Iterator[None]:
    def on_alarm(_signum: int, _frame: FrameType | None) -> None:
        raise Hang(f"no answer within {seconds} s (catastrophic backtracking?)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- Slurm text

# Values that look like what sacct prints, and some that do not.
SACCT_VALUE = st.one_of(
    st.sampled_from(
        [
            "",
            "123",
            "123_4",
            "123_[1-3%2]",
            "123+0",
            "123.batch",
            "FAILED",
            "CANCELLED by 0",
            "1:0",
            "0:15",
            "2026-01-01T00:00:00",
            "Unknown",
            "00:10:00",
            "1-02:03:04",
            "09:58.123",
            "UNLIMITED",
            "Partition_Limit",
            "None assigned",
            "|",
            "\n",
            "(null)",
        ]
    ),
    st.text(max_size=40),
    st.text(alphabet=string.digits + "_[]-,:%+.", max_size=20),
)


def _valid_row(job: int, task: int | None) -> list[str]:
    jid = f"{job}" if task is None else f"{job}_{task}"
    values = {
        "JobID": jid,
        "JobIDRaw": str(job + (task or 0)),
        "JobName": "exp",
        "User": "alice",
        "State": "FAILED",
        "ExitCode": "1:0",
        "Submit": "2026-01-25T14:00:00",
        "Start": "2026-01-25T14:00:01",
        "End": "2026-01-25T14:10:01",
        "Elapsed": "00:10:00",
        "TotalCPU": "09:58.123",
        "Timelimit": "01:00:00",
        "AllocCPUS": "1",
        "NodeList": "node1",
        "Reason": "None",
        "WorkDir": "/home/alice/exp",
        "Comment": "",
        "SubmitLine": "sbatch --array=0-3 run.sh",
    }
    return [values[f] for f in SACCT_FIELDS]


@SETTINGS
@given(st.text(max_size=2000))
@example("\x1f" * 17 + "\n")
@example("1_[0-99999999999]" + "\x1fx" * 17 + "\n")
def test_parse_sacct_any_text_answers_or_raises_a_parse_error(text: str) -> None:
    with budget():
        try:
            rows = parse_sacct(text)
        except SlurmParseError:
            return
    for row in rows:
        assert row.key.job_id.isdigit() and row.state == row.state.upper()


@SETTINGS
@given(
    rows=st.lists(
        st.tuples(st.integers(1, 10**9), st.none() | st.integers(0, 10**6)), min_size=1, max_size=8
    ),
    spoil=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 17), SACCT_VALUE), max_size=3),
)
def test_parse_sacct_real_rows_with_any_field_replaced(
    rows: list[tuple[int, int | None]], spoil: list[tuple[int, int, str]]
) -> None:
    table = [_valid_row(j, t) for j, t in rows]
    for r, f, value in spoil:
        table[r % len(table)][f] = value
    text = "".join(DELIMITER.join(cols) + "\n" for cols in table)
    with budget():
        try:
            parsed = parse_sacct(text)
        except SlurmParseError:
            assert spoil, "untouched real rows must parse"
            return
    if not spoil:
        assert [str(r.key) for r in parsed] == [
            str(j) if t is None else f"{j}_{t}" for j, t in rows
        ]


@SETTINGS
@given(st.text(max_size=2000))
@example("123_[0-99999999999]\x1f1\x1fPENDING\x1fx\x1fu\x1f\n")
def test_parse_squeue_any_text_answers_or_raises_a_parse_error(text: str) -> None:
    with budget():
        try:
            rows = parse_squeue(text)
        except SlurmParseError:
            return
    assert all(r.key.job_id.isdigit() for r in rows)


@SETTINGS
@given(st.text(max_size=300))
def test_parse_sbatch_parsable_any_text(text: str) -> None:
    with budget():
        try:
            job_id = parse_sbatch_parsable(text)
        except SlurmParseError:
            return
    assert job_id.isdigit()


@SETTINGS
@given(st.integers(1, 10**12), st.none() | st.text(max_size=10))
def test_parse_sbatch_parsable_finds_the_id(job: int, cluster: str | None) -> None:
    assume(cluster is None or (cluster and not any(c.isspace() for c in cluster)))
    line = f"{job}" if cluster is None else f"{job};{cluster}"
    assert parse_sbatch_parsable(line + "\n") == str(job)


# --------------------------------------------------------------------------- SubmitLine

SUBMIT_WORD = st.one_of(
    st.sampled_from(
        [
            "sbatch",
            "--array=0-3",
            "-a",
            "0-3",
            "--mem=4G",
            "-t",
            "10",
            "--wrap",
            "--comment=a b",
            "--",
            "run.sh",
            "-J",
            "--part=gpu",
            "--export=ALL",
            "-N2",
            "--gres",
            "$(touch /tmp/x)",
            ";",
            "|",
            "&&",
        ]
    ),
    st.text(max_size=12),
)


@SETTINGS
@given(st.lists(SUBMIT_WORD, max_size=12), st.booleans())
def test_parse_submit_line_any_words(words: list[str], script_exists: bool) -> None:
    line = " ".join(words)
    with budget():
        try:
            cmd = parse_submit_line(line, "/work", lambda _p: script_exists)
        except SubmitError:
            return
    # whatever it kept, it kept verbatim: no word was invented
    kept = [t for o in cmd.options for t in o.tokens] + [cmd.script, *cmd.script_args]
    assert kept == line.split()[1:] or set(kept) <= set(line.split())


# --------------------------------------------------------------------------- names and keys


@SETTINGS
@given(st.text(max_size=300))
def test_parse_log_name_any_name(name: str) -> None:
    with budget():
        parsed = parse_log_name(name)
    if parsed is not None:
        _prefix, key = parsed
        assert key.job_id.isdigit()


_DATE_LIKE = re.compile(r"(19[7-9]\d|20\d\d)((0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01]))?")


@SETTINGS
@given(
    prefix=st.from_regex(r"[a-z][a-z_]{0,20}[a-z]", fullmatch=True),
    job=st.integers(100, 10**9),
    task=st.none() | st.integers(0, 10**6),
)
def test_parse_log_name_round_trip(prefix: str, job: int, task: int | None) -> None:
    # by design (logs.py) ids have 3+ digits, and a year or date is part of a name
    assume("__" not in prefix and not _DATE_LIKE.fullmatch(str(job)))
    name = f"{prefix}_{job}" if task is None else f"{prefix}_{job}_{task}"
    assert parse_log_name(name) == (prefix, TaskKey(str(job), task))
    slurm = f"slurm-{job}" if task is None else f"slurm-{job}_{task}"
    parsed = parse_log_name(slurm)
    assert parsed is not None and parsed[1] == TaskKey(str(job), task)


@SETTINGS
@given(st.integers(0, 10**12), st.none() | st.integers(0, 10**7))
def test_task_key_round_trip(job: int, task: int | None) -> None:
    key = TaskKey(str(job), task)
    assert TaskKey.parse(str(key)) == key


@SETTINGS
@given(st.text(max_size=50))
def test_task_key_parse_any_text(text: str) -> None:
    try:
        key = TaskKey.parse(text)
    except ValueError:
        return
    assert key.job_id.isdigit() and str(TaskKey.parse(str(key))) == str(key)


@SETTINGS
@given(st.sets(st.integers(0, 5000), max_size=200))
def test_compress_expand_round_trip(indices: set[int]) -> None:
    text = compress_ranges(indices)
    assert expand_ranges(text) == sorted(indices)
    assert re.fullmatch(r"(\d+(-\d+)?)(,\d+(-\d+)?)*|", text)


@SETTINGS
@given(st.text(alphabet=string.digits + ",-:%[] x", max_size=40))
@example("0-99999999999")
@example("0-4000000:1,0-4000000")
def test_expand_ranges_any_text_is_bounded(text: str) -> None:
    with budget():
        try:
            out = expand_ranges(text)
        except ValueError:
            return
    assert len(out) <= 4_000_001 * 2


def test_regression_sacct_pending_array_range_beyond_slurm_limits_exhausts_memory() -> None:
    """A (garbage) pending-array JobID ``7_[0-4000000000]`` was expanded into four billion
    rows: MemoryError, which is no SlurmError, so it escaped the tick."""
    row = _valid_row(7, None)
    row[0] = "7_[0-4000000000]"
    with budget(), pytest.raises(SlurmParseError, match="larger than Slurm allows"):
        parse_sacct(DELIMITER.join(row) + "\n")


# --------------------------------------------------------------------------- the classifier

TABLE = build_table(ClassifySettings())

# Fragments of every kind of line the signatures look for, to build near misses.
NEAR = [
    "Traceback (most recent call last):",
    '  File "/x.py", line 1, in <module>',
    "RateLimitError: Error code: 429 - ",
    "openai.APIConnectionError: Connection error.",
    "HTTP/1.1 503 Service Unavailable",
    "status_code=429",
    "'code': 502,",
    "Error code: 5",
    "slurmstepd: error: *** JOB 12 ON n1 CANCELLED AT 2026-01-01T00:00:00 DUE TO ",
    "Detected 1 oom-kill event(s) in StepId=1.batch",
    "CUDA out of memory. Tried to allocate ",
    "insufficient_quota",
    "exceeded your current quota",
    "credit balance is too low",
    "Retrying request to /v1/messages in 2.1 seconds",
    "json.decoder.JSONDecodeError: Expecting value: line 1 column 1",
    "KeyError: '",
    "ERROR:root:",
    "E0101 00:00:00.000 ",
    "✅ CONSENSUS REACHED",
    "overloaded_error",
    "During handling of the above exception, another exception occurred:",
    "    raise ",
    "[" * 50,
    "(" * 50,
    "\\" * 50,
    " " * 50,
    "a" * 50,
    "0" * 50,
]


def _scan(data: bytes, chunks: list[int]) -> LogScanner:
    scanner = LogScanner(TABLE, "x.err")
    pos = 0
    for size in chunks:
        scanner.feed(data[pos : pos + size])
        pos += size
    scanner.feed(data[pos:])
    return scanner


@SETTINGS
@given(st.binary(max_size=20_000), st.lists(st.integers(1, 5000), max_size=10))
def test_scanner_any_bytes_any_chunking_never_crashes(data: bytes, chunks: list[int]) -> None:
    with budget():
        scanner = _scan(data, chunks)
        findings = scanner.findings()
        verdict = decide([findings], None, ClassifySettings())
        resumed = LogScanner.from_state(TABLE, "x.err", scanner.state()).findings()
    assert verdict.outcome is not None
    assert resumed == findings
    # any chunking reads the same
    with budget():
        assert _scan(data, []).findings() == findings


@SETTINGS
@given(
    st.lists(st.sampled_from(NEAR) | st.text(max_size=30), min_size=1, max_size=30),
    st.lists(st.integers(1, 5000), max_size=5),
)
def test_scanner_near_miss_lines_never_crash(parts: list[str], chunks: list[int]) -> None:
    data = "\n".join(parts).encode("utf-8", "surrogatepass")
    with budget():
        scanner = _scan(data, chunks)
        decide([scanner.findings()], None, ClassifySettings())


@pytest.mark.parametrize("fragment", NEAR, ids=range(len(NEAR)))
def test_one_megabyte_line_of_near_misses_finishes(fragment: str) -> None:
    """1 MB without a newline, built of a fragment that nearly matches a signature."""
    unit = (fragment + " x ").encode()
    line = unit * (1_000_000 // len(unit) + 1)
    with budget(10):
        scanner = _scan(line + b"\n" + line, [65_537, 300_000])
        verdict = decide([scanner.findings()], None, ClassifySettings())
    assert verdict.outcome is not None
