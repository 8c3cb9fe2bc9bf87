"""Classifier: signatures over real-world log excerpts, decoys, the decision rules, the
streaming scanner's chunking/state guarantees, and the ``classify`` command."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

from daemon import classify as C
from daemon.classify import LogScanner, build_table, decide, scan_path
from daemon.cli import main
from daemon.errors import ConfigError
from daemon.model import ErrorType, Outcome, SacctRow, TaskKey
from daemon.settings import ClassifySettings, SignatureSetting

FIXTURES = Path(__file__).parent / "fixtures" / "logs"
ALL_FIXTURES = sorted(p for p in FIXTURES.rglob("*") if p.is_file())
SETTINGS = ClassifySettings()
TABLE = build_table(SETTINGS)


def _classify_bytes(data: bytes, settings: ClassifySettings = SETTINGS, **kw: Any) -> Any:
    table = build_table(settings)
    scanner = LogScanner(table, "mem.err")
    scanner.feed(data)
    return decide([scanner.findings()], kw.pop("sacct", None), settings, **kw)


def _row(state: str, exit_code: int = 0, **kw: Any) -> SacctRow:
    base: dict[str, Any] = dict(
        job_id="7_3",
        job_id_raw="10",
        key=TaskKey("7", 3),
        job_name="exp",
        user="u",
        state=state.split()[0],
        state_raw=state,
        exit_code=exit_code,
        exit_signal=0,
        submit=None,
        start=None,
        end=None,
        elapsed_s=None,
        total_cpu_s=None,
        timelimit_s=None,
        work_dir="/w",
        submit_line="",
        comment="",
        reason="",
    )
    base.update(kw)
    return SacctRow(**base)


def _expected(path: Path) -> tuple[Outcome, ErrorType | None]:
    kind = path.parent.name
    if kind in {o.value for o in Outcome}:
        return Outcome(kind), None
    return Outcome.FAILURE, ErrorType(kind)


def test_fixture_tree_covers_every_type() -> None:
    kinds = {p.parent.name for p in ALL_FIXTURES}
    wanted = {t.value for t in ErrorType if t is not ErrorType.UNKNOWN} | {"success", "unknown"}
    assert wanted <= kinds


@pytest.mark.parametrize("path", ALL_FIXTURES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fixture_verdict_and_evidence(path: Path) -> None:
    findings, offset, _state = scan_path(path, TABLE)
    assert offset == path.stat().st_size
    verdict = decide([findings], None, SETTINGS)
    outcome, error_type = _expected(path)
    assert (verdict.outcome, verdict.error_type) == (outcome, error_type), verdict.evidence
    if outcome is Outcome.FAILURE:
        ev = verdict.evidence
        assert ev is not None and ev.line_no is not None and ev.source == str(path)
        # the evidence is the text of the line it names
        # numbered like grep -n: only \n ends a line (a progress bar's \r does not)
        line = path.read_bytes().decode("utf-8").split("\n")[ev.line_no - 1]
        assert ev.text.strip("…")[:60] in line
        assert verdict.retryable == (error_type in C.RETRYABLE_BY_DEFAULT)


@pytest.mark.parametrize(
    ("name", "line_no", "needle"),
    [
        ("rate_limit/anthropic_ratelimit.err", 10, "anthropic.RateLimitError"),
        # the wrapper's cause, not the wrapper
        ("rate_limit/wrapped_runtimeerror.err", 4, "anthropic.RateLimitError"),
        ("rate_limit/tenacity_retryerror.err", 15, "RetryError"),
        ("json_parse/pydantic_invalid_json.err", 7, "Invalid JSON"),
        ("code_error/chained_keyerror_after_ratelimit.err", 11, "KeyError"),
        ("oom/slurm_cgroup_oom.err", 2, "oom-kill event"),
        ("time_limit/with_traceback_after.err", 1, "DUE TO TIME LIMIT"),
        ("code_error/tqdm_then_traceback.err", 4, "TypeError"),
    ],
)
def test_deciding_line(name: str, line_no: int, needle: str) -> None:
    findings, _, _ = scan_path(FIXTURES / name, TABLE)
    ev = decide([findings], None, SETTINGS).evidence
    assert ev is not None and ev.line_no == line_no and needle in ev.text


@pytest.mark.parametrize(
    "line",
    [
        "SLURM_JOB_ID=4150429 SLURM_ARRAY_TASK_ID=502 CUDA_VISIBLE_DEVICES=0 HTTPX_TIMEOUT=30",
        "Loaded 503 examples; max_tokens=4290; total tokens 5029",
        "progress: 429/1000 [02:03<05:00, 503.2it/s]",
        "writing results/round_503.json and results/job_4150502.json",
        'INFO:httpx:HTTP Request: POST https://api.openai.com/v1/chat "HTTP/1.1 429 Too Many Requests"',
        "INFO:openai._base_client:Retrying request to /chat/completions in 0.4 seconds",
        "WARNING:root:Rate limit hit (Error code: 429), backing off 4s",
        "2026-01-25 14:02:11,202 - WARNING - Retrying call in 4.0 seconds as it raised RateLimitError",
        "wandb: Network error (ConnectionError), entering retry loop.",
        "❌ No consensus reached after 10 rounds",
        "Game over: agent B said 'I cannot accept; no consensus'",
        "W0125 14:02:11.000000 1234 client.cc:42] UNAVAILABLE: retrying",
    ],
)
def test_decoys_are_not_failures(line: str) -> None:
    verdict = _classify_bytes(line.encode() + b"\n")
    assert verdict.outcome is Outcome.UNKNOWN, verdict


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Error code: 502 - bad gateway", ErrorType.NETWORK),
        ("HTTP 503: <!DOCTYPE html>", ErrorType.NETWORK),
        ("upstream failed status_code=429", ErrorType.RATE_LIMIT),
        ("{'message': 'Network connection lost.', 'code': 502}", ErrorType.NETWORK),
        ("ERROR: request failed with status: 429", ErrorType.RATE_LIMIT),
        ("ERROR - HTTP/1.1 503 Service Unavailable", ErrorType.NETWORK),
        ("ERROR payment failed: 402 Payment Required", ErrorType.BILLING),
        (
            "ERROR: RateLimitError: You exceeded your current quota (insufficient_quota)",
            ErrorType.BILLING,
        ),
    ],
)
def test_status_codes_in_status_context(line: str, expected: ErrorType) -> None:
    verdict = _classify_bytes(line.encode() + b"\n")
    assert (verdict.outcome, verdict.error_type) == (Outcome.FAILURE, expected)


def test_success_marker_beats_earlier_errors_and_is_case_insensitive() -> None:
    data = FIXTURES.joinpath("rate_limit/anthropic_ratelimit.err").read_bytes() + b"RESULTS SAVED\n"
    assert _classify_bytes(data).outcome is Outcome.SUCCESS


def test_custom_success_marker() -> None:
    settings = ClassifySettings(success_markers=["DONE-OK"])
    assert _classify_bytes(b"x\nDONE-OK\n", settings).outcome is Outcome.SUCCESS
    assert _classify_bytes(b"x\nresults saved\n", settings).outcome is Outcome.UNKNOWN


# --- the decision with sacct ------------------------------------------------------------


def test_sacct_timeout_without_log_line_uses_sacct_evidence() -> None:
    v = _classify_bytes(b"step 1\n", sacct=_row("TIMEOUT"))
    assert v.error_type is ErrorType.TIME_LIMIT and v.evidence is not None
    assert v.evidence.source == "sacct" and v.evidence.text == "State=TIMEOUT ExitCode=0:0"
    assert not v.retryable  # opt-in type


def test_hung_time_limit_is_never_retryable() -> None:
    hung_row = _row("TIMEOUT", elapsed_s=3600, total_cpu_s=1.0)
    busy_row = _row("TIMEOUT", elapsed_s=3600, total_cpu_s=3000.0)
    every = frozenset(ErrorType)
    v = _classify_bytes(b"", sacct=hung_row, retryable_types=every)
    assert v.hung and not v.retryable
    v = _classify_bytes(b"", sacct=busy_row, retryable_types=every)
    assert not v.hung and v.retryable
    short = _row("TIMEOUT", elapsed_s=60, total_cpu_s=0.0)
    assert not _classify_bytes(b"", sacct=short).hung


def test_cancelled_state_with_time_limit_line_is_time_limit() -> None:
    data = FIXTURES.joinpath("time_limit/slurmstepd_host.err").read_bytes()
    v = _classify_bytes(data, sacct=_row("CANCELLED by 0"))
    assert v.error_type is ErrorType.TIME_LIMIT and v.evidence is not None
    assert v.evidence.line_no == 2


def test_oom_state_prefers_log_evidence() -> None:
    data = FIXTURES.joinpath("oom/slurm_cgroup_oom.err").read_bytes()
    v = _classify_bytes(data, sacct=_row("OUT_OF_MEMORY", exit_code=0, exit_signal=125))
    assert v.error_type is ErrorType.OOM and v.evidence is not None and v.evidence.line_no == 2


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("NODE_FAIL", ErrorType.NODE_FAIL),
        ("BOOT_FAIL", ErrorType.NODE_FAIL),
        ("PREEMPTED", ErrorType.PREEMPTED),
        ("DEADLINE", ErrorType.TIME_LIMIT),
        ("CANCELLED by 1000", ErrorType.CANCELLED),
    ],
)
def test_slurm_states(state: str, expected: ErrorType) -> None:
    v = _classify_bytes(b"working\n", sacct=_row(state))
    assert (v.outcome, v.error_type) == (Outcome.FAILURE, expected)


def test_completed_with_uncaught_traceback_is_failure() -> None:
    data = FIXTURES.joinpath("code_error/keyerror.err").read_bytes()
    v = _classify_bytes(data, sacct=_row("COMPLETED"))
    assert v.error_type is ErrorType.CODE_ERROR


def test_completed_without_errors_is_success() -> None:
    assert _classify_bytes(b"all good\n", sacct=_row("COMPLETED")).outcome is Outcome.SUCCESS


def test_failed_with_nothing_recognised_is_unknown_type_with_sacct_evidence() -> None:
    v = _classify_bytes(b"all good\n", sacct=_row("FAILED", exit_code=1))
    assert (v.outcome, v.error_type) == (Outcome.FAILURE, ErrorType.UNKNOWN)
    assert v.evidence is not None and v.evidence.text == "State=FAILED ExitCode=1:0"


def test_unrecognised_error_record_explains_only_a_failed_job() -> None:
    data = b"start\nERROR: the frobnicator jammed\n"
    assert _classify_bytes(data).outcome is Outcome.UNKNOWN
    v = _classify_bytes(data, sacct=_row("FAILED", exit_code=1))
    assert v.error_type is ErrorType.UNKNOWN and v.evidence is not None
    assert v.evidence.line_no == 2


def test_active_is_running() -> None:
    data = FIXTURES.joinpath("code_error/keyerror.err").read_bytes()
    assert _classify_bytes(data, active=True).outcome is Outcome.RUNNING
    assert _classify_bytes(data, sacct=_row("RUNNING")).outcome is Outcome.RUNNING


def test_err_and_out_together() -> None:
    err, _, _ = scan_path(FIXTURES / "code_error/keyerror.err", TABLE)
    out, _, _ = scan_path(FIXTURES / "success/no_consensus.out", TABLE)
    assert decide([err, out], None, SETTINGS).outcome is Outcome.SUCCESS
    rec, _, _ = scan_path(FIXTURES / "rate_limit/logged_error_record.err", TABLE)
    # a traceback beats an error record in the sibling file
    assert decide([rec, err], None, SETTINGS).error_type is ErrorType.CODE_ERROR


def test_bare_killed_is_oom_only_when_nothing_else_explains() -> None:
    line = b"/var/spool/slurmd/job00010/slurm_script: line 12: 27349 Killed   python run.py\n"
    assert _classify_bytes(line).error_type is ErrorType.OOM
    tb = FIXTURES.joinpath("network/openai_connection.err").read_bytes()
    assert _classify_bytes(tb + line).error_type is ErrorType.NETWORK


# --- user signatures -----------------------------------------------------------------------


def test_user_signature_takes_precedence() -> None:
    sig = SignatureSetting(type=ErrorType.NETWORK, pattern=r"KeyError: 'choices'", name="flaky")
    settings = ClassifySettings(signatures=[sig])
    data = b"Traceback (most recent call last):\n  File \"a.py\", line 1\nKeyError: 'choices'\n"
    assert _classify_bytes(data).error_type is ErrorType.CODE_ERROR
    assert _classify_bytes(data, settings).error_type is ErrorType.NETWORK


def test_user_any_signature_finds_plain_lines() -> None:
    sig = SignatureSetting(type=ErrorType.RATE_LIMIT, pattern=r"^quota gremlin$", where="any")
    settings = ClassifySettings(signatures=[sig])
    assert _classify_bytes(b"ok\nQuota Gremlin\n", settings).error_type is ErrorType.RATE_LIMIT


def test_user_slurm_signature() -> None:
    sig = SignatureSetting(type=ErrorType.NODE_FAIL, pattern=r"Xid 79", where="slurm")
    settings = ClassifySettings(signatures=[sig])
    data = b"slurmstepd: error: GPU reported Xid 79 on node gpu12\n"
    assert _classify_bytes(data, settings).error_type is ErrorType.NODE_FAIL


def test_user_signature_needing_backtracking_engine_still_works() -> None:
    # RE2 has no lookbehind: the table falls back to Python's engine for it
    sig = SignatureSetting(type=ErrorType.BILLING, pattern=r"(?<=wallet )empty", where="any")
    settings = ClassifySettings(signatures=[sig])
    assert _classify_bytes(b"note: wallet empty\n", settings).error_type is ErrorType.BILLING


def test_invalid_user_pattern_is_config_error() -> None:
    settings = ClassifySettings(signatures=[SignatureSetting(type=ErrorType.OOM, pattern="(")])
    with pytest.raises(ConfigError, match=r"classify.signatures\[0\]"):
        build_table(settings)


def test_stdlib_fallback_gives_the_same_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def no_re2(name: str, *a: Any) -> Any:
        if name == "re2":
            raise ImportError("no re2")
        return real_import(name, *a)

    monkeypatch.setattr(importlib, "import_module", no_re2)
    table = build_table(SETTINGS)
    assert table.preselect is None
    for path in ALL_FIXTURES:
        findings, _, _ = scan_path(path, table)
        v = decide([findings], None, SETTINGS)
        assert (v.outcome, v.error_type) == _expected(path), path


# --- scanner: chunking, state, bounded memory, bad bytes --------------------------------------


def _feed(data: bytes, size: int) -> C.ScanFindings:
    scanner = LogScanner(TABLE, "x")
    for i in range(0, len(data), size):
        scanner.feed(data[i : i + size])
    return scanner.findings()


@pytest.mark.parametrize("size", [1, 7, 64])
def test_chunking_does_not_change_anything(size: int) -> None:
    for path in ALL_FIXTURES:
        data = path.read_bytes()
        assert _feed(data, size) == _feed(data, 1 << 20), path


def test_state_round_trip_resumes_exactly() -> None:
    for path in ALL_FIXTURES:
        data = path.read_bytes()
        for cut in (len(data) // 3, len(data) // 2, max(0, len(data) - 5)):
            first = LogScanner(TABLE, "x")
            first.feed(data[:cut])
            state = json.loads(json.dumps(first.state()))
            resumed = LogScanner.from_state(TABLE, "x", state)
            resumed.feed(data[cut:])
            assert resumed.findings() == _feed(data, 1 << 20), (path, cut)


def test_findings_is_non_destructive_and_counts_unterminated_last_line() -> None:
    scanner = LogScanner(TABLE, "x")
    scanner.feed(b"a\nslurmstepd: error: *** JOB 8 ON n1 CANC")
    assert scanner.findings().slurm is None
    scanner.feed(b"ELLED AT 2026-01-01T00:00:00 DUE TO TIME LIMIT ***")
    f1 = scanner.findings()
    assert f1.slurm is not None and f1.slurm.line_no == 2 and f1.lines == 2
    assert f1.slurm.error_type is ErrorType.TIME_LIMIT
    scanner.feed(b"\nmore\n")
    assert scanner.findings().slurm == f1.slurm and scanner.findings().lines == 3


def test_scan_path_resumes_from_offset(tmp_path: Path) -> None:
    log = tmp_path / "a.err"
    log.write_bytes(b"step 1\nstep 2\n")
    _f1, off, state = scan_path(log, TABLE)
    with log.open("ab") as fh:
        fh.write(b"ERROR: Error code: 503 - upstream\n")
    f2, off2, _ = scan_path(log, TABLE, offset=off, state=state)
    assert off2 == log.stat().st_size and f2.lines == 3
    assert f2.final is not None and f2.final.entries[-1].line_no == 3


def test_bad_state_is_a_clear_error() -> None:
    with pytest.raises(C.ScanStateError, match="bad saved state"):
        LogScanner.from_state(TABLE, "x", {"v": 1, "lines": "many"})


def test_huge_line_without_newline_stays_bounded() -> None:
    scanner = LogScanner(TABLE, "x")
    block = b"x" * (1 << 20)
    for _ in range(16):
        scanner.feed(block)
    state = scanner.state()
    assert len(json.dumps(state)) < 2 * C.MAX_LINE_BYTES
    scanner.feed(
        b"\nslurmstepd: error: *** JOB 1 ON n CANCELLED AT 2026-01-01T00:00:00 DUE TO TIME LIMIT ***\n"
    )
    f = scanner.findings()
    assert f.lines == 2 and f.slurm is not None and f.slurm.line_no == 2


def test_binary_and_invalid_utf8_do_not_crash() -> None:
    data = (
        bytes(range(256)) * 50
        + b"\n\xff\xfeslurmstepd: error: *** JOB 3 ON n CANCELLED AT 2026 DUE TO TIME LIMIT ***\n"
    )
    v = _classify_bytes(data)
    assert v.error_type is ErrorType.TIME_LIMIT


def test_evidence_is_trimmed_around_the_match() -> None:
    line = "ERROR: " + "x" * 5000 + " insufficient_quota " + "y" * 5000
    v = _classify_bytes(line.encode() + b"\n")
    assert v.error_type is ErrorType.BILLING and v.evidence is not None
    assert len(v.evidence.text) <= C.EVIDENCE_CHARS and "insufficient_quota" in v.evidence.text


def test_missing_file_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(C.InputError, match="no such file"):
        scan_path(tmp_path / "nope.err", TABLE)


# --- the classify command -------------------------------------------------------------------


def test_cli_json_keys(capsys: pytest.CaptureFixture[str]) -> None:
    files = [FIXTURES / "rate_limit/openai_ratelimit.err", FIXTURES / "success/no_consensus.out"]
    assert main(["classify", *map(str, files), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [set(o) for o in out] == [{"path", "outcome", "error_type", "retryable", "evidence"}] * 2
    assert out[0]["outcome"] == "failure" and out[0]["error_type"] == "rate_limit"
    assert out[0]["retryable"] is True and out[0]["evidence"].startswith("8: openai.RateLimitError")
    assert out[1]["outcome"] == "success" and out[1]["error_type"] is None


def test_cli_text(capsys: pytest.CaptureFixture[str]) -> None:
    path = FIXTURES / "billing/anthropic_credit.err"
    assert main(["classify", str(path)]) == 0
    text = capsys.readouterr().out
    assert (
        f"{path}: failure billing (not retryable)" in text
        and "6: anthropic.BadRequestError" in text
    )


def test_cli_missing_file_among_others(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = FIXTURES / "oom/torch_cuda_oom.err"
    assert main(["classify", str(tmp_path / "gone.err"), str(good), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out[0]["outcome"] == "unknown" and "no such file" in out[0]["error"]
    assert out[1]["error_type"] == "oom"


def test_cli_only_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", str(tmp_path / "gone.err")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err and "Traceback" not in err


def test_cli_directory_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_every_builtin_signature_compiles() -> None:
    """Built-in regexes compile on first use (LazyPattern): a typo would only show when a
    log first reaches that signature, so compile them all here."""
    import re as stdlib_re

    from daemon.classify import LazyPattern
    from daemon.settings import ClassifySettings

    table = build_table(ClassifySettings())
    lazy = [
        rx
        for sig in (*table.signatures, *table.slurm)
        for rx in (sig.regex, sig.unless)
        if isinstance(rx, LazyPattern)
    ]
    assert len(lazy) >= len(C._BUILTIN) + len(C._SLURM)
    for rx in lazy:
        stdlib_re.compile(rx.pattern, rx.flags)  # raises on a bad pattern
