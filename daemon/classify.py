"""Failure classification: a table of named signatures plus a small decision function.

Pure: nothing here touches Slurm, the clock or the network; ``scan_path`` and
``classify_files`` only read the files they are given.

How a task's outcome is decided (``decide``), first rule that applies wins:

1. ``active`` (squeue lists it) or an active sacct state -> ``running``.
2. A success marker (``settings.success_markers``, case-insensitive substring) in any of
   its logs -> ``success``, even when recovered retries or logged errors precede it.
3. Slurm's verdict: a strong ``slurmstepd``/``srun`` line (time limit, node failure,
   preemption, oom-kill, scancel) or the sacct state (TIMEOUT, DEADLINE -> time_limit;
   OUT_OF_MEMORY -> oom; NODE_FAIL, BOOT_FAIL -> node_fail; PREEMPTED -> preempted;
   CANCELLED, REVOKED -> cancelled). A more specific log line beats a bare CANCELLED
   state (a step cancelled "DUE TO TIME LIMIT" is a time_limit).
4. The error that ended the program: the last traceback (chained tracebacks and
   exception groups belong to the same error) or, failing that, the last error record.
   Its final exception line decides when it matches a specific signature; a known
   deterministic exception (KeyError, ImportError, ...) is ``code_error``; anything else
   is treated as a wrapper (``RuntimeError: request failed``, tenacity ``RetryError``,
   ``ExceptionGroup``, custom classes) and the earlier lines of the same error are
   searched for the specific cause, falling back to ``code_error``. An uncaught traceback
   is a failure even when sacct says COMPLETED.
   An error record (ERROR/FATAL/CRITICAL line, a bare ``SomethingError: ...`` line, or a
   line matching an ``any`` signature) counts when it matches a signature; an unmatched
   record only explains a job that sacct says failed (type ``unknown``).
5. A weak Slurm hint (a bare ``Killed`` from the batch script, ``STEPD TERMINATED``) when
   nothing else explains the end: ``Killed`` -> oom (the kernel OOM killer is the usual
   sender of an unexplained SIGKILL), STEPD TERMINATED -> node_fail.
6. sacct COMPLETED -> success; sacct FAILED (or any other finished state) -> failure of
   type ``unknown`` with sacct evidence; no sacct and nothing found -> ``unknown``.

A time_limit with sacct TotalCPU below ``hung_cpu_fraction`` of Elapsed (x AllocCPUS when
sacct reports it) after at least ``hung_min_elapsed_s`` is ``hung``: never retryable.
``retryable`` = type in ``retryable_types`` and not hung.

Recovered things never count (rule 3 of the design): lines at DEBUG/INFO/WARNING level
(access logs such as ``"HTTP/1.1 429 Too Many Requests"``), Python warnings, retry notices
(``Retrying request to ... in 2.1 seconds``, tenacity/backoff "Backing off"), ``wandb:``
lines, and tracebacks Python prints for errors it ignores (``Exception ignored in``,
``Task exception was never retrieved``).

Status codes are recognised only in a status context (``Error code: 502``, ``HTTP 503``,
``status_code=429``, ``'code': 429``, ``HTTP/1.1 503``, ``429 Too Many Requests``,
``ClientError: 429``) -- never a bare number in a job id, a token count or a path.

Quota wording: ``insufficient_quota``, credit balance, 402, InsufficientFunds ... are
``billing`` even inside a 429/RateLimitError. Google's "You exceeded your current quota"
429 (``RESOURCE_EXHAUSTED``, per-minute/per-day metrics, free tier) is a rate limit: it
clears by itself, and Google words plan exhaustion the same way as a per-minute limit, so
only the unambiguous billing phrases make a Google error ``billing``.

Evidence: ``Evidence(text, line_no, source)`` with the deciding line trimmed to 300
characters (a window around the match for long lines); ``source`` is the log path, or
``"sacct"`` with text like ``State=TIMEOUT ExitCode=0:0``. ``classify --json`` prints
evidence as the plain string ``"<line_no>: <text>"`` (or ``"sacct: <text>"``), null when
there is none.

Scanner: reads bytes in any chunking, carries at most ``MAX_LINE_BYTES`` of a partial
line, and runs one prefilter regex per chunk so only lines with a keyword reach the
Python-level signature matching; after a ``Traceback`` header it reads line by line until
the exception message ends. All regexes use bounded gaps (no nested or unbounded ``.*``)
so long lines cannot cause catastrophic backtracking.
"""

from __future__ import annotations

import base64
import importlib
import os
import re
import resource
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import EXIT_FAILURE, EXIT_OK, InputError
from .model import (
    ACTIVE_STATES,
    RETRYABLE_BY_DEFAULT,
    ErrorType,
    Evidence,
    Outcome,
    SacctRow,
    Verdict,
)

if TYPE_CHECKING:
    from .settings import ClassifySettings, Settings

Where = Literal["any", "final_error", "slurm"]

# A line longer than this is cut: memory stays bounded for files without newlines.
MAX_LINE_BYTES = 64 * 1024
# Signatures see at most this much of a line (keeps matching linear and cheap).
MATCH_CHARS = 16 * 1024
EVIDENCE_CHARS = 300
READ_CHUNK = 4 * 1024 * 1024
# Entries kept for the error being built (exception lines, causes, continuation lines).
MAX_ENTRIES = 24
# Lines of an exception message kept after the exception line.
MAX_CONTINUATION = 8
# Frames of one traceback before we give up looking for its exception line.
MAX_FRAME_LINES = 5000
STATE_VERSION = 1

T = ErrorType


class ScanStateError(InputError):
    """A saved scanner state cannot be resumed."""


# ---------------------------------------------------------------------------------------
# Signatures


class LazyPattern:
    """A built-in signature's regex, compiled on its first search.

    Most runs meet a handful of the ~50 built-in signatures (the RE2 pre-selection names
    the candidates), and each analyze worker builds its own table: compiling all of them
    up front cost more than the scan of a typical log."""

    __slots__ = ("_compiled", "flags", "pattern")

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self.pattern = pattern
        self.flags = flags
        self._compiled: re.Pattern[str] | None = None

    def search(self, text: str) -> re.Match[str] | None:
        compiled = self._compiled
        if compiled is None:
            compiled = self._compiled = re.compile(self.pattern, self.flags)
            # what re.compile reports: (?i) in the pattern shows up in the flags
            self.flags = compiled.flags
        return compiled.search(text)


@dataclass(frozen=True, slots=True)
class Signature:
    name: str
    type: ErrorType
    regex: re.Pattern[str] | LazyPattern
    where: Where
    # a line matching this is not this signature (e.g. Google per-minute quota vs billing)
    unless: re.Pattern[str] | LazyPattern | None = None
    # Slurm lines only: 2 = decides, 1 = plain cancel, 0 = hint used when nothing else
    priority: int = 2

    def match(self, text: str) -> re.Match[str] | None:
        m = self.regex.search(text)
        if m is None or (self.unless is not None and self.unless.search(text)):
            return None
        return m


def _status(codes: str) -> str:
    """A regex for HTTP status ``codes`` (alternation) in a status context only."""
    # no lookarounds: the same text must compile for RE2 (its Set pre-selects signatures)
    c = rf"(?:{codes})(?:\.?[^\d.]|\.?$)"
    return (
        rf"\b(?i:error[ _]?code|status[ _]?code|http[ _]?(?:status|error|code)?|status"
        rf"|code|response[ _]?code|statuscode)[\"']?[ ]?[:=]?[ ]{{0,2}}[\"'(\[]?{c}"
        rf"|(?:^|[^\w.]){c}[ ,:-]{{0,3}}(?:message=)?['\"]?(?i:too many requests|bad gateway"
        rf"|service unavailable|gateway time-?out|internal server error|payment required"
        rf"|client error|server error|resource_exhausted|unavailable|deadline exceeded"
        rf"|overloaded|quota|rate limit)"
        rf"|HTTP/\d(?:\.\d)? {c}"
        rf"|Response \[{c}\]"
        rf"|(?:Error|Exception)['\"]?[:(\[ ]{{1,3}}['\"]?{c}"
        rf"|\b(?:[Ss]tatus|[Cc]ode) {c}"
    )


_GOOGLE_RATE = (
    r"RESOURCE_EXHAUSTED|ResourceExhausted|generativelanguage|aiplatform|ai\.google\.dev"
    r"|rate-limits|(?i:per minute|per day|PerMinute|PerDay|free_tier|requests per|quota metric)"
)

_CODE_ERROR_CLASSES = (
    "KeyError|IndexError|AttributeError|TypeError|ValueError|NameError|UnboundLocalError"
    "|ImportError|ModuleNotFoundError|AssertionError|FileNotFoundError|IsADirectoryError"
    "|NotADirectoryError|PermissionError|FileExistsError|SyntaxError|IndentationError"
    "|TabError|ZeroDivisionError|NotImplementedError|RecursionError|UnicodeDecodeError"
    "|UnicodeEncodeError|UnicodeError|OverflowError|StopIteration|LookupError"
    "|ArithmeticError|FloatingPointError|SystemError|ReferenceError|BufferError"
    "|EOFError|ModuleNotFoundError|CalledProcessError|JSONSchemaValidationError"
    "|AuthenticationError|PermissionDeniedError|NotFoundError|BadRequestError"
    "|UnprocessableEntityError|ConflictError|InvalidArgument|InvalidRequestError"
)

# (name, type, pattern, where[, unless]) -- order matters within a line: first match wins,
# so billing precedes rate limits and oom precedes Google's RESOURCE_EXHAUSTED.
_BUILTIN: list[tuple[str, ErrorType, str, Where, str | None]] = [
    # --- billing -------------------------------------------------------------------
    ("billing.insufficient_quota", T.BILLING, r"insufficient_quota", "any", None),
    (
        "billing.exceeded_quota",
        T.BILLING,
        r"(?i)exceeded your current quota",
        "any",
        _GOOGLE_RATE,
    ),
    (
        "billing.credits",
        T.BILLING,
        r"(?i)credit balance is too low|insufficient[ _-]?(?:credits?|funds|balance)"
        r"|InsufficientFunds|out of credits|(?:requires|need|add|purchase|buy) more credits"
        r"|billing[ _]hard[ _]limit|billing_not_active|billing details.{0,40}not active"
        r"|reached your specified API usage limits|exceeded your (?:monthly )?spend(?:ing)? limit"
        r"|payment required|account (?:is )?(?:not )?(?:in good standing|suspended)",
        "any",
        None,
    ),
    ("billing.status_402", T.BILLING, _status("402"), "any", None),
    ("billing.quota_exceeded", T.BILLING, r"(?i)\bquota exceeded\b", "any", _GOOGLE_RATE),
    # --- out of memory (before rate limits: JAX says RESOURCE_EXHAUSTED: Out of memory)
    (
        "oom.cuda",
        T.OOM,
        r"OutOfMemoryError|(?i:CUDA out of memory|CUDA error: out of memory)"
        r"|(?i:\bout of memory\b)|(?i:OOM when allocating)|ResourceExhaustedError"
        r"|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation"
        r"|CUDA_ERROR_OUT_OF_MEMORY|(?i:failed to allocate \d[\d.]* ?[KMGT]?i?B)"
        r"|std::bad_alloc|(?i:Cannot allocate memory)|(?i:out of host memory)",
        "any",
        None,
    ),
    ("oom.memoryerror", T.OOM, r"(?:^|[\s.:])MemoryError\b", "final_error", None),
    # --- node / interconnect trouble -------------------------------------------------
    (
        "node_fail.nccl",
        T.NODE_FAIL,
        r"ncclSystemError|ncclRemoteError|ncclInternalError|NCCL communicator was aborted"
        r"|Watchdog caught collective operation timeout"
        r"|(?i:NCCL error.{0,160}(?:unhandled system error|remote process exited|connection"
        r"|network))",
        "any",
        None,
    ),
    (
        "node_fail.gpu",
        T.NODE_FAIL,
        r"(?i)uncorrectable ECC error|GPU has fallen off the bus|\bXid \d+|GPU is lost"
        r"|Unable to determine the device handle for GPU|CUDA-capable device\(s\) is/are busy"
        r"|(?i:all CUDA-capable devices are busy or unavailable)|NODE_FAIL",
        "any",
        None,
    ),
    # --- rate limits -------------------------------------------------------------------
    (
        "rate_limit.status",
        T.RATE_LIMIT,
        _status("429|529") + r"|429 error responses",
        "any",
        None,
    ),
    (
        "rate_limit.words",
        T.RATE_LIMIT,
        r"RateLimitError|RateLimitExceeded|RateLimited|TooManyRequests|Too Many Requests"
        r"|overloaded_error|RESOURCE_EXHAUSTED|ResourceExhausted|ThrottlingException"
        r"|(?i:rate[ _-]?limit(?:ed)?(?: was)? (?:exceeded|reached|hit)|\brate[ _-]limited\b"
        r"|too many requests|too many concurrent requests|rate_limit_exceeded"
        r"|rate_limit_error|model is overloaded|is currently overloaded"
        r"|Quota exceeded for (?:quota )?metric)",
        "any",
        None,
    ),
    (
        "rate_limit.loose",
        T.RATE_LIMIT,
        r"(?i)\brate[ _-]?limit|\boverloaded\b|\bthrottl(?:ed|ing)\b|\b529\b",
        "final_error",
        None,
    ),
    # --- network ----------------------------------------------------------------------
    (
        "network.status",
        T.NETWORK,
        _status("500|502|503|504|520|521|522|523|524|525|530|599"),
        "any",
        None,
    ),
    (
        "network.words",
        T.NETWORK,
        r"APIConnectionError|APITimeoutError|Bad Gateway|Service Unavailable|Gateway Time-?out"
        r"|Network connection lost|Connection reset by peer|Server disconnected"
        r"|Max retries exceeded|(?i:connection (?:error|refused|reset|aborted|lost"
        r"|closed (?:unexpectedly|by peer|before))|request timed out|read timed out"
        r"|connect(?:ion)? timed out|network (?:error|is unreachable)"
        r"|temporary failure in name resolution|name or service not known"
        r"|no route to host|upstream connect error|EOF occurred in violation of protocol"
        r"|unexpected_eof_while_reading|remote end closed connection)",
        "any",
        None,
    ),
    (
        "network.classes",
        T.NETWORK,
        r"ConnectError|ConnectTimeout|ReadTimeout|WriteTimeout|PoolTimeout|ReadError"
        r"|WriteError|ConnectionError|ConnectionResetError|ConnectionRefusedError"
        r"|ConnectionAbortedError|BrokenPipeError|RemoteDisconnected|RemoteProtocolError"
        r"|ServerDisconnectedError|ClientConnectorError|ClientConnectionError|ClientOSError"
        r"|ClientPayloadError|ServerTimeoutError|ChunkedEncodingError|IncompleteRead"
        r"|ProtocolError|NewConnectionError|MaxRetryError|SSLError|SSLEOFError"
        r"|ServiceUnavailable(?:Error)?|InternalServerError|DeadlineExceeded|DEADLINE_EXCEEDED"
        r"|\bUNAVAILABLE\b|(?:^|[\s.])ServerError\b|APIError|TimeoutError|TimeoutException"
        r"|litellm\.Timeout|(?:^|[\s.])Timeout\b|gaierror|\btimed out\b|GatewayTimeout"
        r"|OpenrouterException.{0,200}(?:Network|connection|timeout)",
        "final_error",
        None,
    ),
    # --- empty model output -------------------------------------------------------------
    (
        "empty_response",
        T.EMPTY_RESPONSE,
        r"(?i)returned (?:an )?empty (?:content|response|string|completion|output|message"
        r"|text|result)|empty (?:content|response|completion|output)(?: string| received"
        r"| from| returned|\b)|EmptyResponse|no content (?:returned|in (?:the )?response)"
        r"|response (?:content |text )?(?:was|is) empty|content (?:string )?is (?:empty|None)"
        r"|no (?:choices|candidates|completions?) (?:were )?(?:returned|in (?:the )?response)"
        r"|requires the response to contain a valid .?Part.?, but none were returned",
        "any",
        None,
    ),
    # --- malformed JSON -----------------------------------------------------------------
    (
        "json_parse",
        T.JSON_PARSE,
        r"JSONDecodeError|(?i:(?:failed|unable|could not|couldn't|cannot) (?:to )?"
        r"(?:parse|decode).{0,120}\bJSON\b|invalid json|not (?:a )?valid JSON|json_invalid"
        r"|JSON (?:parse|decode|parsing|decoding) error|OutputParserException"
        r"|Expecting (?:value|property name enclosed in double quotes|',' delimiter"
        r"|':' delimiter)|Unterminated string starting at|Extra data: line \d+)",
        "any",
        None,
    ),
    # --- cancelled by a person ------------------------------------------------------------
    ("cancelled.sigint", T.CANCELLED, r"^\s*KeyboardInterrupt\b", "final_error", None),
    # --- deterministic program errors -----------------------------------------------------
    (
        "code_error.shell",
        T.CODE_ERROR,
        r"command not found|can't open file .{0,300}No such file or directory"
        r"|: error: (?:unrecognized arguments|the following arguments are required"
        r"|argument )|Segmentation fault|core dumped|Illegal instruction",
        "any",
        None,
    ),
    (
        "code_error.auth",
        T.CODE_ERROR,
        _status("400|401|403|404|422") + r"|(?i:invalid[ _]api[ _]key|incorrect api key)",
        "final_error",
        None,
    ),
    (
        "code_error.exception",
        T.CODE_ERROR,
        rf"(?:^|[\s.(\[<'\"])(?:{_CODE_ERROR_CLASSES})\b",
        "final_error",
        None,
    ),
]

# Slurm's own lines (where="slurm"): type, priority.
_SLURM: list[tuple[str, ErrorType, str, int]] = [
    ("slurm.time_limit", T.TIME_LIMIT, r"DUE TO TIME LIMIT|DUE TO DEADLINE", 2),
    ("slurm.node_fail", T.NODE_FAIL, r"DUE TO NODE FAIL|(?i:Node failure on)", 2),
    ("slurm.preempted", T.PREEMPTED, r"DUE TO PREEMPTION", 2),
    (
        "slurm.oom",
        T.OOM,
        r"(?i)oom[-_]kill event|OOM Killed|Exceeded (?:job|step) memory limit"
        r"|exceeded memory limit \(\d+ > \d+\)|task \d+: Out Of Memory|out-of-memory handler",
        2,
    ),
    (
        "slurm.execve",
        T.CODE_ERROR,
        r"execve\(\): .{0,300}(?:No such file or directory|Permission denied)",
        2,
    ),
    ("slurm.cancelled", T.CANCELLED, r"CANCELLED AT \S{1,40}(?: DUE TO SIGNAL \S+)? \*\*\*", 1),
    (
        "slurm.cancelled_other",
        T.CANCELLED,
        r"\*\*\* (?:JOB|STEP) \S{1,40} ON \S{1,200} CANCELLED",
        1,
    ),
    (
        "slurm.stepd_terminated",
        T.NODE_FAIL,
        r"STEPD TERMINATED|DUE TO JOB NOT ENDING WITH SIGNALS|Kill task failed",
        0,
    ),
    ("slurm.killed", T.OOM, r"slurm_script: line \d+: +\d+ Killed|task \d+: Killed|^Killed$", 0),
]

# Which lines are Slurm's (or the batch shell's) rather than the program's.
_SLURM_LINE = re.compile(
    r"slurmstepd|^s(?:run|alloc|batch): |\*\*\* (?:JOB|STEP) |slurm_script: line \d+:|^Killed$"
)

# One search over each chunk: a line without any of these is never looked at again.
# Must cover every built-in signature, record and structure marker below.
_PREFILTER_WORDS = (
    rb"Traceback|Error|ERR|error|Exception|exception|EXCEPTION|FATAL|Fatal|fatal|SEVERE"
    rb"|CRITICAL|Critical|slurmstepd|srun: |salloc: |sbatch: |\*\*\* |slurm_script"
    rb"|Killed|killed|KILLED|[Qq]uota|QUOTA|[Cc]redit|[Bb]illing|[Pp]ayment|PAYMENT"
    rb"|[Ii]nsufficient|INSUFFICIENT|[Ff]unds|(?i:code|status|http|response)"
    rb"[\"' :=\[/\d.(]{0,12}(?:4(?:0[0-4]|22|29)|5(?:0[0-4]|2\d|30|99))|[Ii]nternal [Ss]erver"
    rb"|(?i:deadline exceeded)|[Tt]oo [Mm]any|TOO_MANY|[Rr]ate[ _-]?[Ll]imit|RATE_LIMIT"
    rb"|[Oo]verloaded|OVERLOADED|EXHAUSTED|Exhausted|UNAVAILABLE|[Uu]navailable|DEADLINE"
    rb"|Deadline|[Tt]imeout|TIMEOUT|[Tt]imed out|[Cc]onnection|[Nn]etwork|refused"
    rb"|reset by peer|Gateway|[Dd]isconnected|[Ee]mpty|EMPTY|JSON|Expecting|Unterminated"
    rb"|Extra data|to parse|to decode|not parse|not decode|OOM|oom|[Oo]ut of memory"
    rb"|OutOfMemory|[Mm]emory limit|allocate memory|host memory|CUBLAS|CUDNN|CUDA|NCCL"
    rb"|nccl|Xid|ECC|NODE_FAIL|[Nn]ode failure|PREEMPT|[Tt]hrottl|command not found"
    rb"|No such file|Segmentation fault|core dumped|Illegal instruction|During handling"
    rb"|The above exception|KeyboardInterrupt|[Ss]ervice not known|name resolution"
    rb"|[Nn]o route|EOF|eof|bad_alloc|[Aa]llocate|[Nn]o content|content (?:string )?is"
    rb"|[Nn]o (?:choices|candidates|completion)|none were returned|StopIteration|SystemExit"
    rb"|api[ _]key|API key|InvalidArgument|Interrupt|[Ss]uspended|good standing"
    rb"|[Ee]xceeded|EXCEEDED|Failure|(?m:^[EF]\d{4} \d\d:)|[Ss]pend|[Uu]sage limit"
    rb"|fallen off|device handle|GPU is lost|[Jj]son_invalid|[Ii]nvalid json|valid json"
)


def _finder(compiled: Any) -> Callable[[bytes, int, int], int]:
    """``find(buf, pos, end)`` -> start of the first match or -1.

    The RE2 wrapper's ``search`` costs ~10 us of Python per call (generator, match
    object); its compiled core answers the same question in C. Falls back to ``search``
    for stdlib patterns or a wrapper without that core."""
    core = getattr(compiled, "_regexp", None)
    anchor = (
        getattr(
            getattr(importlib.import_module(type(compiled).__module__), "_Anchor", None),
            "UNANCHORED",
            None,
        )
        if core is not None
        else None
    )
    if core is not None and anchor is not None and hasattr(core, "Match"):
        match = core.Match

        def find_re2(buf: bytes, pos: int, end: int) -> int:
            return int(match(anchor, buf, pos, end)[0][0])

        return find_re2
    search = compiled.search

    def find_re(buf: bytes, pos: int, end: int) -> int:
        m = search(buf, pos, end)
        return -1 if m is None else int(m.start())

    return find_re


def _compile_prefilter(pattern: bytes) -> Any:
    """RE2 (a DFA: hundreds of MB/s over a chunk) when installed and able; else ``re``."""
    try:
        re2 = importlib.import_module("re2")
    except ImportError:
        return re.compile(pattern)
    try:
        return re2.compile(pattern)
    except Exception:  # a user pattern RE2 cannot express (lookbehind, ...)
        return re.compile(pattern)


def _compile_candidates(
    markers: Sequence[str], extra: Sequence[bytes] = ()
) -> Callable[[bytes, int, int], int] | None:
    """A finder for lines that can carry a success marker, a Slurm line or a traceback
    header: the only lines before the tail of a big file that can change its findings.

    It must find a superset of those lines as the scanner sees them (decoded, lower-cased
    for markers), so it is built only when that is certain: RE2 is installed (the stdlib
    engine is ~50x slower over whole files) and every marker letter is ASCII."""
    pattern = _candidates_pattern(markers, extra)
    if pattern is None:
        return None
    try:
        re2 = importlib.import_module("re2")
    except ImportError:
        return None
    try:
        return _finder(re2.compile(pattern))
    except Exception:  # pragma: no cover - the pattern is literal alternations
        return None


def _candidates_pattern(markers: Sequence[str], extra: Sequence[bytes] = ()) -> bytes | None:
    """The RE2 pattern of ``_compile_candidates`` (None: no exact pattern exists)."""
    parts = [rb"Traceback", rb"slurm", rb"\*\*\* ", rb"Killed", rb"s(?:run|alloc|batch): ", *extra]
    for marker in markers:
        for ch in marker:
            if not ch.isascii() and (ch.isalpha() or ch == "\ufffd" or ch.isspace()):
                return None
        parts.append(b"(?i:" + re.escape(marker.encode("utf-8")) + b")")
        # the only non-ASCII characters str.lower() turns into ASCII letters
        if "k" in marker:
            parts.append("\u212a".encode())
        if "i" in marker:
            parts.append("\u0130".encode())
    return b"|".join(parts)


class _HyperscanFailed(Exception):
    """A Hyperscan scan failed (out of scratch memory, ...): the caller takes another way."""


class _HyperscanFinder:
    """``_compile_candidates`` with Hyperscan, compiled on first use (only a big file needs
    it; the import alone costs ~6 ms per process). ``get()`` -> ``find(buf, pos, end)``:
    an offset inside the first line of ``buf[pos:end]`` that holds a candidate, or -1;
    None when Hyperscan is not installed (an optional speed-up) or refuses the pattern.

    The offset is where that match ends, not where it starts (Hyperscan reports ends;
    asking for starts costs speed): callers only look at the line around it, and the
    pattern cannot match a newline, so it is the same line. Matching is on bytes with
    ASCII case folding; the pattern names the only non-ASCII characters that lower-case
    to ASCII letters, so it finds every line RE2's finder must find (it may find a few
    more: ``_Picker`` checks each line again with RE2)."""

    def __init__(self, pattern: bytes) -> None:
        self.pattern = pattern
        self._find: Callable[[bytes, int, int], int] | None = None
        self._tried = False
        self._lock = threading.Lock()  # one scratch space per database: one scan at a time

    def get(self) -> Callable[[bytes, int, int], int] | None:
        if not self._tried:
            self._tried = True
            self._find = self._compile()
        return self._find

    def _compile(self) -> Callable[[bytes, int, int], int] | None:
        try:
            hs = importlib.import_module("hyperscan")
            database = hs.Database(mode=hs.HS_MODE_BLOCK)
            database.compile(expressions=[self.pattern], flags=[hs.HS_FLAG_SINGLEMATCH])
            terminated, failed = hs.ScanTerminated, hs.error
        except Exception:  # not installed, no wheel for this machine, a refused pattern
            return None
        scan, lock = database.scan, self._lock
        match_end = [0]

        def on_match(_id: int, _start: int, end: int, _flags: int, _context: object) -> bool:
            match_end[0] = end
            return True  # stop at the first match

        def find_hs(buf: bytes, pos: int, end: int) -> int:
            with lock:
                try:
                    scan(memoryview(buf)[pos:end], match_event_handler=on_match)
                except terminated:
                    return pos + match_end[0] - 1
                except failed as exc:
                    raise _HyperscanFailed(str(exc)) from exc
            return -1

        return find_hs


def _hyperscan_candidates(markers: Sequence[str]) -> _HyperscanFinder | None:
    if any("\n" in marker or "\r" in marker for marker in markers):
        return None  # a marker no single line can hold: leave it to the exact paths
    pattern = _candidates_pattern(markers)
    return None if pattern is None else _HyperscanFinder(pattern)


# --- the skim search: the prefilter without most informational lines --------------------
#
# Most prefilter hits of a real log are INFO lines (an httpx access line with "HTTP/1.1
# 429", a "Retrying request" notice, "CUDA_VISIBLE_DEVICES" in a start banner) that
# LogScanner._block then drops, at ~10 us of Python each. The skim search lets the DFA
# drop the commonest of them itself. It reports every line the prefilter hits except
# those whose start has the shape ``STAMP LEVEL<boundary>`` (_SKIM_INFO: stamp characters
# only, then an informational level word), so those lines need no Python at all. A line
# with that shape is informational for _informational_ascii (its fast path), so the only
# lines it drops are those _block would drop: the skim search still reports such a line
# when it holds a busy word, a \r or a non-ASCII byte (then _block's own checks decide),
# or a prefilter hit within the stamp and level word. "Line does not start like that" is
# spelled out as _SKIM_WITNESS (a regex has no negation); tests check that every line
# matches exactly one of the two.

# Characters of a timestamp or similar line prefix ("2026-01-25 14:02:11,301 ", "[12:00] "):
# no letters, so no level word can begin among them
_STAMP_CHARS = b"0123456789-:,. /+[]()|"
_SKIM_STAMP_BODY = b"".join(re.escape(bytes([c])) for c in _STAMP_CHARS)
_SKIM_STAMP = b"[" + _SKIM_STAMP_BODY + b"]"
# stamp characters that end a word (neither \w nor "-")
_SKIM_SEP = (
    b"[" + b"".join(re.escape(bytes([c])) for c in _STAMP_CHARS if c not in b"0123456789-") + b"]"
)
_SKIM_LEVELS = (b"DEBUG", b"INFO", b"NOTICE", b"WARNING", b"WARN", b"TRACE")
# the level word must lie in _informational_ascii's 120-byte head
_SKIM_MAX_STAMP = 100
_SKIM_INFO = (
    rb"(?:" + _SKIM_STAMP + rb"{0,%d}" % (_SKIM_MAX_STAMP - 1) + _SKIM_SEP + rb")?"
    rb"(?:" + b"|".join(_SKIM_LEVELS) + rb")[^\w\n\-]"
)


def _skim_level_miss(words: Sequence[bytes]) -> bytes:
    """A regex for text at a line position that starts like one of ``words`` but is not
    one of them followed by a boundary character (``[^\\w\\n-]``): each way to leave the
    words' trie, including the end of the line."""
    trie: dict[Any, Any] = {}
    for word in words:
        node = trie
        for byte in word:
            node = node.setdefault(byte, {})
        node[None] = {}

    def leave(node: dict[Any, Any]) -> bytes:
        nexts = sorted(k for k in node if k is not None)
        alts = [rb"$"]
        if None in node:  # a whole word: only a word character that goes nowhere fails
            others = bytes(c for c in b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_" if c not in nexts)
            alts.append(rb"[" + others + rb"a-z\-]")
        else:
            alts.append(rb"[^\n" + bytes(nexts) + rb"]")
        alts += [bytes([k]) + rb"(?:" + leave(node[k]) + rb")" for k in nexts]
        return b"|".join(alts)

    return b"|".join(bytes([k]) + rb"(?:" + leave(trie[k]) + rb")" for k in sorted(trie))


_SKIM_FIRST = bytes(sorted({w[0] for w in _SKIM_LEVELS}))
_SKIM_WITNESS = (
    # the stamp run ends in a digit or "-": no level word can follow it
    _SKIM_STAMP
    + rb"{0,%d}[0-9\-](?:[^" % (_SKIM_MAX_STAMP - 1)
    + _SKIM_STAMP_BODY
    + rb"\n]|$)"
    # after an empty run or a separator: the end, a non-level letter, or a near miss
    + rb"|(?:"
    + _SKIM_STAMP
    + rb"{0,%d}" % (_SKIM_MAX_STAMP - 1)
    + _SKIM_SEP
    + rb")?"
    rb"(?:$|[^"
    + _SKIM_STAMP_BODY
    + _SKIM_FIRST
    + rb"\n]|"
    + _skim_level_miss(_SKIM_LEVELS)
    + rb")"
    # a stamp too long for the level word to be in the head
    + rb"|"
    + _SKIM_STAMP
    + rb"{%d}" % (_SKIM_MAX_STAMP + 1)
)
# A hit can begin inside the witness: those within the stamp and 9 characters are reported
# whatever the line's shape (the longest witness is a full stamp and 8 characters).
_SKIM_EARLY = _SKIM_STAMP + rb"{0,%d}[^\n]{0,9}?" % _SKIM_MAX_STAMP


def _compile_skim(prefilter: bytes, busy: bytes) -> Callable[[bytes, int, int], int] | None:
    try:
        re2 = importlib.import_module("re2")
        # Latin-1: a class must consume any byte (a log line may hold invalid UTF-8); the
        # prefilter's words are ASCII or exact byte strings, so they match the same bytes
        options = re2.Options()
        options.encoding = re2.Options.Encoding.LATIN1
        compiled = re2.compile(
            rb"(?m:^" + _SKIM_EARLY + rb"(?:" + prefilter + rb"))"
            rb"|(?m:^(?:" + _SKIM_WITNESS + rb")[^\n]*?(?:" + prefilter + rb"))"
            rb"|(?m:^" + _SKIM_INFO + rb"[^\n]*?[\r\x80-\xff])"
            rb"|" + busy,
            options=options,
        )
    except Exception:  # no RE2, or a user pattern it cannot take
        return None
    return _finder(compiled)


_ERE_SPECIAL = frozenset(b"\\.[]()*+?{}|^$")


def _candidates_ere(markers: Sequence[str]) -> bytes | None:
    """``_compile_candidates`` as an ERE for ``LC_ALL=C grep -E``: it must find every line
    the RE2 finder must find (it may find more or fewer of the others: each line grep
    reports is checked again with the RE2 finder). Case-insensitive markers become
    ``[Rr][Ee]...``; any other byte is literal in the C locale."""
    parts = [b"Traceback", b"slurm", b"\\*\\*\\* ", b"Killed", b"s(run|alloc|batch): "]
    for marker in markers:
        if "\n" in marker or "\0" in marker:
            return None  # cannot be passed to grep as one pattern
        for ch in marker:
            if not ch.isascii() and (ch.isalpha() or ch == "\ufffd" or ch.isspace()):
                return None
        out = bytearray()
        for ch in marker:
            if ch.isascii() and ch.isalpha():
                out += f"[{ch.upper()}{ch.lower()}]".encode("ascii")
                continue
            for byte in ch.encode("utf-8"):
                if byte in _ERE_SPECIAL:
                    out.append(0x5C)
                out.append(byte)
        parts.append(bytes(out))
        if "k" in marker:
            parts.append("\u212a".encode())
        if "i" in marker:
            parts.append("\u0130".encode())
    return b"|".join(parts)


_TB_HEADER = re.compile(r"(?:Exception Group )?Traceback \(most recent call last\):")
_CHAIN = re.compile(
    r"During handling of the above exception, another exception occurred"
    r"|The above exception was the direct cause of the following exception"
)
_IGNORED_TB = re.compile(
    r"Exception ignored in|Task exception was never retrieved|Unclosed client session"
    r"|Unclosed connector|Error in atexit\._run_exitfuncs"
)
_LEVEL = re.compile(
    r"(?<![\w-])(DEBUG|INFO|NOTICE|WARNING|WARN|TRACE|ERROR|ERR|FATAL|CRITICAL|SEVERE"
    r"|EXCEPTION)(?![\w-])"
)
_GLOG = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d")
_PY_WARNING = re.compile(
    r"^\S{1,300}:\d+: \w{0,40}Warning: |^\s*warnings\.warn\(|^\w{0,40}Warning: "
)
_RETRY_NOTICE = re.compile(  # matched against the lower-cased line (fast path in re)
    r"\bretrying\b|\bwill (?:be )?retr(?:y|ied)\b|\bretry(?:ing)? (?:in|after) [\d.]+"
    r"|\bretry loop\b|\bbacking off\b|\bsleeping (?:for )?[\d.]+|\bretries left\b"
    r"|\bwill try again\b"
)
# Lines a program prints when it fails, without a log level.
_ERRORISH = re.compile(
    r"^\s{0,4}(?:[\w.-]{1,200}: )?(?:error|Error|ERROR|fatal|Fatal|FATAL)(?:\[\w+\])?:"
    r"|^\s{0,4}(?:[A-Za-z_][\w]*\.){0,8}[A-Z]\w{0,80}(?:Error|Exception|Exceeded|Exhausted"
    r"|Unavailable|Timeout|Interrupt|Group|Failure)(?:\[.{0,300}\])?:(?: |$)"
)
_EXC_CLASS = re.compile(r"^\s*((?:[A-Za-z_]\w*\.){0,10}[A-Za-z_]\w*)(?:\[.{0,200}?\])?(?::|$)")
_FRAME = re.compile(r"^(?:\s|\^|~|\[Previous line repeated|\.\.\.$|\+-|\+-+|\|\s*$)")


_LEVEL_WORDS = (
    "DEBUG",
    "INFO",
    "NOTICE",
    "WARN",
    "TRACE",
    "ERR",
    "FATAL",
    "CRITICAL",
    "SEVERE",
    "EXCEPTION",
)


def _level(text: str) -> str | None:
    """The log level of a line, if it has one near its start (cheap substring gate first)."""
    head = text[:120]
    if head[:1] in ("I", "W", "E", "F") and head[1:5].isdigit():
        g = _GLOG.match(head)
        if g is not None:
            return {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "FATAL"}[g.group(1)]
    if not any(w in head for w in _LEVEL_WORDS):
        return None
    m = _LEVEL.search(head)
    return m.group(1) if m is not None else None


_LEVEL_B = re.compile(_LEVEL.pattern.encode("ascii"))
_GLOG_B = re.compile(_GLOG.pattern.encode("ascii"))
_INFO_LEVELS = frozenset({"DEBUG", "INFO", "NOTICE", "WARNING", "WARN", "TRACE"})
_INFO_LEVELS_B = frozenset(w.encode("ascii") for w in _INFO_LEVELS)


_LEVEL_AT_B = re.compile(
    rb"(DEBUG|INFO|NOTICE|WARNING|WARN|TRACE|ERROR|ERR|FATAL|CRITICAL"
    rb"|SEVERE|EXCEPTION)(?![\w-])"
)
_WORD_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _informational_ascii(head: bytes) -> bool:
    """``_is_informational`` for a line whose first 120 bytes ``head`` are ASCII (then the
    decoded text starts with the same characters)."""
    # Most log lines are "<timestamp> LEVEL ...": when only stamp characters precede a
    # level word, that word is the first one _LEVEL_B would find (the stamp has no
    # letters), so an anchored match there answers without searching the whole head.
    p = len(head) - len(head.lstrip(_STAMP_CHARS))
    if p == 0 or head[p - 1] not in _WORD_BYTES:
        m = _LEVEL_AT_B.match(head, p)
        if m is not None:
            return m.group(1) in _INFO_LEVELS_B
    if head[:1] in (b"I", b"W", b"E", b"F") and head[1:5].isdigit():
        g = _GLOG_B.match(head)
        if g is not None:
            return g.group(1) in (b"I", b"W")
    # no substring gate first (as _level has): these lines almost always carry a level,
    # and one search over 120 bytes is cheaper than ten ``in`` tests in a generator
    m = _LEVEL_B.search(head)
    return m is not None and m.group(1) in _INFO_LEVELS_B


def _is_informational(text: str) -> bool:
    level = _level(text)
    return level is not None and level in {"DEBUG", "INFO", "NOTICE", "WARNING", "WARN", "TRACE"}


def _is_error_level(text: str) -> bool:
    return _level(text) in {"ERROR", "ERR", "FATAL", "CRITICAL", "SEVERE"}


@dataclass(frozen=True, slots=True)
class SignatureTable:
    """Signatures in priority order (user ones first) and the success markers."""

    signatures: tuple[Signature, ...]
    slurm: tuple[Signature, ...]
    success_markers: tuple[str, ...]
    prefilter: Any = field(repr=False)  # compiled bytes regex: .search(buf, pos, end)
    # RE2 Set over ``signatures`` (None without RE2): one pass names the candidates, so the
    # slow backtracking engine only runs on the few signatures that can match
    preselect: Any = field(default=None, repr=False)
    always: frozenset[int] = frozenset()  # signatures RE2 could not take: always tried
    # _finder(prefilter): the per-chunk search without the wrapper's per-call overhead
    prefilter_find: Callable[[bytes, int, int], int] | None = field(default=None, repr=False)
    # whole-file fast path (scan_path): finds lines that may be Slurm's, a success marker
    # or a traceback header; None when it cannot be built exactly (no RE2, odd markers)
    candidates_find: Callable[[bytes, int, int], int] | None = field(default=None, repr=False)
    # the same candidates as a POSIX ERE for GNU grep (LC_ALL=C), a faster search over a
    # big file's head; None when grep could miss one (see _candidates_ere)
    candidates_ere: bytes | None = field(default=None, repr=False)
    # the same candidates with Hyperscan when installed (~3x faster than GNU grep over a big
    # file's head, ~5x faster than RE2); None: not installed, or it refused the pattern
    candidates_hs: _HyperscanFinder | None = field(default=None, repr=False)
    # candidates plus chain/"ignored" words: a line without any of these that has an
    # informational level is skipped before decoding (LogScanner._block)
    busy_find: Callable[[bytes, int, int], int] | None = field(default=None, repr=False)
    # the prefilter minus most informational lines (_compile_skim); None: use the prefilter
    skim_find: Callable[[bytes, int, int], int] | None = field(default=None, repr=False)

    def match(self, text: str, *, final: bool) -> tuple[Signature, re.Match[str]] | None:
        """First signature matching ``text``; ``final`` admits final_error signatures."""
        text = text[:MATCH_CHARS]
        order: Iterable[int]
        if self.preselect is not None:
            hits = self.preselect.Match(text) or []
            order = sorted(self.always.union(hits))
        else:
            order = range(len(self.signatures))
        for i in order:
            sig = self.signatures[i]
            if sig.where == "slurm" or (sig.where == "final_error" and not final):
                continue
            m = sig.match(text)
            if m is not None:
                return sig, m
        return None

    def match_slurm(self, text: str) -> tuple[Signature, re.Match[str]] | None:
        text = text[:MATCH_CHARS]
        for sig in self.slurm:
            m = sig.match(text)
            if m is not None:
                return sig, m
        return None

    def success(self, text: str) -> bool:
        low = text.lower()
        return any(marker in low for marker in self.success_markers)


def build_table(settings: ClassifySettings) -> SignatureTable:
    """Built-in signatures plus the user's (which take precedence)."""
    user_any: list[Signature] = []
    user_slurm: list[Signature] = []
    extra_prefilter: list[bytes] = []
    for i, us in enumerate(settings.signatures):
        flags = re.IGNORECASE if us.ignore_case else 0
        try:
            rx = re.compile(us.pattern, flags)
        except re.error as exc:
            from .errors import ConfigError

            raise ConfigError(
                f"classify.signatures[{i}] ({us.name}): invalid pattern {us.pattern!r}: {exc}"
            ) from exc
        sig = Signature(us.name, us.type, rx, us.where)
        (user_slurm if us.where == "slurm" else user_any).append(sig)
        extra_prefilter.append(_bytes_pattern(us.pattern, us.ignore_case))
    builtin = [
        Signature(name, typ, LazyPattern(rx), where, LazyPattern(unless) if unless else None)
        for name, typ, rx, where, unless in _BUILTIN
    ]
    slurm = [
        Signature(name, typ, LazyPattern(rx), "slurm", None, prio) for name, typ, rx, prio in _SLURM
    ]
    markers = tuple(m.lower() for m in settings.success_markers if m.strip())
    words = [_PREFILTER_WORDS, *extra_prefilter]
    words += [
        b"(?i:" + re.escape(m.encode("utf-8")) + b")" for m in settings.success_markers if m.strip()
    ]
    prefilter = _compile_prefilter(b"|".join(words))
    busy_extra = [rb"above exception", rb"gnored", rb"retrieved", rb"Unclosed", rb"atexit"]
    busy_pattern = _candidates_pattern(markers, busy_extra)
    signatures = tuple(user_any + builtin)
    preselect, always = _compile_preselect(signatures)
    return SignatureTable(
        signatures=signatures,
        slurm=tuple(user_slurm + slurm),
        success_markers=markers,
        prefilter=prefilter,
        preselect=preselect,
        always=always,
        prefilter_find=_finder(prefilter),
        candidates_find=_compile_candidates(markers),
        candidates_ere=_candidates_ere(markers),
        candidates_hs=_hyperscan_candidates(markers),
        # what makes an informational line matter before its level is looked at (_scan)
        busy_find=_compile_candidates(markers, busy_extra),
        # user signatures may match across a newline (the skim search works line by line)
        skim_find=(
            _compile_skim(prefilter.pattern, busy_pattern)
            if busy_pattern is not None
            and not extra_prefilter
            and not any("\n" in m or "\r" in m for m in markers)
            else None
        ),
    )


def _compile_preselect(signatures: Sequence[Signature]) -> tuple[Any, frozenset[int]]:
    try:
        re2 = importlib.import_module("re2")
    except ImportError:
        return None, frozenset()
    rset = re2.Set.SearchSet()
    always: set[int] = set()
    for i, sig in enumerate(signatures):
        pattern = sig.regex.pattern
        if sig.regex.flags & re.IGNORECASE:
            pattern = "(?i)" + pattern
        try:
            index = rset.Add(pattern)
        except Exception:  # RE2 cannot express it (lookbehind, backreference): try always
            always.add(i)
            continue
        if index != i - len(always):
            raise AssertionError("RE2 set indices out of step")  # pragma: no cover
    if len(always) == len(signatures):
        return None, frozenset()
    rset.Compile()
    # map RE2 set indices back to signature indices
    in_set = [i for i in range(len(signatures)) if i not in always]
    return _IndexedSet(rset, in_set), frozenset(always)


class _IndexedSet:
    def __init__(self, rset: Any, indices: list[int]) -> None:
        self._rset = rset
        self._indices = indices

    def Match(self, text: str) -> list[int]:  # mirrors RE2 Set API
        found = self._rset.Match(text)
        return [self._indices[i] for i in found] if found else []


def _bytes_pattern(pattern: str, ignore_case: bool) -> bytes:
    """The user's pattern for the bytes prefilter; a match-anything guard if it won't translate."""
    try:
        raw = pattern.encode("utf-8")
        re.compile(raw)
    except (re.error, UnicodeEncodeError):
        # e.g. \N{...} or str-only classes: look at every line rather than miss one
        return rb"[^\n]"
    # (?m) so ^ and $ mean the same in a whole chunk as in a single line
    return (b"(?mi:" if ignore_case else b"(?m:") + raw + b")"


# ---------------------------------------------------------------------------------------
# Findings


@dataclass(frozen=True, slots=True)
class Hit:
    """A line that matters, with its 1-based number and the signature it matched."""

    line_no: int
    text: str
    error_type: ErrorType | None = None
    signature: str | None = None
    role: str = "rec"  # exc (exception line), cont (its message), ctx, rec (error record)
    priority: int = 2  # Slurm lines only

    def to_json(self) -> list[Any]:
        return [
            self.line_no,
            self.text,
            self.error_type.value if self.error_type else None,
            self.signature,
            self.role,
            self.priority,
        ]

    @classmethod
    def from_json(cls, data: Sequence[Any]) -> Hit:
        line_no, text, typ, sig, role, prio = data
        return cls(
            int(line_no), str(text), ErrorType(typ) if typ else None, sig, str(role), int(prio)
        )


@dataclass(frozen=True, slots=True)
class FinalError:
    """The error that ended the program (so far): a traceback chain or an error record."""

    kind: str  # "traceback" | "record"
    entries: tuple[Hit, ...]

    def resolve(self) -> tuple[ErrorType | None, Hit]:
        """(type, deciding line); type None = an error record nothing recognises."""
        entries = self.entries
        # A quota or credit error anywhere in the final error decides, even when a wrapper
        # (tenacity's RetryError "raised RateLimitError", a 429) would say "retry": retrying
        # an empty account cannot succeed (design rule 5).
        for e in reversed(entries):
            if e.error_type is T.BILLING:
                return T.BILLING, e
        if self.kind == "traceback":
            exc_idx = max((i for i, e in enumerate(entries) if e.role == "exc"), default=None)
            if exc_idx is not None:
                block = entries[exc_idx:]
                for e in block:
                    if e.error_type is not None and e.error_type is not T.CODE_ERROR:
                        return e.error_type, e
                final = entries[exc_idx]
                if final.error_type is T.CODE_ERROR:
                    return T.CODE_ERROR, final
                for e in reversed(entries[:exc_idx]):
                    if e.error_type is not None and e.error_type is not T.CODE_ERROR:
                        return e.error_type, e
                for e in reversed(entries[:exc_idx]):
                    if e.error_type is T.CODE_ERROR:
                        return T.CODE_ERROR, e
                return T.CODE_ERROR, final
            # a traceback cut off before its exception line: look at what we have
        for e in reversed(entries):
            if e.error_type is not None and e.error_type is not T.CODE_ERROR:
                return e.error_type, e
        for e in reversed(entries):
            if e.error_type is T.CODE_ERROR:
                return T.CODE_ERROR, e
        if self.kind == "traceback":
            return T.CODE_ERROR, entries[-1]
        return None, entries[-1]


@dataclass(frozen=True, slots=True)
class ScanFindings:
    """What one log file says, as far as it has been read."""

    source: str
    lines: int
    success: Hit | None = None
    slurm: Hit | None = None
    final: FinalError | None = None


# Findings cross a process boundary as plain tuples (analyze's workers): pickling the
# dataclasses themselves cost twice as much, most of a small file's scan.
PackedHit = tuple[int, str, "str | None", "str | None", str, int]
PackedFindings = tuple[
    str, int, "PackedHit | None", "PackedHit | None", "tuple[str, tuple[PackedHit, ...]] | None"
]
_TYPES_BY_VALUE = {t.value: t for t in ErrorType}


def _pack_hit(hit: Hit) -> PackedHit:
    typ = hit.error_type
    return (
        hit.line_no,
        hit.text,
        typ.value if typ else None,
        hit.signature,
        hit.role,
        hit.priority,
    )


def _unpack_hit(packed: PackedHit) -> Hit:
    line_no, text, typ, signature, role, priority = packed
    return Hit(line_no, text, _TYPES_BY_VALUE[typ] if typ else None, signature, role, priority)


def pack_findings(found: ScanFindings) -> PackedFindings:
    success, slurm, final = found.success, found.slurm, found.final
    return (
        found.source,
        found.lines,
        None if success is None else _pack_hit(success),
        None if slurm is None else _pack_hit(slurm),
        None if final is None else (final.kind, tuple(map(_pack_hit, final.entries))),
    )


def unpack_findings(packed: PackedFindings) -> ScanFindings:
    source, lines, success, slurm, final = packed
    return ScanFindings(
        source,
        lines,
        None if success is None else _unpack_hit(success),
        None if slurm is None else _unpack_hit(slurm),
        None if final is None else FinalError(final[0], tuple(map(_unpack_hit, final[1]))),
    )


# ---------------------------------------------------------------------------------------
# Scanner

_SCAN, _TB, _EXC = 0, 1, 2


def _excerpt(text: str, m: re.Match[str] | None = None) -> str:
    text = text.strip()
    if len(text) <= EVIDENCE_CHARS:
        return text
    if m is None or m.end() <= EVIDENCE_CHARS - 1:
        return text[: EVIDENCE_CHARS - 1] + "…"
    start = max(0, m.start() - 100)
    return "…" + text[start : start + EVIDENCE_CHARS - 2] + "…"


def _decode(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    if "\r" in text:
        # progress bars redraw with \r: what is visible is the last segment
        parts = [p for p in text.split("\r") if p.strip()]
        text = parts[-1] if parts else ""
    return text.rstrip("\n")


class LogScanner:
    """Streaming classifier over one log file. Feed bytes in any chunking."""

    def __init__(self, table: SignatureTable, source: str) -> None:
        self.table = table
        self.source = source
        self._lines = 0
        self._partial = b""
        self._mode = _SCAN
        self._prefix = ""
        self._frames = 0
        self._cont_left = 0
        self._chain_line = -10  # line number of the last chain marker
        self._ignore_line = -10  # line number of the last "Exception ignored in"
        self._cur: list[Hit] = []  # entries of the error being built
        self._cur_kind = ""
        self._cur_ignored = False
        self._cur_group = False  # an exception group: nested tracebacks belong to it
        self._final: FinalError | None = None
        self._success: Hit | None = None
        self._slurm: Hit | None = None
        # a header that would join an exception group begun before this scanner started
        # (only ever true for a fresh scanner): its view may differ from a whole-file scan
        self._hazard = False

    # -- feeding ------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        start = 0
        if self._partial:
            nl = chunk.find(b"\n")
            if nl < 0:
                self._carry(chunk)
                return
            self._carry(chunk[:nl])
            line, self._partial = self._partial, b""
            self._lines += 1
            self._line(line, self._lines)
            start = nl + 1
        last = chunk.rfind(b"\n", start)
        if last < 0:
            self._carry(chunk[start:])
            return
        self._block(chunk, start, last + 1)
        self._carry(chunk[last + 1 :])

    def _carry(self, data: bytes) -> None:
        room = MAX_LINE_BYTES - len(self._partial)
        if room > 0 and data:
            self._partial += data[:room]

    def _block(self, buf: bytes, pos: int, end: int) -> None:
        """Complete lines in ``buf[pos:end]`` (``end`` just after a newline)."""
        find = self.table.prefilter_find or _finder(self.table.prefilter)
        skim = self.table.skim_find
        if skim is None:
            self._lines_in(buf, pos, end, find, None)
            return
        # The skim search stands in for the prefilter only over runs of lines that are all
        # at most MAX_LINE_BYTES long: a longer line is checked whatever its level.
        while pos < end:
            stop = (
                end
                if end - pos <= MAX_LINE_BYTES
                else buf.rfind(b"\n", pos, pos + MAX_LINE_BYTES) + 1
            )
            if stop > pos:
                self._lines_in(buf, pos, stop, skim, find)
                pos = stop
            else:  # a line longer than MAX_LINE_BYTES starts at pos
                stop = buf.find(b"\n", pos, end) + 1
                self._lines_in(buf, pos, stop, find, None)
                pos = stop

    def _lines_in(
        self,
        buf: bytes,
        pos: int,
        end: int,
        find: Callable[[bytes, int, int], int],
        prefilter: Callable[[bytes, int, int], int] | None,
    ) -> None:
        """Lines in ``buf[pos:end]``; ``find`` names candidate lines: the prefilter itself,
        or the skim search (then ``prefilter`` says whether a hit begins in the line)."""
        busy = self.table.busy_find
        while pos < end:
            if self._mode != _SCAN:
                nl = buf.find(b"\n", pos, end)
                self._lines += 1
                self._line(buf[pos : min(nl, pos + MAX_LINE_BYTES)], self._lines)
                pos = nl + 1
                continue
            hit = find(buf, pos, end)
            if hit < 0:
                self._lines += buf.count(b"\n", pos, end)
                return
            ls = buf.rfind(b"\n", pos, hit) + 1 or pos
            if ls < pos:
                ls = pos
            self._lines += buf.count(b"\n", pos, ls) + 1
            le = buf.find(b"\n", hit, end)
            if prefilter is not None and prefilter(buf, ls, le) < 0:
                pass  # a skim candidate without a prefilter hit: scan mode ignores it
            elif le - ls > MAX_LINE_BYTES:
                # the hit may lie past the cut: _line checks the part that is kept
                self._line(buf[ls : ls + MAX_LINE_BYTES], self._lines)
            elif not (
                # an INFO/DEBUG/WARNING line (access logs, retry notices) that _scan would
                # drop: decided on the bytes, without decoding or a Python call per check
                busy is not None
                and (head := buf[ls : min(le, ls + 120)]).isascii()
                and buf.find(b"\r", ls, le) < 0
                and _informational_ascii(head)
                and busy(buf, ls, le) < 0
            ):
                self._line_hit(buf[ls:le], self._lines)
            pos = le + 1

    # -- one line -----------------------------------------------------------------------

    def _line(self, raw: bytes, line_no: int) -> None:
        if self._mode == _SCAN and self.table.prefilter.search(raw) is None:
            return
        self._line_hit(raw, line_no)

    def _line_hit(self, raw: bytes, line_no: int) -> None:
        """A line the prefilter already matched (in scan mode), or any line in a traceback."""
        text = _decode(raw)
        if self._mode == _TB:
            self._in_traceback(text, line_no)
        elif self._mode == _EXC:
            self._after_exception(text, line_no)
        else:
            self._scan(text, line_no)

    def _strip_prefix(self, text: str) -> str:
        if self._prefix and text.startswith(self._prefix):
            return text[len(self._prefix) :]
        if self._prefix.strip() == "|" or self._cur_group:
            # exception groups nest: "  | ", "    | "
            m = re.match(r"^[ ]{0,40}\| ?", text)
            if m is not None:
                return text[m.end() :]
        return text

    def _in_traceback(self, text: str, line_no: int) -> None:
        body = self._strip_prefix(text)
        header = _TB_HEADER.search(body)
        if header is not None and not body[: header.start()].strip(" |+-"):
            self._start_traceback(text, _TB_HEADER.search(text), line_no)  # type: ignore[arg-type]
            return
        self._frames += 1
        if not body.strip() or _FRAME.match(body) or self._frames > MAX_FRAME_LINES:
            if self._frames > MAX_FRAME_LINES:
                self._mode = _SCAN
            return
        found = self.table.match(body, final=True)
        exc = _EXC_CLASS.match(body)
        if exc is not None and exc.group(1).endswith("Group"):
            self._cur_group = True
        self._add(body, line_no, "exc", found)
        self._mode = _EXC
        self._cont_left = MAX_CONTINUATION

    def _after_exception(self, text: str, line_no: int) -> None:
        body = self._strip_prefix(text)
        if not body.strip():
            self._mode = _SCAN
            return
        if (
            _TB_HEADER.search(text)
            or _CHAIN.search(text)
            or _SLURM_LINE.search(text)
            or self.table.success(text)
            or _LEVEL.search(text[:120])
            or _GLOG.match(text)
            or body.lstrip().startswith("+-")
        ):
            self._mode = _SCAN
            if self.table.prefilter.search(text.encode("utf-8", "replace")) is not None:
                self._scan(text, line_no)
            return
        found = self.table.match(body, final=True)
        self._add(body, line_no, "cont", found)
        self._cont_left -= 1
        if self._cont_left <= 0:
            self._mode = _SCAN

    def _scan(self, text: str, line_no: int) -> None:
        # substring gates before each regex: this runs for every prefilter hit
        header = _TB_HEADER.search(text) if "Traceback" in text else None
        if header is not None:
            self._start_traceback(text, header, line_no)
            return
        if "above exception" in text and _CHAIN.search(text):
            if self._cur_kind == "traceback" and self._cur and line_no - self._cur[-1].line_no <= 3:
                self._chain_line = line_no
            return
        if ("gnored" in text or "retrieved" in text or "Unclosed" in text or "atexit" in text) and (
            _IGNORED_TB.search(text)
        ):
            self._ignore_line = line_no
            return
        if (
            "slurm" in text
            or "*** " in text
            or "Killed" in text
            or text.startswith(("srun: ", "salloc: ", "sbatch: "))
        ) and _SLURM_LINE.search(text):
            found = self.table.match_slurm(text)
            if found is not None:
                sig, m = found
                if self._slurm is None or sig.priority >= self._slurm.priority:
                    self._slurm = Hit(
                        line_no, _excerpt(text, m), sig.type, sig.name, "slurm", sig.priority
                    )
                return
            # srun/slurmstepd chatter ("task 0: Exited with exit code 1") says nothing of
            # the cause; the batch shell's own errors ("python: command not found") do
            if "slurm_script: line" not in text:
                return
        if self.table.success(text):
            if self._success is None:
                self._success = Hit(line_no, _excerpt(text), None, "success", "success")
            return
        if (
            _is_informational(text)
            or _PY_WARNING.search(text[:400])
            or text.startswith("wandb:")
            or _RETRY_NOTICE.search(text[:MATCH_CHARS].lower())
        ):
            return
        record = _is_error_level(text) or _ERRORISH.search(text[:2000]) is not None
        found = self.table.match(text, final=record)
        if not record and found is None:
            return
        if (
            self._cur_kind == "record"
            and not self._cur_ignored
            and self._cur
            and self._cur[-1].line_no == line_no - 1
            and len(self._cur) < MAX_ENTRIES
        ):
            self._add(text, line_no, "rec", found)  # one multi-line record
            return
        self._new_error("record", ignored=False)
        self._add(text, line_no, "rec", found)

    def _start_traceback(self, text: str, header: re.Match[str], line_no: int) -> None:
        prefix = text[: header.start()]
        if "|" in prefix and not self._cur_kind:
            self._hazard = True
        nested = "|" in prefix and self._cur_kind == "traceback" and self._cur_group
        chained = line_no - self._chain_line <= 3 and self._cur_kind == "traceback"
        if not (nested or chained):
            ignored = line_no - self._ignore_line <= 2
            # logger.exception("...") prints the record, then the traceback: one error
            keep = (
                self._cur_kind == "record"
                and not ignored
                and self._cur
                and self._cur[-1].line_no >= line_no - 1
            )
            context = (
                [Hit(e.line_no, e.text, e.error_type, e.signature, "ctx") for e in self._cur]
                if keep
                else []
            )
            self._new_error("traceback", ignored=ignored)
            self._cur.extend(context[-MAX_ENTRIES:])
            self._cur_group = header.group(0).startswith("Exception Group")
            self._publish()
        elif header.group(0).startswith("Exception Group"):
            self._cur_group = True
        if len(prefix) <= 40 and "\r" not in prefix:
            self._prefix = (
                prefix.replace("+", "|")
                if header.group(0).startswith("Exception Group")
                else prefix
            )
        else:
            self._prefix = ""
        self._mode = _TB
        self._frames = 0

    def _new_error(self, kind: str, *, ignored: bool) -> None:
        self._cur = []
        self._cur_kind = kind
        self._cur_ignored = ignored
        self._cur_group = False

    def _add(
        self, text: str, line_no: int, role: str, found: tuple[Signature, re.Match[str]] | None
    ) -> None:
        sig, m = found if found is not None else (None, None)
        hit = Hit(
            line_no, _excerpt(text, m), sig.type if sig else None, sig.name if sig else None, role
        )
        if len(self._cur) >= MAX_ENTRIES:
            # keep the first entry (often the root cause) and the latest ones
            del self._cur[1]
        self._cur.append(hit)
        self._publish()

    def _publish(self) -> None:
        if not self._cur_ignored and self._cur:
            self._final = FinalError(self._cur_kind, tuple(self._cur))

    # -- results ------------------------------------------------------------------------

    def findings(self) -> ScanFindings:
        """Findings so far, counting an unterminated last line; more can be fed after."""
        if self._partial:
            probe = LogScanner.from_state(self.table, self.source, self.state())
            probe.feed(b"\n")
            return probe.findings()
        return ScanFindings(self.source, self._lines, self._success, self._slurm, self._final)

    def state(self) -> dict[str, Any]:
        return {
            "v": STATE_VERSION,
            "lines": self._lines,
            "partial": base64.b64encode(self._partial).decode("ascii"),
            "mode": self._mode,
            "prefix": self._prefix,
            "frames": self._frames,
            "cont_left": self._cont_left,
            "chain_line": self._chain_line,
            "ignore_line": self._ignore_line,
            "cur": [h.to_json() for h in self._cur],
            "cur_kind": self._cur_kind,
            "cur_ignored": self._cur_ignored,
            "cur_group": self._cur_group,
            "final": (
                {"kind": self._final.kind, "entries": [h.to_json() for h in self._final.entries]}
                if self._final
                else None
            ),
            "success": self._success.to_json() if self._success else None,
            "slurm": self._slurm.to_json() if self._slurm else None,
        }

    @classmethod
    def from_state(cls, table: SignatureTable, source: str, state: dict[str, Any]) -> LogScanner:
        scanner = cls(table, source)
        try:
            if state.get("v") != STATE_VERSION:
                raise ValueError(f"version {state.get('v')!r}")
            scanner._lines = int(state["lines"])
            scanner._partial = base64.b64decode(state["partial"])[:MAX_LINE_BYTES]
            scanner._mode = int(state["mode"])
            if scanner._mode not in (_SCAN, _TB, _EXC):
                raise ValueError("mode")
            scanner._prefix = str(state["prefix"])
            scanner._frames = int(state["frames"])
            scanner._cont_left = int(state["cont_left"])
            scanner._chain_line = int(state["chain_line"])
            scanner._ignore_line = int(state["ignore_line"])
            scanner._cur = [Hit.from_json(h) for h in state["cur"]]
            scanner._cur_kind = str(state["cur_kind"])
            scanner._cur_ignored = bool(state["cur_ignored"])
            scanner._cur_group = bool(state["cur_group"])
            final = state["final"]
            scanner._final = (
                FinalError(str(final["kind"]), tuple(Hit.from_json(h) for h in final["entries"]))
                if final
                else None
            )
            scanner._success = Hit.from_json(state["success"]) if state["success"] else None
            scanner._slurm = Hit.from_json(state["slurm"]) if state["slurm"] else None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ScanStateError(
                f"cannot resume scanning {source}: bad saved state ({exc})"
            ) from exc
        return scanner


# Whole-file fast path (see _scan_whole).
FAST_MIN_BYTES = 16 << 20
TAIL_WINDOW = 1 << 20
MAX_TAIL_WINDOW = 64 << 20
# Lines after a "Traceback" within which the scanner may still be inside that traceback.
TB_REACH = MAX_FRAME_LINES + MAX_CONTINUATION + 16
# Quiet lines (``_is_quiet``) before the tail: the joining rules look back at most 3 lines.
QUIET_LINES = 4
MAX_HEAD_CANDIDATES = 20_000
# Hyperscan, else GNU grep, finds the head's candidate lines when installed (tests turn
# them off to compare)
USE_HYPERSCAN = True
USE_GREP = True
# Hyperscan's reads of a head: 1 MB stays in cache between the read and the search (4 MB
# chunks measured ~0.02 s slower per 200 MB) and keeps a worker's memory small
SPOT_CHUNK = 1 << 20
_PROBE_BYTES = 256 << 10


def _is_quiet(table: SignatureTable, raw: bytes) -> bool:
    """Whether this line, read in scan mode, leaves the error state alone whatever it was
    (no prefilter hit, or an informational/retry/success line): the state the joining
    rules look at (last entry, chain and "ignored" markers) then ages by one line."""
    if b"above exception" in raw:  # a chain marker only counts after a traceback
        return False
    probe = LogScanner(table, "")
    probe.feed(raw + b"\n")
    return probe._mode == _SCAN and not probe._cur and probe._ignore_line < 0


def _quiet_start(fh: Any, table: SignatureTable, start: int) -> int | None:
    """The first line start after ``start`` that follows QUIET_LINES lines without a
    prefilter hit and lies more than TB_REACH lines after any "Traceback": the forward
    scanner is then in plain scan mode with no error it could extend. None if not found."""
    fh.seek(start)
    buf = fh.read(_PROBE_BYTES)
    pos = buf.find(b"\n") + 1
    if pos == 0:
        return None
    quiet = 0
    while quiet < QUIET_LINES:
        le = buf.find(b"\n", pos)
        if le < 0:
            return None
        quiet = quiet + 1 if _is_quiet(table, buf[pos : min(le, pos + MAX_LINE_BYTES)]) else 0
        pos = le + 1
    q: int = start + pos
    # walk back TB_REACH lines (whole blocks: conservative) looking for a traceback header
    end, lines = q, 0
    while end > 0 and lines <= TB_REACH:
        block_start = max(0, end - (1 << 20))
        fh.seek(block_start)
        block = fh.read(min(q, end + 16) - block_start)  # overlap: a word across blocks
        if b"Traceback" in block:
            return None
        lines += block.count(b"\n", 0, end - block_start)
        end = block_start
    return q


def _tail_scan(fh: Any, table: SignatureTable, source: str, q: int, base: int) -> LogScanner:
    scanner = LogScanner(table, source)
    scanner._lines = base
    fh.seek(q)
    while chunk := fh.read(READ_CHUNK):
        scanner.feed(chunk)
    return scanner


class _Picker:
    """Collects the candidate lines of a big file's head, in file order."""

    def __init__(self, find: Callable[[bytes, int, int], int]) -> None:
        self.find = find
        self.out: list[tuple[int, bytes]] = []
        self.last_tb = -TB_REACH - 1

    def take(self, raw: bytes, line_no: int) -> bool:
        """False when the fast path cannot be exact (a candidate that may sit inside a
        traceback, or too many of them)."""
        if self.find(raw, 0, len(raw)) < 0:
            return True
        if line_no - self.last_tb <= TB_REACH or len(self.out) >= MAX_HEAD_CANDIDATES:
            return False
        if b"Traceback" in raw:
            self.last_tb = line_no
        self.out.append((line_no, raw))
        return True


def _head_candidates(
    fh: Any,
    find: Callable[[bytes, int, int], int],
    q: int,
    chunk_size: int,
    take: Callable[[int, int, bytes], bool],
    *,
    count_lines: bool,
) -> int | None:
    """Calls ``take(offset, line_no, first MAX_LINE_BYTES)`` for each line in ``[0, q)``
    where ``find`` sees a candidate, in file order; ``line_no`` means something only when
    ``count_lines`` (the Hyperscan path counts elsewhere, and only where it must: counting
    costs more than its search). Returns the newlines in ``[0, q)`` (0 when not counting),
    or None when ``take`` refused a line or the file changed under the read."""
    lines = 0  # newlines before ``counted`` (in this chunk) when counting
    carry: tuple[int, bytes] | None = None  # (offset, start) of a line begun in an earlier chunk
    fh.seek(0)
    pos_abs = 0
    while pos_abs < q:
        chunk = fh.read(min(chunk_size, q - pos_abs))
        if not chunk:
            return None  # the file shrank under us
        base = pos_abs
        pos_abs += len(chunk)
        start = 0
        if carry is not None:
            nl = chunk.find(b"\n")
            if nl < 0:
                carry = (carry[0], (carry[1] + chunk)[:MAX_LINE_BYTES])
                continue
            raw = (carry[1] + chunk[:nl])[:MAX_LINE_BYTES]
            if find(raw, 0, len(raw)) >= 0 and not take(carry[0], lines + 1, raw):
                return None
            if count_lines:
                lines += 1
            start, carry = nl + 1, None
        last = chunk.rfind(b"\n", start)
        if last < 0:
            if start < len(chunk):
                carry = (base + start, chunk[start : start + MAX_LINE_BYTES])
            continue
        counted, pos = start, start
        while pos <= last:
            hit = find(chunk, pos, last + 1)
            if hit < 0:
                break
            ls = max(chunk.rfind(b"\n", pos, hit) + 1, pos)
            le = chunk.find(b"\n", hit, last + 1)
            if count_lines:
                lines += chunk.count(b"\n", counted, ls)
                counted = ls
            if not take(base + ls, lines + 1, chunk[ls : min(le, ls + MAX_LINE_BYTES)]):
                return None
            pos = le + 1
        if count_lines:
            lines += chunk.count(b"\n", counted, last + 1)
        if last + 1 < len(chunk):
            carry = (base + last + 1, chunk[last + 1 : last + 1 + MAX_LINE_BYTES])
    return None if carry is not None else lines  # q is a line start unless the file changed


def _head_lines(
    fh: Any, table: SignatureTable, q: int
) -> tuple[int, list[tuple[int, bytes]]] | None:
    """(newlines in ``[0, q)``, candidate lines there as (line_no, first MAX_LINE_BYTES)),
    or None when a candidate may sit inside a traceback or there are too many."""
    find = table.candidates_find
    assert find is not None
    picker = _Picker(find)
    lines = _head_candidates(
        fh, find, q, READ_CHUNK, lambda _offset, n, raw: picker.take(raw, n), count_lines=True
    )
    return None if lines is None else (lines, picker.out)


# GNU grep over a big file's head (``_grep_head_lines``): its address space is capped (a
# file of one endless line would make grep buffer all of it) and its run time bounded.
# grep needs ~10 MB of address space; 32 MB lets it hold lines of ~20 MB, and a longer one
# makes it fail ("memory exhausted", status 2): the RE2 path then reads the head instead
GREP_MEMORY_LIMIT = 32 << 20
GREP_TIMEOUT_S = 30.0
GREP_SECONDS_PER_GB = 60.0
_TOOLS: dict[str, str | None] = {}


def _tool(name: str) -> str | None:
    if name not in _TOOLS:
        _TOOLS[name] = shutil.which(name)
    return _TOOLS[name]


def _limit_memory() -> None:  # pragma: no cover - runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (GREP_MEMORY_LIMIT, GREP_MEMORY_LIMIT))


def _tool_env() -> dict[str, str]:
    return {"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def _fd_source(fh: Any, path: str) -> tuple[int, str]:
    """The file already open, not its name, for a helper tool: the same inode even if the
    log is rotated meanwhile (opening /dev/fd/N gives the tool its own offset)."""
    fd = fh.fileno()
    return fd, (f"/dev/fd/{fd}" if os.path.exists(f"/dev/fd/{fd}") else path)


def _tool_timeout(size: int) -> float:
    return GREP_TIMEOUT_S + GREP_SECONDS_PER_GB * size / 2**30


def _start_wc(fh: Any, path: str) -> subprocess.Popen[bytes] | None:
    """``wc -lc`` over the open file, running while this process reads the head."""
    wc = _tool("wc")
    if wc is None:
        return None
    fd, src = _fd_source(fh, path)
    try:
        return subprocess.Popen(
            [wc, "-lc", "--", src],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=_tool_env(),
            pass_fds=(fd,),
        )
    except OSError:
        return None


def _wc_newlines(counter: subprocess.Popen[bytes], size: int) -> int | None:
    """The newlines ``_start_wc`` counted; None if it failed or the file changed size."""
    try:
        counted, _ = counter.communicate(timeout=_tool_timeout(size))
    except subprocess.TimeoutExpired:
        counter.kill()
        counter.wait()
        return None
    fields = counted.split()
    if counter.returncode != 0 or len(fields) < 2 or int(fields[1]) != size:
        return None
    return int(fields[0])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def _newlines_between(fh: Any, start: int, end: int) -> int | None:
    """Newlines in ``[start, end)`` of the open file; None if it ends before ``end``."""
    count = 0
    fh.seek(start)
    pos = start
    while pos < end:
        chunk = fh.read(min(READ_CHUNK, end - pos))
        if not chunk:
            return None
        count += chunk.count(b"\n")
        pos += len(chunk)
    return count


def _head_newlines(fh: Any, q: int, size: int, total: int) -> int | None:
    """Newlines in ``[0, q)`` given ``total`` in the whole file: counts only the tail."""
    tail = _newlines_between(fh, q, size)
    return None if tail is None else total - tail


def _hyperscan_head_lines(
    fh: Any, table: SignatureTable, q: int, size: int, path: str
) -> tuple[int, list[tuple[int, bytes]]] | Literal[False] | None:
    """``_head_lines`` with Hyperscan finding the candidate lines (~0.45 ns/byte against GNU
    grep's ~1.5 and RE2's ~2.5) and ``wc -l`` counting the newlines; the newlines before a
    candidate are counted only when there is one (rare in a head). Every line Hyperscan
    reports is checked again with the RE2 finder (``_Picker``), so the candidates are
    exactly those of ``_head_lines``. False: Hyperscan or wc is missing or failed."""
    find = table.candidates_hs.get() if table.candidates_hs is not None else None
    if find is None or table.candidates_find is None:
        return False
    counter = _start_wc(fh, path)
    if counter is None:
        return False
    spots: list[tuple[int, bytes]] = []  # (offset, first MAX_LINE_BYTES): counted below

    def keep(offset: int, _line_no: int, raw: bytes) -> bool:
        spots.append((offset, raw))
        return len(spots) <= 2 * MAX_HEAD_CANDIDATES  # more: the forward scan is as fast

    try:
        found = _head_candidates(fh, find, q, SPOT_CHUNK, keep, count_lines=False)
    except _HyperscanFailed:
        _stop(counter)
        return False
    except BaseException:
        _stop(counter)
        raise
    if found is None:
        _stop(counter)
        return None
    total = _wc_newlines(counter, size)
    if total is None:
        return False
    picker = _Picker(table.candidates_find)
    lines, pos = 0, 0  # newlines in [0, pos)
    for offset, raw in spots:
        more = _newlines_between(fh, pos, offset)
        if more is None:
            return False
        lines, pos = lines + more, offset
        if not picker.take(raw, lines + 1):
            return None
    head = _head_newlines(fh, q, size, total)
    return False if head is None else (head, picker.out)


def _grep_head_lines(
    fh: Any, table: SignatureTable, q: int, size: int, path: str
) -> tuple[int, list[tuple[int, bytes]]] | Literal[False] | None:
    """``_head_lines`` with GNU grep finding the candidate lines (about 2x faster than the
    RE2 finder over hundreds of MB) and ``wc -l`` counting the newlines (SIMD; Python's
    ``bytes.count`` is ~0.6 ns/byte). Every line grep reports is checked again with the
    RE2 finder on the bytes the scanner would see, so the candidates are exactly those of
    ``_head_lines``. False: grep or wc is missing or failed, use ``_head_lines``."""
    ere = table.candidates_ere
    grep = _tool("grep")
    if ere is None or grep is None or table.candidates_find is None:
        return False
    fd, src = _fd_source(fh, path)
    picker = _Picker(table.candidates_find)
    counter = _start_wc(fh, path)
    if counter is None:
        return False
    try:
        proc = subprocess.Popen(
            [grep, "-a", "-n", "-b", "-E", "-e", ere, "--", src],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=_tool_env(),
            pass_fds=(fd,),
            preexec_fn=_limit_memory,
        )
    except OSError:
        _stop(counter)
        return False
    killer = threading.Timer(_tool_timeout(size), proc.kill)
    killer.start()
    stopped = ok = False
    try:
        assert proc.stdout is not None
        out = proc.stdout
        while True:
            rec = out.readline(MAX_LINE_BYTES + 64)
            if not rec:
                break
            if not rec.endswith(b"\n"):
                # a long line: keep its start, drop the rest up to the newline
                while (more := out.readline(1 << 20)) and not more.endswith(b"\n"):
                    pass
            line_text, off_text, raw = rec.rstrip(b"\n").split(b":", 2)
            if int(off_text) >= q:
                stopped = True  # grep's output is in file order: the rest is the tail
                break
            if not picker.take(raw[:MAX_LINE_BYTES], int(line_text)):
                return None
        ok = True
    except ValueError:
        return False  # not grep's "N:OFFSET:line" output
    finally:
        killer.cancel()
        if not ok or stopped:
            proc.kill()
        rc = proc.wait()
        total = _wc_newlines(counter, size)
    if not stopped and rc not in (0, 1):
        return False  # killed by the timeout, out of memory, unreadable file
    if total is None:
        return False  # wc failed, or the file changed meanwhile
    head = _head_newlines(fh, q, size, total)
    return False if head is None else (head, picker.out)


def _scan_whole(
    path: Path | str,
    table: SignatureTable,
    *,
    window: int = TAIL_WINDOW,
    max_window: int = MAX_TAIL_WINDOW,
) -> tuple[ScanFindings, int, dict[str, Any]] | None:
    """``scan_path`` for a whole big file without running the scanner over all of it.

    The findings are (a) the first success marker, (b) the last strongest Slurm line and
    (c) the error that ended the program. (a) and (b) depend only on the line's text and
    on not being inside a traceback, so a cheap search for candidate lines over the file
    plus the real scanner on each candidate gives them exactly. (c) is found by the real
    scanner over a tail window starting where the scanner is provably at rest (plain scan
    mode, no error it could extend: ``_quiet_start``); from there on a fresh scanner makes
    the same decisions as one that read the whole file, so if it finds a final error that
    is the file's final error. Otherwise the window doubles. None: use the forward scan.
    """
    if table.candidates_find is None:
        return None
    source = str(path)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        while True:
            start = size - window
            if start <= 0 or window > max_window:
                return None
            q = _quiet_start(fh, table, start)
            if q is not None:
                probe = _tail_scan(fh, table, source, q, 0)
                if probe._final is not None and not probe._hazard:
                    break
            window *= 2
        head = _hyperscan_head_lines(fh, table, q, size, source) if USE_HYPERSCAN else False
        if head is False:
            head = _grep_head_lines(fh, table, q, size, source) if USE_GREP else False
        if head is False:
            head = _head_lines(fh, table, q)
        if head is None:
            return None
        base, candidates = head
        tail = _tail_scan(fh, table, source, q, base)
        if tail._final is None or tail._hazard:
            return None  # the file changed between the two reads
        end = fh.tell()
    success: Hit | None = None
    slurm: Hit | None = None
    for line_no, raw in candidates:
        probe = LogScanner(table, source)
        probe._lines = line_no - 1
        probe.feed(raw + b"\n")
        if success is None and probe._success is not None:
            success = probe._success
        s = probe._slurm
        if s is not None and (slurm is None or s.priority >= slurm.priority):
            slurm = s
    if success is not None:  # the head comes first
        tail._success = success
    s = tail._slurm
    if slurm is not None and (s is None or s.priority < slurm.priority):
        tail._slurm = slurm
    return tail.findings(), end, tail.state()


def scan_findings(path: Path | str, table: SignatureTable) -> ScanFindings:
    """``scan_path(path, table)[0]``: the findings of a whole file, for callers that need
    no resumable state (``analyze``). A small file is read with one ``read`` call, no
    buffered reader and no state built: most of a tree's files are a few KB, where those
    fixed costs were a third of the time."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return scan_path(path, table)[0]  # the same errors as scan_path
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size >= FAST_MIN_BYTES:
            data = None
        else:
            # one byte more than the size: a file that grew meanwhile is read the usual way
            data = os.read(fd, st.st_size + 1)
    except OSError:
        data = None
    finally:
        os.close(fd)
    if data is None or len(data) != st.st_size:
        return scan_path(path, table)[0]
    scanner = LogScanner(table, str(path))
    scanner.feed(data)
    return scanner.findings()


def scan_path(
    path: Path | str,
    table: SignatureTable,
    *,
    offset: int = 0,
    state: dict[str, Any] | None = None,
) -> tuple[ScanFindings, int, dict[str, Any]]:
    """Scan ``path`` from ``offset`` (resuming ``state``); returns (findings, new offset, state)."""
    source = str(path)
    try:
        if not offset and not state and os.path.getsize(path) >= FAST_MIN_BYTES:
            fast = _scan_whole(path, table)
            if fast is not None:
                return fast
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except OSError as exc:
        if not isinstance(exc, IsADirectoryError):
            raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    scanner = LogScanner.from_state(table, source, state) if state else LogScanner(table, source)
    pos = offset
    try:
        with open(path, "rb") as fh:
            if offset:
                fh.seek(offset)
            while True:
                chunk = fh.read(READ_CHUNK)
                if not chunk:
                    break
                scanner.feed(chunk)
                pos += len(chunk)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{path}: is a directory") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return scanner.findings(), pos, scanner.state()


# ---------------------------------------------------------------------------------------
# Decision

_STATE_TYPES: dict[str, ErrorType] = {
    "TIMEOUT": T.TIME_LIMIT,
    "DEADLINE": T.TIME_LIMIT,
    "OUT_OF_MEMORY": T.OOM,
    "NODE_FAIL": T.NODE_FAIL,
    "BOOT_FAIL": T.NODE_FAIL,
    "PREEMPTED": T.PREEMPTED,
    "CANCELLED": T.CANCELLED,
    "REVOKED": T.CANCELLED,
}


def _sacct_evidence(row: SacctRow) -> Evidence:
    code = "" if row.exit_code is None else str(row.exit_code)
    sig = "" if row.exit_signal is None else str(row.exit_signal)
    text = f"State={row.state_raw or row.state} ExitCode={code}:{sig}"
    return Evidence(text=text, line_no=None, source="sacct")


def _evidence(hit: Hit, source: str) -> Evidence:
    return Evidence(text=hit.text, line_no=hit.line_no, source=source)


def _is_hung(row: SacctRow | None, settings: ClassifySettings) -> bool:
    if row is None or row.elapsed_s is None or row.total_cpu_s is None:
        return False
    if row.elapsed_s < settings.hung_min_elapsed_s:
        return False
    cpus = 1
    for name in ("AllocCPUS", "NCPUS"):
        value = row.extra.get(name, "")
        if value.isdigit() and int(value) > 0:
            cpus = int(value)
            break
    return row.total_cpu_s < settings.hung_cpu_fraction * row.elapsed_s * cpus


def decide(
    findings: Sequence[ScanFindings],
    sacct: SacctRow | None,
    settings: ClassifySettings,
    *,
    retryable_types: frozenset[ErrorType] = RETRYABLE_BY_DEFAULT,
    active: bool = False,
) -> Verdict:
    """The verdict for one task from its logs (``.err`` then ``.out``) and its sacct row."""

    def failure(typ: ErrorType, evidence: Evidence | None) -> Verdict:
        hung = typ is T.TIME_LIMIT and _is_hung(sacct, settings)
        return Verdict(
            outcome=Outcome.FAILURE,
            error_type=typ,
            retryable=typ in retryable_types and not hung,
            evidence=evidence,
            hung=hung,
        )

    if active or (sacct is not None and sacct.state in ACTIVE_STATES):
        return Verdict(outcome=Outcome.RUNNING)

    for f in findings:
        if f.success is not None:
            return Verdict(outcome=Outcome.SUCCESS, evidence=_evidence(f.success, f.source))

    # Slurm's own verdict
    strong: tuple[Hit, str] | None = None
    weak: tuple[Hit, str] | None = None
    for f in findings:
        s = f.slurm
        if s is None:
            continue
        if s.priority >= 1 and (strong is None or s.priority > strong[0].priority):
            strong = (s, f.source)
        elif s.priority == 0 and weak is None:
            weak = (s, f.source)
    state_type = _STATE_TYPES.get(sacct.state) if sacct is not None else None
    if state_type is not None:
        assert sacct is not None
        if strong is not None and strong[0].error_type is state_type:
            return failure(state_type, _evidence(*strong))
        if state_type is T.CANCELLED and strong is not None and strong[0].error_type is not None:
            return failure(strong[0].error_type, _evidence(*strong))
        if weak is not None and weak[0].error_type is state_type:
            return failure(state_type, _evidence(*weak))
        return failure(state_type, _sacct_evidence(sacct))
    if strong is not None and strong[0].error_type is not None:
        return failure(strong[0].error_type, _evidence(*strong))

    # The error that ended the program: a traceback beats an error record, a recognised
    # type beats an unrecognised one, the .err (first) beats the .out.
    best: tuple[tuple[int, int], ErrorType | None, Hit, str] | None = None
    for f in findings:
        if f.final is None:
            continue
        typ, hit = f.final.resolve()
        rank = (int(f.final.kind == "traceback"), int(typ is not None))
        if best is None or rank > best[0]:
            best = (rank, typ, hit, f.source)
    if best is not None and best[1] is not None:
        return failure(best[1], _evidence(best[2], best[3]))
    if weak is not None and weak[0].error_type is not None:
        return failure(weak[0].error_type, _evidence(*weak))

    if sacct is None:
        return Verdict(outcome=Outcome.UNKNOWN)
    if sacct.state == "COMPLETED" and not sacct.exit_code:
        return Verdict(outcome=Outcome.SUCCESS, evidence=_sacct_evidence(sacct))
    if best is not None:
        return failure(T.UNKNOWN, _evidence(best[2], best[3]))
    return failure(T.UNKNOWN, _sacct_evidence(sacct))


# ---------------------------------------------------------------------------------------
# The classify command


def evidence_string(evidence: Evidence | None) -> str | None:
    """``"<line_no>: <text>"``, ``"sacct: <text>"``, or None."""
    if evidence is None:
        return None
    if evidence.line_no is None:
        return f"{evidence.source}: {evidence.text}"
    return f"{evidence.line_no}: {evidence.text}"


@dataclass(frozen=True, slots=True)
class FileVerdict:
    path: str
    verdict: Verdict | None
    error: str | None = None  # the file could not be read

    def to_json(self) -> dict[str, Any]:
        v = self.verdict
        out: dict[str, Any] = {
            "path": self.path,
            "outcome": (v.outcome if v else Outcome.UNKNOWN).value,
            "error_type": v.error_type.value if v and v.error_type else None,
            "retryable": bool(v and v.retryable),
            "evidence": evidence_string(v.evidence) if v else None,
        }
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(frozen=True, slots=True)
class ClassifyResult:
    files: tuple[FileVerdict, ...]

    @property
    def exit_code(self) -> int:
        return EXIT_FAILURE if any(f.error for f in self.files) else EXIT_OK

    def to_json(self) -> list[dict[str, Any]]:
        return [f.to_json() for f in self.files]

    def render_text(self) -> str:
        lines: list[str] = []
        for f in self.files:
            if f.error is not None:
                lines.append(f"{f.path}: error: {f.error}")
                continue
            v = f.verdict
            assert v is not None
            head = v.outcome.value
            if v.error_type is not None:
                head += f" {v.error_type.value}"
                head += " (retryable)" if v.retryable else " (not retryable)"
                if v.hung:
                    head += " hung"
            lines.append(f"{f.path}: {head}")
            ev = evidence_string(v.evidence)
            if ev is not None and v.outcome is Outcome.FAILURE:
                lines.append(f"    {ev}")
        return "\n".join(lines)


def classify_files(paths: Iterable[Path | str], settings: Settings) -> ClassifyResult:
    """Classify each file on its own (no sacct). Unreadable files are reported, not fatal,
    unless no file at all could be read."""
    table = build_table(settings.classify)
    retryable = settings.resubmit.retryable_types
    out: list[FileVerdict] = []
    for path in paths:
        try:
            found, _pos, _state = scan_path(path, table)
        except InputError as exc:
            out.append(FileVerdict(str(path), None, str(exc)))
            continue
        out.append(
            FileVerdict(
                str(path), decide([found], None, settings.classify, retryable_types=retryable)
            )
        )
    if out and all(f.error for f in out):
        raise InputError("; ".join(f.error or "" for f in out))
    return ClassifyResult(tuple(out))


__all__ = [
    "ClassifyResult",
    "FileVerdict",
    "FinalError",
    "Hit",
    "LogScanner",
    "ScanFindings",
    "ScanStateError",
    "Signature",
    "SignatureTable",
    "build_table",
    "classify_files",
    "decide",
    "evidence_string",
    "scan_findings",
    "scan_path",
]
