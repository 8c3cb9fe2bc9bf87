"""Plain data shared between modules: failure types, verdicts, task keys, Slurm rows.

Kept free of I/O and of heavy imports so every module (and ``--help``) can use it
cheaply.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class ErrorType(str, enum.Enum):
    RATE_LIMIT = "rate_limit"
    NETWORK = "network"
    EMPTY_RESPONSE = "empty_response"
    NODE_FAIL = "node_fail"
    PREEMPTED = "preempted"
    JSON_PARSE = "json_parse"
    TIME_LIMIT = "time_limit"
    OOM = "oom"
    BILLING = "billing"
    CANCELLED = "cancelled"
    CODE_ERROR = "code_error"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


class Outcome(str, enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    RUNNING = "running"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


# The design's "resubmitted by default" column.
RETRYABLE_BY_DEFAULT: frozenset[ErrorType] = frozenset(
    {
        ErrorType.RATE_LIMIT,
        ErrorType.NETWORK,
        ErrorType.EMPTY_RESPONSE,
        ErrorType.NODE_FAIL,
        ErrorType.PREEMPTED,
    }
)
# Retryable only when the user enables them.
RETRYABLE_OPT_IN: frozenset[ErrorType] = frozenset(
    {ErrorType.JSON_PARSE, ErrorType.TIME_LIMIT, ErrorType.OOM}
)
# Never resubmitted, whatever the settings say.
NEVER_RETRYABLE: frozenset[ErrorType] = frozenset(
    {ErrorType.BILLING, ErrorType.CANCELLED, ErrorType.CODE_ERROR, ErrorType.UNKNOWN}
)


@dataclass(frozen=True, slots=True)
class Evidence:
    """The line that decided a verdict. ``line_no`` is 1-based; None for sacct evidence."""

    text: str
    line_no: int | None
    source: str  # a log path, or "sacct"

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "line_no": self.line_no, "source": self.source}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Evidence:
        return cls(text=str(data["text"]), line_no=data.get("line_no"), source=str(data["source"]))

    def __str__(self) -> str:
        where = f"{self.source}:{self.line_no}" if self.line_no is not None else self.source
        return f"{where}: {self.text}"


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    error_type: ErrorType | None = None
    retryable: bool = False
    evidence: Evidence | None = None
    # time_limit with ~zero CPU time over a long run: a hang, never retried.
    hung: bool = False


@dataclass(frozen=True, slots=True, order=True)
class TaskKey:
    """One schedulable unit: a plain job, or one task of an array job.

    ``job_id`` is the array's master id for array tasks (the number in ``123_4``).
    """

    job_id: str
    array_task: int | None = None

    def __str__(self) -> str:
        return self.job_id if self.array_task is None else f"{self.job_id}_{self.array_task}"

    @classmethod
    def parse(cls, text: str) -> TaskKey:
        """Parse ``123`` or ``123_4``. Raises ValueError on anything else."""
        head, sep, tail = text.strip().partition("_")
        if not head.isdigit() or (sep and not tail.isdigit()):
            raise ValueError(f"not a job id: {text!r}")
        return cls(head, int(tail) if sep else None)


@dataclass(frozen=True, slots=True)
class SacctRow:
    """One ``sacct -X --parsable2`` row (allocation level), typed."""

    job_id: str  # JobID as printed: "123", "123_4"
    job_id_raw: str  # JobIDRaw: the task's own numeric id
    key: TaskKey
    job_name: str
    user: str
    state: str  # first word, upper case: "CANCELLED" for "CANCELLED by 0"
    state_raw: str
    exit_code: int | None
    exit_signal: int | None
    submit: datetime | None
    start: datetime | None
    end: datetime | None
    elapsed_s: int | None
    total_cpu_s: float | None
    timelimit_s: int | None
    work_dir: str
    submit_line: str
    comment: str
    reason: str
    restarts: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


@dataclass(frozen=True, slots=True)
class SqueueRow:
    key: TaskKey
    job_id_raw: str
    state: str  # PENDING, RUNNING, COMPLETING, ...
    job_name: str
    user: str
    # squeue %k; the resubmitter finds its own submissions by their --comment tag
    comment: str = ""


# Slurm states after which a job will not run again on its own.
FINISHED_STATES: frozenset[str] = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "PREEMPTED",
        "CANCELLED",
        "BOOT_FAIL",
        "DEADLINE",
        "REVOKED",
    }
)
ACTIVE_STATES: frozenset[str] = frozenset(
    {
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "RESIZING",
        "SUSPENDED",
        "COMPLETING",
        "CONFIGURING",
        "STAGE_OUT",
        "SIGNALING",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "SPECIAL_EXIT",
        "STOPPED",
        "RESV_DEL_HOLD",
    }
)


# Slurm's MaxArraySize cannot exceed 4000001 (slurm.conf(5)).
MAX_ARRAY_TASKS = 4_000_001


def compress_ranges(indices: list[int] | set[int] | frozenset[int]) -> str:
    """``[38..47, 49]`` -> ``"38-47,49"`` (sorted, duplicates dropped)."""
    ordered = sorted(set(indices))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def expand_ranges(text: str) -> list[int]:
    """Inverse of compress_ranges; accepts ``1-3,7`` and ``1-9:2``; ignores a ``%N`` throttle."""
    body = text.split("%", 1)[0].strip().strip("[]")
    out: list[int] = []
    for part in body.split(","):
        part = part.strip()
        if not part:
            continue
        step = 1
        if ":" in part:
            part, step_text = part.split(":", 1)
            step = int(step_text)
            if step <= 0:
                raise ValueError(f"bad array step in {text!r}")
        if "-" in part:
            lo_text, hi_text = part.split("-", 1)
            lo, hi = int(lo_text), int(hi_text)
            if hi < lo:
                raise ValueError(f"bad array range in {text!r}")
            # beyond Slurm's largest MaxArraySize it is garbage, and would exhaust memory
            if len(out) + (hi - lo) // step >= MAX_ARRAY_TASKS:
                raise ValueError(f"array range larger than Slurm allows in {text!r}")
            out.extend(range(lo, hi + 1, step))
        else:
            out.append(int(part))
    return out
