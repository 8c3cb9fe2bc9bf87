"""The whole-file fast path of ``scan_path`` (``_scan_whole``) must find exactly what the
forward scanner finds: the same success line, Slurm line, final error, line count and end
offset, on every fixture and on generated logs.

The fast path's safety margins are sized from the scanner's own limits (frames of one
traceback, continuation lines); the tests shrink those limits together so that small
files exercise the same logic a 200 MB log does (tail window, quiet start, head candidates
near tracebacks, window doubling)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import daemon.classify as classify
from daemon.classify import ScanFindings, _scan_whole, build_table, decide, scan_path
from daemon.settings import ClassifySettings

SETTINGS = ClassifySettings()
TABLE = build_table(SETTINGS)
FIXTURES = Path(__file__).parent / "fixtures" / "logs"

pytestmark = pytest.mark.skipif(
    TABLE.candidates_find is None, reason="google-re2 not installed: no whole-file fast path"
)


@pytest.fixture(autouse=True, params=["hyperscan", "grep", "re2"])
def small_limits(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[None]:
    """Scanner limits small enough that a few-KB file has a head, a tail and margins; every
    test runs with the head searched by Hyperscan (in 40-byte reads, so lines cross reads),
    by GNU grep and by the RE2 finder."""
    monkeypatch.setattr(classify, "MAX_FRAME_LINES", 12)
    monkeypatch.setattr(classify, "TB_REACH", 12 + classify.MAX_CONTINUATION + 16)
    monkeypatch.setattr(classify, "USE_HYPERSCAN", request.param == "hyperscan")
    monkeypatch.setattr(classify, "USE_GREP", request.param == "grep")
    monkeypatch.setattr(classify, "SPOT_CHUNK", 40)
    yield


def _forward(path: Path) -> tuple[ScanFindings, int]:
    scanner = classify.LogScanner(TABLE, str(path))
    with open(path, "rb") as fh:
        data = fh.read()
    scanner.feed(data)
    return scanner.findings(), len(data)


def _check(path: Path, window: int) -> bool:
    """Both paths agree; returns whether the fast path was taken."""
    fast = _scan_whole(path, TABLE, window=window, max_window=1 << 30)
    if fast is None:
        return False
    findings, end, state = fast
    expected, size = _forward(path)
    assert findings == expected
    assert end == size
    assert decide([findings], None, SETTINGS) == decide([expected], None, SETTINGS)
    # the returned state resumes like the forward scanner's (stale line markers aside)
    resumed = classify.LogScanner.from_state(TABLE, str(path), state)
    resumed.feed(b"Traceback (most recent call last):\nKeyError: 'x'\n")
    again = classify.LogScanner(TABLE, str(path))
    again.feed(path.read_bytes() + b"Traceback (most recent call last):\nKeyError: 'x'\n")
    assert resumed.findings() == again.findings()
    return True


NOISE = (
    b'2026-01-25 14:02:11,301 INFO httpx: HTTP Request: POST https://api.x/v1 "HTTP/1.1 429 '
    b'Too Many Requests"\n'
    b"2026-01-25 14:02:11,301 INFO anthropic._base_client: Retrying request in 2.1 seconds\n"
    b"Round 1/5:  40%|\xe2\x96\x88\xe2\x96\x88     | 2/5 [01:22<02:03] input_tokens=4290\n"
    b"2026-01-25 14:02:11,301 INFO __main__: host=n1 CUDA_VISIBLE_DEVICES=0 HTTPX_TIMEOUT=600\n"
)


@pytest.mark.parametrize(
    "path", sorted(FIXTURES.rglob("*.*")), ids=lambda p: str(p.relative_to(FIXTURES))
)
@pytest.mark.parametrize("window", [64, 512])
def test_fixture_behind_noise_same_findings(path: Path, window: int, tmp_path: Path) -> None:
    # the fixture at the end of a long log (the usual shape) and alone
    log = tmp_path / path.name
    log.write_bytes(NOISE * 60 + path.read_bytes())
    _check(log, window)
    alone = tmp_path / ("alone_" + path.name)
    alone.write_bytes(path.read_bytes())
    _check(alone, window)


def test_fast_path_is_taken_and_counts_lines(tmp_path: Path) -> None:
    log = tmp_path / "big.err"
    ending = b"Traceback (most recent call last):\n  File \"a.py\", line 1\nKeyError: 'k'\n"
    log.write_bytes(
        b"slurmstepd: error: *** STEP 5.0 ON n CANCELLED AT 2026 ***\n" + NOISE * 500 + ending
    )
    assert _check(log, 256)
    findings, _end, _state = _scan_whole(log, TABLE, window=256) or (None, 0, {})
    assert findings is not None
    assert findings.lines == 2004
    assert findings.slurm is not None and findings.slurm.line_no == 1
    assert findings.final is not None and findings.final.entries[-1].line_no == 2004


def test_marker_early_in_a_big_file_is_found(tmp_path: Path) -> None:
    log = tmp_path / "ok.err"
    log.write_bytes(
        NOISE * 10
        + b"x \xe2\x9c\x85 Experiment RESULTS SAVED to out.json\n"
        + NOISE * 400
        + b"ERROR: Error code: 503\n"
    )
    assert _check(log, 256)
    findings, _, _ = _scan_whole(log, TABLE, window=256) or (None, 0, {})
    assert findings is not None and findings.success is not None
    assert findings.success.line_no == 41


def test_candidate_inside_a_traceback_falls_back(tmp_path: Path) -> None:
    # "results saved" as a frame line of a traceback is not a success: the fast path must
    # not decide it from the line alone
    log = tmp_path / "tb.err"
    log.write_bytes(
        NOISE * 5
        + b"Traceback (most recent call last):\n    save('results saved')\nValueError: x\n\n"
        + NOISE * 400
        + b"ERROR: Error code: 503\n"
    )
    assert _scan_whole(log, TABLE, window=256) is None
    findings, _, _ = scan_path(log, TABLE)
    assert findings.success is None


def test_scan_path_uses_the_fast_path_for_big_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(classify, "FAST_MIN_BYTES", 1024)
    monkeypatch.setattr(classify, "TAIL_WINDOW", 256)
    log = tmp_path / "big.err"
    log.write_bytes(NOISE * 300 + b"torch.OutOfMemoryError: CUDA out of memory.\n")
    calls: list[Path] = []
    real = classify._scan_whole

    def spy(path: Path, table: classify.SignatureTable, **kw: int) -> object:
        calls.append(path)
        return real(path, table, **kw)

    monkeypatch.setattr(classify, "_scan_whole", spy)
    findings, end, _ = scan_path(log, TABLE)
    assert calls == [log]
    assert (findings, end) == _forward(log)


FRAGMENTS = [
    b"Traceback (most recent call last):\n",
    b'  File "x.py", line 3, in f\n',
    b"    raise X\n",
    b"anthropic.RateLimitError: Error code: 429\n",
    b"KeyError: 'a'\n",
    b"RuntimeError: request failed\n",
    b"\nDuring handling of the above exception, another exception occurred:\n\n",
    b"The above exception was the direct cause of the following exception:\n",
    b"ERROR:root:Error code: 503\n",
    b"ERROR 2026 worker: connection reset by peer\n",
    b"INFO:httpx:HTTP/1.1 429 Too Many Requests\n",
    b"slurmstepd: error: *** JOB 9 ON n CANCELLED AT 2026-01-01T00:00:00 DUE TO TIME LIMIT ***\n",
    b"srun: error: n1: task 0: Out Of Memory\n",
    b"/var/spool/slurmd/job9/slurm_script: line 12: 4242 Killed python run.py\n",
    b"Killed\n",
    b"Exception ignored in: <function f>\n",
    b"  | ExceptionGroup: x (1 sub-exception)\n",
    b"  +-+---- 1 ----\n",
    b"    | Traceback (most recent call last):\n",
    b"results saved\n",
    b"\xe2\x9c\x85 CONSENSUS REACHED\n",
    b"save \xe2\x84\xaa RESULTS SAVED\n",
    b"\r 45%|####  | 429/1000\r",
    b"\xff\xfe\x00",
    b"x" * 300 + b"\n",
    b"\n",
    *NOISE.splitlines(keepends=True),
]

log_bytes = st.lists(
    st.one_of(
        st.sampled_from(FRAGMENTS),
        st.sampled_from(NOISE.splitlines(keepends=True)),
        st.binary(max_size=30),
        st.builds(lambda n: NOISE * n, st.integers(min_value=1, max_value=30)),
    ),
    max_size=60,
).map(b"".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=log_bytes, window=st.sampled_from([32, 100, 400, 1500]))
def test_generated_logs_same_findings(
    data: bytes, window: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    log = tmp_path_factory.mktemp("w") / "gen.err"
    log.write_bytes(data)
    _check(log, window)


# --- the grep accelerator for the head (_grep_head_lines) --------------------------------

HEAD_LINES = [
    b"plain line\n",
    b"a slurm line\n",
    b"SLURM_JOB_ID=5 (upper case: not Slurm's)\n",
    b"x \xe2\x9c\x85 Experiment RESULTS SAVED\n",
    b"ReSuLtS SaVeD\n",
    b"results \xe2\x84\xaa saved\n",  # Kelvin sign: lower-cases to an ASCII k
    b"\xc4\xb0 dotted capital I\n",
    b"srun: error: n1: task 0: Killed\n",
    b"*** JOB 9 ON n CANCELLED AT 2026 ***\n",
    b"result\rs saved\n",
    b"\xff\xfe results saved\n",
    b"y" * (70 << 10) + b" results saved\n",  # past the cut the scanner makes
    b"results saved " + b"z" * (70 << 10) + b"\n",
    b"1:2:3 colons results saved\n",
    b"\n",
]


def test_head_line_longer_than_the_rest_of_a_read_keeps_its_first_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: when a line carried over from one read ended early in the next and the
    # line after it ran past the end of that read, _head_lines kept only its bytes up to
    # MAX_LINE_BYTES *of the read*, not of the line: a Slurm line near the end of the
    # line's first 64 KB (what the scanner sees) was lost.
    monkeypatch.setattr(classify, "READ_CHUNK", 128 << 10)
    monkeypatch.setattr(classify, "SPOT_CHUNK", 128 << 10)
    cut = classify.MAX_LINE_BYTES
    first = b"x" * ((130 << 10) - 1) + b"\n"  # crosses the first read, ends 2 KB into the next
    second = b"y" * (cut - 40) + b" a slurm line " + b"z" * (300 << 10) + b"\n"
    body = first + second + NOISE * 10
    log = tmp_path / "long.err"
    log.write_bytes(body + b"tail\n")
    expected = [
        (n, line[:cut])
        for n, line in enumerate(body.split(b"\n")[:-1], 1)
        if TABLE.candidates_find is not None
        and TABLE.candidates_find(line[:cut], 0, len(line[:cut])) >= 0
    ]
    assert [n for n, _ in expected] == [2]
    with open(log, "rb") as fh:
        assert classify._head_lines(fh, TABLE, len(body)) == (body.count(b"\n"), expected)
        if HAVE_HYPERSCAN:
            got = classify._hyperscan_head_lines(fh, TABLE, len(body), len(body) + 5, str(log))
            assert got == (body.count(b"\n"), expected)


def _declined_by(
    head_search: Callable[..., object], table: classify.SignatureTable, tmp_path: Path
) -> Path:
    """A big log whose head ``head_search`` must decline (False: take the next way)."""
    log = tmp_path / "big.err"
    log.write_bytes(b"a slurm line\n" + NOISE * 300 + b"ERROR: Error code: 503\n")
    with open(log, "rb") as fh:
        assert head_search(fh, table, 100, log.stat().st_size, str(log)) is False
    return log


def test_grep_missing_falls_back_to_re2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(classify, "USE_GREP", True)
    monkeypatch.setitem(classify._TOOLS, "grep", None)
    log = _declined_by(classify._grep_head_lines, TABLE, tmp_path)
    assert _check(log, 256)


def test_grep_failing_falls_back_to_re2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a "grep" that fails as GNU grep does on an error: exit status 2, no output
    fake = tmp_path / "grep"
    fake.write_text("#!/bin/sh\necho 'grep: memory exhausted' >&2\nexit 2\n")
    fake.chmod(0o755)
    monkeypatch.setattr(classify, "USE_GREP", True)
    monkeypatch.setitem(classify._TOOLS, "grep", str(fake))
    log = _declined_by(classify._grep_head_lines, TABLE, tmp_path)
    assert _check(log, 256)


# --- the Hyperscan accelerator for the head (_hyperscan_head_lines) ----------------------

HAVE_HYPERSCAN = TABLE.candidates_hs is not None and TABLE.candidates_hs.get() is not None
needs_hyperscan = pytest.mark.skipif(not HAVE_HYPERSCAN, reason="hyperscan not installed")


def _accelerator(engine: str) -> Callable[..., object]:
    """The head search of ``engine`` ("grep" or "hyperscan"); skips when it is not here."""
    if engine == "grep":
        if classify._tool("grep") is None:
            pytest.skip("GNU grep not installed")
        return classify._grep_head_lines
    if not HAVE_HYPERSCAN:
        pytest.skip("hyperscan not installed")
    return classify._hyperscan_head_lines


@pytest.mark.parametrize(
    ("engine", "chunk"),
    [("grep", 0), ("hyperscan", 7), ("hyperscan", 64), ("hyperscan", 4096), ("hyperscan", 1 << 20)],
)
def test_accelerated_head_equals_re2_head(
    engine: str, chunk: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # lines longer than MAX_LINE_BYTES, odd bytes, and (Hyperscan) lines across reads
    import random

    accelerated = _accelerator(engine)
    if chunk:
        monkeypatch.setattr(classify, "SPOT_CHUNK", chunk)
    rng = random.Random(5 if engine == "grep" else 7)
    body = b"".join(rng.choice(HEAD_LINES) for _ in range(600 if 0 < chunk < 64 else 3000))
    log = tmp_path / "h.err"
    log.write_bytes(body + b"tail\n" * 50)
    q = len(body)
    with open(log, "rb") as fh:
        via_tool = accelerated(fh, TABLE, q, log.stat().st_size, str(log))
        via_re2 = classify._head_lines(fh, TABLE, q)
    assert via_tool is not False, f"{engine} was available but not used"
    assert via_tool == via_re2
    assert via_re2 is not None and via_re2[0] == body.count(b"\n")
    assert len(via_re2[1]) > 200  # the candidates were really compared


@needs_hyperscan
def test_hyperscan_head_without_candidates_counts_lines_with_wc(tmp_path: Path) -> None:
    log = tmp_path / "quiet.err"
    body = NOISE * 500
    log.write_bytes(body + b"Traceback (most recent call last):\nKeyError: 'k'\n")
    with open(log, "rb") as fh:
        got = classify._hyperscan_head_lines(fh, TABLE, len(body), log.stat().st_size, str(log))
    assert got == (body.count(b"\n"), [])


def test_hyperscan_missing_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "hyperscan", None)  # "import hyperscan" fails
    table = build_table(SETTINGS)
    assert table.candidates_hs is not None and table.candidates_hs.get() is None
    log = _declined_by(classify._hyperscan_head_lines, table, tmp_path)
    fast = _scan_whole(log, table, window=256, max_window=1 << 30)
    assert fast is not None and fast[0] == _forward(log)[0]


@needs_hyperscan
def test_hyperscan_without_wc_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(classify._TOOLS, "wc", None)
    log = _declined_by(classify._hyperscan_head_lines, TABLE, tmp_path)
    assert _check(log, 256)


def test_hyperscan_failing_mid_scan_falls_back(tmp_path: Path) -> None:
    import dataclasses

    class Failing:
        def get(self) -> object:
            def find(buf: bytes, pos: int, end: int) -> int:
                raise classify._HyperscanFailed("scratch allocation failed")

            return find

    table = dataclasses.replace(TABLE, candidates_hs=Failing())
    log = _declined_by(classify._hyperscan_head_lines, table, tmp_path)
    fast = _scan_whole(log, table, window=256, max_window=1 << 30)
    assert fast is not None and fast[0] == _forward(log)[0]


def test_hyperscan_finder_reports_the_line_of_the_first_candidate() -> None:
    finder = classify._HyperscanFinder(b"Traceback|slurm")
    find = finder.get()
    if find is None:
        pytest.skip("hyperscan not installed")
    buf = b"plain\nx slurm y\nzz Traceback\n"
    hit = find(buf, 0, len(buf))
    assert buf.rfind(b"\n", 0, hit) + 1 == 6 and buf.find(b"\n", hit) == 15
    hit = find(buf, 16, len(buf))
    assert buf.rfind(b"\n", 0, hit) + 1 == 16
    assert find(buf, 0, 5) == -1
    assert find(buf, 16, 20) == -1  # the search stops at ``end``


def test_markers_with_newlines_get_no_hyperscan_finder() -> None:
    assert classify._hyperscan_candidates(["done\nnow"]) is None
    assert classify._hyperscan_candidates(["fertig gespeichert \u00e4"]) is None
    assert classify._hyperscan_candidates(["results saved"]) is not None


def test_markers_grep_cannot_express_use_re2() -> None:
    assert classify._candidates_ere(["results saved"]) is not None
    assert classify._candidates_ere(["done\nnow"]) is None
    assert classify._candidates_ere(["fertig gespeichert \u00e4"]) is None
    ere = classify._candidates_ere(["a.b (x)"])
    assert ere is not None and rb"[Aa]\.[Bb] \([Xx]\)" in ere


# --- scan_findings: analyze's reader for whole files -------------------------------------


@pytest.mark.parametrize(
    "path", sorted(FIXTURES.rglob("*.*")), ids=lambda p: str(p.relative_to(FIXTURES))
)
def test_scan_findings_equals_scan_path(path: Path) -> None:
    assert classify.scan_findings(path, TABLE) == scan_path(path, TABLE)[0]


def test_scan_findings_errors_are_scan_paths(tmp_path: Path) -> None:
    from daemon.errors import InputError

    for bad in (tmp_path / "missing.err", tmp_path):
        with pytest.raises(InputError) as got:
            classify.scan_findings(bad, TABLE)
        with pytest.raises(InputError) as want:
            scan_path(bad, TABLE)
        assert str(got.value) == str(want.value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=log_bytes)
def test_scan_findings_generated(data: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    log = tmp_path_factory.mktemp("f") / "gen.err"
    log.write_bytes(data)
    assert classify.scan_findings(log, TABLE) == scan_path(log, TABLE)[0]


@pytest.mark.skipif(classify._tool("grep") is None, reason="GNU grep not installed")
def test_grep_out_of_memory_on_a_huge_line_falls_back(tmp_path: Path) -> None:
    # a head line longer than grep may buffer under its address-space cap
    log = tmp_path / "long.err"
    log.write_bytes(
        b"x" * (48 << 20) + b"\n" + b"a slurm line\n" + NOISE * 300 + b"KeyError: 'k'\n"
    )
    size = log.stat().st_size
    q = size - len(NOISE * 300 + b"KeyError: 'k'\n")
    with open(log, "rb") as fh:
        assert classify._grep_head_lines(fh, TABLE, q, size, str(log)) is False
        via_re2 = classify._head_lines(fh, TABLE, q)
    assert via_re2 is not None and [n for n, _ in via_re2[1]] == [2]


@pytest.mark.parametrize(("engine", "noise_before"), [("grep", 0), ("hyperscan", 20)])
def test_accelerated_head_reads_the_open_file_not_a_rotated_one(
    engine: str, noise_before: int, tmp_path: Path
) -> None:
    accelerated = _accelerator(engine)
    log = tmp_path / "rot.err"
    body = NOISE * noise_before + b"a slurm line\n" + NOISE * 50
    log.write_bytes(body + b"tail\n")
    with open(log, "rb") as fh:
        replacement = tmp_path / "new.err"
        replacement.write_bytes(NOISE * 80 + b"Killed\n" + b"tail\n")
        os.replace(replacement, log)  # rotated after the scan opened it
        got = accelerated(fh, TABLE, len(body), len(body) + 5, str(log))
        assert got is not False
        assert got == classify._head_lines(fh, TABLE, len(body))
        assert got is not None and [n for n, _ in got[1]] == [4 * noise_before + 1]
