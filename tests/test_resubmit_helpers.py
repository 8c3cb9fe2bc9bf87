"""Shared builders for the resubmission tests (records shaped like the daemon writes them)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from daemon.ledger import Ledger
from daemon.records import JobRecord
from daemon.settings import Settings

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
USER = "alice"


def iso(dt: datetime) -> str:
    return dt.isoformat(timespec="seconds")


def settings(**resubmit: Any) -> Settings:
    rs: dict[str, Any] = {"enabled": True, "jitter_fraction": 0.0}
    rs.update(resubmit)
    return Settings(resubmit=rs, slurm={"user": USER})  # type: ignore[arg-type]


def failed(
    key: str,
    error_type: str = "rate_limit",
    *,
    work_dir: str = "/w",
    submit_line: str = "sbatch --array=0-9%2 --partition=gpu run.sh",
    attempt: int = 1,
    user: str = USER,
    minutes_ago: float = 5,
    **extra: Any,
) -> JobRecord:
    job_id, _, task = key.partition("_")
    rec = JobRecord(
        key=key,
        job_id=job_id,
        array_task=int(task) if task else None,
        job_name="ttc",
        user=user,
        state="FAILED",
        outcome="failure",
        error_type=error_type,
        retryable=error_type
        in {"rate_limit", "network", "empty_response", "node_fail", "preempted"},
        work_dir=work_dir,
        submit_line=submit_line,
        attempt=attempt,
        finished_at=iso(NOW - timedelta(minutes=minutes_ago)),
        classified_at=iso(NOW - timedelta(minutes=minutes_ago)),
        evidence={"text": f"{error_type} evidence", "line_no": 3, "source": "x.err"},
    )
    for name, value in extra.items():
        setattr(rec, name, value)
    return rec


def ledger_of(*records: JobRecord) -> Ledger:
    led = Ledger.empty(NOW)
    for r in records:
        led.jobs[r.key] = r
    led.dirty = False
    return led
