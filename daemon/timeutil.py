"""Timestamps as the ledger stores them: ISO 8601, UTC, whole seconds."""

from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(dt: datetime) -> str:
    """ISO 8601 UTC with seconds; a naive time is taken as UTC."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="seconds")


def iso_or_none(dt: datetime | None) -> str | None:
    return iso(dt) if dt is not None else None


def parse_iso(text: str | None) -> datetime | None:
    """Lenient: a malformed or missing timestamp is None, never an exception."""
    if not text:
        return None
    try:
        dt = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)
