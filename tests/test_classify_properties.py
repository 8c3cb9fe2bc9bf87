"""Property tests for the streaming scanner: any bytes are safe, chunking never changes the
result, a resumed state equals an uninterrupted scan, and long lines stay linear-time."""

from __future__ import annotations

import importlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.classify import LogScanner, ScanFindings, SignatureTable, build_table, decide
from daemon.settings import ClassifySettings

SETTINGS = ClassifySettings()
TABLE = build_table(SETTINGS)


def _table_without_re2() -> SignatureTable:
    """The stdlib-only table (RE2 not installed): every Python regex meets every line."""
    real = importlib.import_module

    def fake(name: str, package: str | None = None) -> Any:
        if name == "re2":
            raise ImportError(name)
        return real(name, package)

    importlib.import_module = fake  # type: ignore[assignment]
    try:
        return build_table(SETTINGS)
    finally:
        importlib.import_module = real


STDLIB_TABLE = _table_without_re2()

# Fragments that drive the scanner's state machine, mixed with arbitrary bytes.
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
    b"INFO:httpx:HTTP/1.1 429 Too Many Requests\n",
    b"slurmstepd: error: *** JOB 9 ON n CANCELLED AT 2026-01-01T00:00:00 DUE TO TIME LIMIT ***\n",
    b"Exception ignored in: <function f>\n",
    b"  | ExceptionGroup: x (1 sub-exception)\n",
    b"  +-+---- 1 ----\n",
    b"    | Traceback (most recent call last):\n",
    b"results saved\n",
    b"\r 45%|####  | 429/1000\r",
    b"\xff\xfe\x00",
    b"\n",
]
log_bytes = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=40)), max_size=40
).map(b"".join)


def _scan(data: bytes, cuts: list[int]) -> ScanFindings:
    scanner = LogScanner(TABLE, "p")
    prev = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        scanner.feed(data[prev:cut])
        prev = cut
    return scanner.findings()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=log_bytes, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_any_chunking_gives_the_same_findings(data: bytes, cuts: list[int]) -> None:
    whole = _scan(data, [])
    assert _scan(data, cuts) == whole
    decide([whole], None, SETTINGS)  # never raises


@settings(max_examples=200, deadline=None)
@given(data=log_bytes, cut=st.integers(min_value=0, max_value=10_000))
def test_state_round_trip(data: bytes, cut: int) -> None:
    cut = cut % (len(data) + 1)
    first = LogScanner(TABLE, "p")
    first.feed(data[:cut])
    state = json.loads(json.dumps(first.state()))
    resumed = LogScanner.from_state(TABLE, "p", state)
    resumed.feed(data[cut:])
    assert resumed.findings() == _scan(data, [])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    scanner = LogScanner(TABLE, "p")
    scanner.feed(data)
    decide([scanner.findings()], None, SETTINGS)


# Pieces that tempt a backtracking engine: many partial matches on one huge line.
TEMPTING = [
    b"Error code: ",
    b"error ",
    b"Failed to parse ",
    b"OpenrouterException ",
    b"ERROR ",
    b"x" * 50,
    b"429 ",
    b"'code': ",
    b"credit balance ",
    b"Traceback ",
    b"exceeded your current quota ",
    b"RESOURCE_EXHAUSTED ",
]


@settings(max_examples=25, deadline=10_000)  # generous: a backtracking blow-up takes minutes
@given(piece=st.sampled_from(TEMPTING), other=st.sampled_from(TEMPTING))
def test_long_lines_finish_quickly(piece: bytes, other: bytes) -> None:
    line = (piece + other) * (200_000 // (len(piece) + len(other)))
    for prefix in (b"", b"ERROR: ", b"Traceback (most recent call last):\n"):
        for table in (TABLE, STDLIB_TABLE):
            scanner = LogScanner(table, "p")
            scanner.feed(prefix + line + b"\n")
            decide([scanner.findings()], None, SETTINGS)


def test_stdlib_table_really_has_no_re2() -> None:
    assert STDLIB_TABLE.preselect is None and TABLE.preselect is not None
