"""The skim search (classify._compile_skim) drops informational lines in the DFA: it must
never change what the scanner finds. The reference is the same scanner with the plain
prefilter (``skim_find=None``), which every other classifier test exercises."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import classify
from daemon.classify import LogScanner, ScanFindings, SignatureTable, build_table
from daemon.defaults import unconfigured_offline_settings
from daemon.model import ErrorType
from daemon.settings import ClassifySettings, SignatureSetting

TABLE = build_table(ClassifySettings())
PLAIN = dataclasses.replace(TABLE, skim_find=None)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

re2 = importlib.import_module("re2")
_LATIN1 = re2.Options()
_LATIN1.encoding = re2.Options.Encoding.LATIN1
INFO_START = re2.compile(rb"(?m:^(?:" + classify._SKIM_INFO + rb"))", options=_LATIN1)
WITNESS = re2.compile(rb"(?m:^(?:" + classify._SKIM_WITNESS + rb"))", options=_LATIN1)

# line starts: stamps, separators, level words and near misses, other words
STARTS = [
    b"2026-01-25 14:02:11,301 ",
    b"[2026-01-25 14:02:11] ",
    b"14:02:11.301 | ",
    b"0" * 99 + b" ",
    b"0" * 120 + b" ",
    b"123",
    b"-",
    b"",
    b" ",
    b"INFO",
    b"INFO:",
    b"INFO ",
    b"INFOS ",
    b"INFO-x ",
    b"INF",
    b"WARN ",
    b"WARNING ",
    b"WARNINGS ",
    b"WARNI ",
    b"DEBUG\t",
    b"NOTICE ",
    b"TRACE ",
    b"TRACEBACK ",
    b"Traceback (most recent call last):",
    b"ERROR ",
    b"ERR:",
    b"CRITICAL ",
    b"I0125 14:02:11.301 ",
    b"E0125 14:02:11.301 ",
    b"x",
    b"_",
    b"\x80",
    b"\xe2\x96\x88",
]
# line bodies: prefilter hits, busy words, plain text, \r segments, non-ASCII
BODIES = [
    b'httpx: HTTP Request: POST https://api.x/v1 "HTTP/1.1 429 Too Many Requests"',
    b"Retrying request to /v1/messages in 2.1 seconds",
    b"host=n1 CUDA_VISIBLE_DEVICES=0 HTTPX_TIMEOUT=600",
    b"anthropic.RateLimitError: Error code: 429",
    b"RuntimeError: request failed",
    b"KeyError: 'a'",
    b"results saved to out/x.json",
    b"\xe2\x9c\x85 Experiment results saved",
    b"slurmstepd: error: *** JOB 9 ON n CANCELLED AT 2026-01-01T00:00:00 DUE TO TIME LIMIT ***",
    b"Exception ignored in: <function f>",
    b"During handling of the above exception, another exception occurred:",
    b"Killed",
    b"progress 45%|\xe2\x96\x88\xe2\x96\x88  | 9/20",
    b"a\rERROR: connection refused\r",
    b"all fine",
    b"json.decoder.JSONDecodeError: Expecting value",
    b"",
]
lines = st.builds(lambda s, b: s + b, st.sampled_from(STARTS), st.sampled_from(BODIES))
raw_lines = st.one_of(lines, st.binary(max_size=60).filter(lambda b: b"\n" not in b))


@settings(max_examples=3000, deadline=None)
@given(start=st.one_of(st.sampled_from(STARTS), st.binary(max_size=24)), rest=st.binary())
def test_every_line_start_is_informational_or_has_a_witness(start: bytes, rest: bytes) -> None:
    line = (start + rest).split(b"\n")[0] + b"\n"
    assert (INFO_START.match(line) is not None) != (WITNESS.match(line) is not None), line


@settings(max_examples=2000, deadline=None)
@given(line=lines)
def test_a_skimmed_start_is_informational(line: bytes) -> None:
    if INFO_START.match(line + b"\n") is not None and line.isascii():
        assert classify._informational_ascii(line[:120]), line


def _findings(table: SignatureTable, data: bytes, cut: int) -> tuple[ScanFindings, object]:
    scanner = LogScanner(table, "p")
    scanner.feed(data[:cut])
    scanner.feed(data[cut:])
    return scanner.findings(), scanner.state()


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.lists(raw_lines, max_size=60),
    tail=st.sampled_from([b"", b"\n", b"Traceback (most recent call last):\n  File"]),
    cut=st.integers(min_value=0, max_value=4000),
)
def test_skim_finds_what_the_prefilter_finds(body: list[bytes], tail: bytes, cut: int) -> None:
    data = b"\n".join(body) + b"\n" + tail
    assert _findings(TABLE, data, cut) == _findings(PLAIN, data, cut)


def test_skim_with_lines_longer_than_the_line_limit() -> None:
    # a long informational line is checked whatever its level (the cut keeps the hit)
    long_info = b"2026-01-25 14:02:11,301 INFO x: " + b"y" * classify.MAX_LINE_BYTES
    data = b"\n".join(
        [long_info + b" Error code: 429", b"INFO ok", long_info, b"RuntimeError: boom", b""]
    )
    for cut in (0, 100, len(data) // 2):
        assert _findings(TABLE, data, cut) == _findings(PLAIN, data, cut)


@pytest.mark.parametrize("path", sorted((EXAMPLES / "logs").iterdir()), ids=lambda p: p.name)
def test_skim_equals_the_prefilter_on_the_examples(path: Path) -> None:
    data = path.read_bytes()
    assert _findings(TABLE, data, len(data)) == _findings(PLAIN, data, len(data))


def test_informational_hits_never_reach_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the skim search is for: an access log's INFO lines are dropped by the DFA."""
    calls: list[bytes] = []
    real = classify._informational_ascii

    def counting(head: bytes) -> bool:
        calls.append(head)
        return real(head)

    monkeypatch.setattr(classify, "_informational_ascii", counting)
    access = b'2026-01-25 14:02:11,301 INFO httpx: HTTP Request: POST u "HTTP/1.1 429 Too Many"\n'
    data = access * 200 + b"RuntimeError: boom\n"
    skimmed, _ = _findings(TABLE, data, len(data))
    assert calls == [b"RuntimeError: boom"]
    calls.clear()
    plain, _ = _findings(PLAIN, data, len(data))
    assert len(calls) == 201  # the plain prefilter meets every one of them
    assert skimmed == plain and skimmed.final is not None


def test_no_skim_where_it_could_differ() -> None:
    # user signatures may match across lines; the analyze defaults do get it
    user = ClassifySettings(signatures=[SignatureSetting(type=ErrorType.NETWORK, pattern=r"a\s+b")])
    assert build_table(user).skim_find is None
    assert build_table(unconfigured_offline_settings().classify).skim_find is not None
