"""Slack: building messages into the ledger's outbox, and delivering them.

``enqueue`` is pure ledger work (no I/O): it turns new failures into at most one digest
per tick plus a few immediate alerts, each with a deterministic ``dedup_key`` so that
re-running it after a crash never creates a second message. ``deliver`` is the only
part that talks to Slack, within a time budget so a tick never stalls.

Delivery guarantees (the outbox protocol)
-----------------------------------------
Before each HTTP call the message is marked ``sending`` and the ledger is saved; after
Slack accepts it, it is marked ``sent`` (with its ``ts``) and saved again. A message
found in ``sending`` (the daemon died in between, or a send timed out so we do not
know whether Slack got it) is resolved before anything is resent:

* **bot mode** — exactly once: ``conversations.history`` of the channel since the
  message's creation is searched for our metadata (``event_type=slurm_triage``,
  ``event_payload.dedup_key``); found → recorded as sent, not found → sent again.
  This needs the channel's id (``C…``); a ``#name`` is resolved from an earlier
  successful post, and when it cannot be, the message is resent (at-least-once).
* **webhook mode** — at-least-once: an incoming webhook cannot be queried, so a
  message left in ``sending`` is resent. A duplicate is possible only if the process
  dies (or the request times out) in the window between Slack accepting the request
  and the ``sent`` save — a few milliseconds of a normal run. We chose resend over
  drop because a lost billing alert costs more than a repeated digest.

Retries: 429 honours ``Retry-After`` (stored as ``next_attempt_at``; we never sleep
past the budget), 5xx and connection errors back off exponentially, permanent errors
(bad token, unknown channel, bot not in channel, revoked webhook) mark the message
``dead`` with the reason, which ``slurm-triage status`` shows. A configuration error
kills every pending message to that destination at once rather than hammering Slack
with a request per message per tick. slack-sdk's own retry handlers are disabled: we
retry through the outbox, where attempts survive restarts and respect the budget.

At most one message per ``slack.min_interval_s`` (default 1 s) goes to the channel,
tracked from the ``sent_at`` of the outbox (microsecond precision), so also across ticks.
"""

from __future__ import annotations

import http.client
import logging
import socket
import time
import urllib.error
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast
from urllib.parse import urlsplit

from .errors import EXIT_FAILURE, EXIT_OK, ConfigError
from .faults import crash_point
from .notify_build import (
    build_alert,
    build_billing_alert,
    build_daily,
    build_digest,
    build_recovery,
    build_test_message,
    dedup_hash,
)
from .records import JobRecord, OutboxMessage
from .timeutil import iso as _iso
from .timeutil import parse_iso as _parse

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("slurm_triage.notify")
# slack-sdk logs the full webhook URL (the secret) at DEBUG when its logger's own level
# allows it, and repeats every failure at ERROR; its clients get this logger, pinned so it
# stays quiet whatever the root level is: we classify and log each failure ourselves.
_sdk_log = logging.getLogger("slurm_triage.notify.slack_sdk")
_sdk_log.setLevel(logging.CRITICAL)

EVENT_TYPE = "slurm_triage"
DONE_STATES = frozenset({"sent", "dead"})
MAX_BACKOFF_S = 120.0
DEFAULT_RETRY_AFTER_S = 30.0
_MAX_WAIT_S = 3600.0
# how far before a message's creation the history search starts (clock skew)
HISTORY_SKEW_S = 120.0

# Errors that no retry can fix: the token, the channel or the webhook is wrong.
CONFIG_ERRORS = frozenset(
    {
        "invalid_auth",
        "not_authed",
        "account_inactive",
        "token_revoked",
        "token_expired",
        "no_permission",
        "missing_scope",
        "channel_not_found",
        "not_in_channel",
        "is_archived",
        "channel_is_archived",
        "restricted_action",
        "team_access_not_granted",
        "ekm_access_denied",
        "invalid_token",
        "no_service",
        "no_team",
        "no_active_hooks",
        "team_disabled",
        "action_prohibited",
        "posting_to_general_channel_denied",
    }
)
TRANSIENT_ERRORS = frozenset(
    {"internal_error", "fatal_error", "service_unavailable", "request_timeout", "ratelimited"}
)

# What each configuration error means to the user.
EXPLAIN: dict[str, str] = {
    "invalid_auth": "the bot token is invalid (slack.bot_token)",
    "not_authed": "no bot token was sent (slack.bot_token)",
    "token_revoked": "the bot token was revoked (slack.bot_token)",
    "token_expired": "the bot token expired (slack.bot_token)",
    "account_inactive": "the bot's account or app was deactivated",
    "missing_scope": "the bot token lacks the chat:write scope",
    "channel_not_found": "channel not found (slack.channel); use the channel id (C…)",
    "not_in_channel": "the bot is not in the channel; invite it with /invite @yourbot",
    "is_archived": "the channel is archived",
    "channel_is_archived": "the channel is archived",
    "no_service": "the webhook was revoked or disabled (slack.webhook_url)",
    "no_team": "the webhook's workspace no longer exists (slack.webhook_url)",
    "invalid_token": "the webhook URL is invalid (slack.webhook_url)",
    "no_active_hooks": "the webhook's app has no active hooks",
    "team_disabled": "the Slack workspace is disabled",
    "action_prohibited": "an admin restricted posting to this channel",
}


def _explain(error: str) -> str:
    return f"{error}: {EXPLAIN[error]}" if error in EXPLAIN else error


def _iso_precise(dt: datetime) -> str:
    # send times drive the 1-msg/s limit: seconds resolution would let two sends in one second
    return dt.astimezone(timezone.utc).isoformat(timespec="microseconds")


class LedgerLike(Protocol):
    """What notify needs of ``ledger.Ledger`` (kept structural so tests can build one)."""

    jobs: dict[str, JobRecord]
    outbox: list[OutboxMessage]

    @property
    def health(self) -> Any: ...

    @property
    def resubmit(self) -> Any: ...

    def mark_dirty(self) -> None: ...


# ======================================================================================
# enqueue (pure)


def _wanted(rec: JobRecord, on: Sequence[str]) -> bool:
    if "all" in on:
        return True
    will_retry = rec.resubmit in ("pending", "submitted")
    if "not_retried" in on and not will_retry:
        return True
    if "retry_exhausted" in on and rec.resubmit == "cap_reached":
        return True
    return "billing" in on and rec.error_type == "billing"


def _add(ledger: LedgerLike, msg: OutboxMessage) -> bool:
    """Adds unless a message with this key exists (or was merged into another one)."""
    for existing in ledger.outbox:
        if existing.dedup_key == msg.dedup_key or msg.dedup_key in existing.merged_from:
            return False
    ledger.outbox.append(msg)
    ledger.mark_dirty()
    return True


def _digest_index(outbox: Iterable[OutboxMessage]) -> dict[str, OutboxMessage]:
    """Task key -> the digest that reported it."""
    index: dict[str, OutboxMessage] = {}
    for msg in outbox:
        if msg.kind == "digest":
            for key in msg.job_keys:
                index[key] = msg
    return index


def _ledger_unwritable(ledger: LedgerLike, tick_report: object | None) -> str | None:
    if tick_report is not None and getattr(tick_report, "ledger_unwritable", False):
        errors = getattr(tick_report, "errors", []) or []
        return next(
            (e for e in errors if str(e).startswith("ledger")), "the ledger cannot be saved"
        )
    # the previous tick's save failures (this tick's report only knows saves made so far)
    for err in getattr(ledger.health, "last_tick_errors", []) or []:
        if str(err).startswith("ledger"):
            return str(err)
    return None


def enqueue(
    ledger: LedgerLike, settings: Settings, now: datetime, tick_report: object | None = None
) -> int:
    """Turn what happened since the last tick into outbox messages; returns how many.

    New failures are marked ``notified`` whether or not Slack is on or the ``notify.on``
    filter keeps them, so turning Slack on later does not replay weeks of history.
    """
    created = _iso(now)
    on = list(settings.notify.on)
    slack_on = settings.slack.mode != "off"
    bot = settings.slack.mode == "bot"
    added = 0

    fresh = [r for r in ledger.jobs.values() if r.outcome == "failure" and not r.notified]
    for rec in fresh:
        rec.notified = True
        if rec.recovered_by:
            # failed and already recovered before anyone was told: nothing to alarm about
            rec.notified_recovery = True
    if fresh:
        ledger.mark_dirty()
    live = [r for r in fresh if not r.recovered_by]

    if slack_on:
        billing = [r for r in live if r.error_type == "billing"]
        if billing and ({"all", "billing", "not_retried"} & set(on)):
            text, blocks = build_billing_alert(
                billing, paused=bool(getattr(ledger.resubmit, "paused", False))
            )
            keys = sorted(r.key for r in billing)
            key = keys[0] if len(keys) == 1 else dedup_hash(keys)
            added += _add(
                ledger,
                OutboxMessage(
                    dedup_key=f"alert:billing:{key}",
                    kind="alert",
                    created_at=created,
                    text=text,
                    blocks=blocks,
                    job_keys=keys,
                ),
            )

        added += _enqueue_trouble(ledger, settings, now, tick_report)

        report = [r for r in live if _wanted(r, on)]
        if report:
            text, blocks = build_digest(
                report,
                max_groups=settings.notify.max_groups_per_digest,
                resubmit_enabled=settings.resubmit.enabled,
            )
            keys = sorted(r.key for r in report)
            added += _add(
                ledger,
                OutboxMessage(
                    dedup_key=f"digest:{dedup_hash(keys)}",
                    kind="digest",
                    created_at=created,
                    text=text,
                    blocks=blocks,
                    job_keys=keys,
                ),
            )

    added += _enqueue_recoveries(ledger, on if slack_on else [], bot, created)
    if slack_on:
        added += _enqueue_daily(ledger, settings, now)
    return added


def _enqueue_trouble(
    ledger: LedgerLike, settings: Settings, now: datetime, tick_report: object | None
) -> int:
    added = 0
    health = ledger.health
    failures = int(getattr(health, "consecutive_sacct_failures", 0) or 0)
    threshold = settings.notify.sacct_failure_alert_after
    if threshold > 0 and failures >= threshold and not health.sacct_alert_sent:
        errors = [e for e in (getattr(tick_report, "errors", None) or []) if "sacct" in str(e)]
        errors = errors or [e for e in health.last_tick_errors if "sacct" in e]
        detail = f"sacct has failed {failures} ticks in a row, so finished jobs are not being seen."
        if errors:
            detail += f" Last error: {str(errors[-1])[:500]}"
        # one alert per episode; the service clears sacct_alert_sent when sacct recovers
        health.sacct_alert_sent = True
        ledger.mark_dirty()
        added += _add_alert(
            ledger, f"alert:sacct:{_iso(now)}", now, "⚠️ slurm-triage cannot query Slurm", detail
        )
    problem = _ledger_unwritable(ledger, tick_report)
    if problem:
        # at most once a day: the flag cannot be persisted while the ledger is unwritable
        added += _add_alert(
            ledger,
            f"alert:ledger:{now.astimezone(timezone.utc).date().isoformat()}",
            now,
            "⚠️ slurm-triage cannot save its ledger",
            f"{problem[:500]}. Progress since the last save will be re-done after a restart; "
            "free disk space or fix permissions on the state folder.",
        )
    return added


def _add_alert(ledger: LedgerLike, dedup_key: str, now: datetime, title: str, detail: str) -> int:
    text, blocks = build_alert(title, detail)
    message = OutboxMessage(
        dedup_key=dedup_key, kind="alert", created_at=_iso(now), text=text, blocks=blocks
    )
    return _add(ledger, message)


def _enqueue_recoveries(ledger: LedgerLike, on: Sequence[str], bot: bool, created: str) -> int:
    pending = [
        r
        for r in ledger.jobs.values()
        if r.recovered_by and r.notified and not r.notified_recovery and r.outcome == "failure"
    ]
    if not pending:
        return 0
    index = _digest_index(ledger.outbox)
    by_digest: dict[str, list[JobRecord]] = {}
    for rec in pending:
        rec.notified_recovery = True
        parent = index.get(rec.key)
        # only tasks someone was told about need a follow-up
        if parent is not None and ({"all", "recovered"} & set(on)):
            by_digest.setdefault(parent.dedup_key, []).append(rec)
    ledger.mark_dirty()
    added = 0
    for parent_key, recs in sorted(by_digest.items()):
        text, blocks = build_recovery(recs, ledger.jobs)
        keys = sorted(r.key for r in recs)
        added += _add(
            ledger,
            OutboxMessage(
                dedup_key=f"recovered:{dedup_hash(keys)}",
                kind="followup",
                created_at=created,
                text=text,
                blocks=blocks,
                thread_of=parent_key if bot else None,
                job_keys=keys,
            ),
        )
    return added


def _parse_hhmm(text: str) -> tuple[int, int]:
    try:
        hh, mm = text.strip().split(":")
        hour, minute = int(hh), int(mm)
    except ValueError as exc:
        raise ConfigError(f"notify.daily_summary_at: expected HH:MM, got {text!r}") from exc
    if not (0 <= hour < 24 and 0 <= minute < 60):
        raise ConfigError(f"notify.daily_summary_at: expected HH:MM, got {text!r}")
    return hour, minute


def _enqueue_daily(ledger: LedgerLike, settings: Settings, now: datetime) -> int:
    at = settings.notify.daily_summary_at
    if not at:
        return 0
    hour, minute = _parse_hhmm(at)
    local = now.astimezone()  # the login node's local time, as the user reads it
    today = local.date().isoformat()
    health = ledger.health
    if (local.hour, local.minute) < (hour, minute) or health.last_daily_summary_on == today:
        return 0
    since = now - timedelta(days=1)

    def recent(rec: JobRecord) -> bool:
        stamp = _parse(rec.finished_at or rec.classified_at or rec.updated_at)
        return stamp is not None and stamp >= since

    window = [r for r in ledger.jobs.values() if recent(r)]
    failures = [r for r in window if r.outcome == "failure"]
    text, blocks = build_daily(
        day=today,
        failures=failures,
        recovered=sum(1 for r in failures if r.recovered_by),
        resubmitted=sum(1 for r in failures if r.resubmit == "submitted"),
        running=sum(1 for r in ledger.jobs.values() if r.outcome == "running"),
        undeliverable=sum(1 for m in ledger.outbox if m.state == "dead"),
    )
    health.last_daily_summary_on = today
    ledger.mark_dirty()
    return int(
        _add(
            ledger,
            OutboxMessage(
                dedup_key=f"daily:{today}",
                kind="daily",
                created_at=_iso(now),
                text=text,
                blocks=blocks,
            ),
        )
    )


# ======================================================================================
# senders (the edge: slack-sdk)

FailureKind = Literal["rate_limited", "transient", "uncertain", "message", "config"]


class SendFailure(Exception):
    """A failed post, classified by what the outbox should do about it.

    ``transient``: Slack did not take it, retry later; ``uncertain``: it may have been
    posted (timeout after sending); ``message``: this message can never be posted;
    ``config``: nothing can be posted until the settings are fixed.
    """

    def __init__(
        self, kind: FailureKind, error: str, retry_after: float | None = None, code: str = ""
    ) -> None:
        super().__init__(error)
        self.kind: FailureKind = kind
        self.error = error
        self.retry_after = retry_after
        self.code = code or kind


@dataclass(frozen=True)
class Posted:
    ts: str | None = None
    channel: str | None = None


class Sender(Protocol):
    destination: str  # for logs and reports; never contains a secret
    can_check_history: bool

    def post(self, msg: OutboxMessage, *, thread_ts: str | None, timeout: float) -> Posted: ...

    def find_posted(
        self, msg: OutboxMessage, *, channel: str | None, timeout: float
    ) -> Posted | None: ...


def _metadata(msg: OutboxMessage) -> dict[str, Any]:
    return {
        "event_type": EVENT_TYPE,
        "event_payload": {"dedup_key": msg.dedup_key, "kind": msg.kind},
    }


def _network_failure(exc: BaseException) -> SendFailure:
    """Connection trouble: did the request possibly reach Slack?"""
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    name = type(reason).__name__
    if isinstance(exc, urllib.error.URLError):
        # URLError wraps failures before the request was written (refused, DNS, connect timeout)
        code = "timeout" if isinstance(reason, (TimeoutError, socket.timeout)) else "network"
        return SendFailure("transient", f"cannot reach Slack: {name}: {reason}", code=code)
    if isinstance(reason, ConnectionRefusedError):
        return SendFailure("transient", "cannot reach Slack: connection refused", code="network")
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return SendFailure(
            "uncertain", "Slack did not answer in time (it may have posted)", code="timeout"
        )
    return SendFailure("uncertain", f"connection to Slack lost: {name}: {reason}", code="network")


_NETWORK_EXC: tuple[type[BaseException], ...] = (
    urllib.error.URLError,
    OSError,
    http.client.HTTPException,
)


def _retry_after(headers: Any) -> float | None:
    if not headers:
        return None
    for name in ("Retry-After", "retry-after"):
        value = headers.get(name) if hasattr(headers, "get") else None
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            try:
                return max(0.0, float(value))
            except (TypeError, ValueError):
                return None
    return None


def _classify_status(status: int, error: str, headers: Any) -> SendFailure:
    if status == 429 or error == "ratelimited":
        after = _retry_after(headers)
        return SendFailure(
            "rate_limited",
            "rate limited by Slack (429)",
            DEFAULT_RETRY_AFTER_S if after is None else after,
            code="ratelimited",
        )
    if error in CONFIG_ERRORS:
        return SendFailure("config", _explain(error), code=error)
    if status >= 500 or error in TRANSIENT_ERRORS:
        short = error if error in TRANSIENT_ERRORS else "server error"
        return SendFailure("transient", f"Slack error {status}: {short}", code="server_error")
    return SendFailure(
        "message", f"Slack refused the message ({status}): {error[:200] or 'unknown'}", code=error
    )


class WebhookSender:
    can_check_history = False

    def __init__(self, settings: Settings) -> None:
        url = settings.slack.webhook_url
        if url is None or not url.get_secret_value().strip():
            raise ConfigError("slack.mode is 'webhook' but slack.webhook_url is not set")
        self._url = url
        host = urlsplit(url.get_secret_value()).hostname or "?"
        # the URL's path is the secret; only the host is ever shown
        self.destination = f"webhook on {host}"

    def post(self, msg: OutboxMessage, *, thread_ts: str | None, timeout: float) -> Posted:
        from slack_sdk.webhook import WebhookClient

        client = WebhookClient(
            self._url.get_secret_value(),
            timeout=_sdk_timeout(timeout),
            retry_handlers=[],
            logger=_sdk_log,
        )
        try:
            resp = client.send(text=msg.text, blocks=msg.blocks or None, metadata=_metadata(msg))
        except _NETWORK_EXC as exc:
            raise _network_failure(exc) from exc
        if resp.status_code == 200:
            return Posted()
        body = (resp.body or "").strip()
        raise _classify_status(resp.status_code, body, getattr(resp, "headers", None))

    def find_posted(
        self, msg: OutboxMessage, *, channel: str | None, timeout: float
    ) -> Posted | None:
        return None


class BotSender:
    can_check_history = True

    def __init__(self, settings: Settings) -> None:
        token = settings.slack.bot_token
        if token is None or not token.get_secret_value().strip():
            raise ConfigError("slack.mode is 'bot' but slack.bot_token is not set")
        if not settings.slack.channel:
            raise ConfigError("slack.mode is 'bot' but slack.channel is not set")
        self._token = token
        self._base_url = settings.slack.base_url
        self.channel = settings.slack.channel
        self.destination = f"channel {self.channel}"

    def _client(self, timeout: float) -> Any:
        from slack_sdk import WebClient

        return WebClient(
            token=self._token.get_secret_value(),
            base_url=self._base_url,
            timeout=_sdk_timeout(timeout),
            retry_handlers=[],
            logger=_sdk_log,
        )

    def _call(self, fn: Callable[[], Any]) -> Any:
        from slack_sdk.errors import SlackApiError, SlackRequestError

        try:
            return fn()
        except SlackApiError as exc:
            resp = exc.response
            error = str(resp.get("error", "") if hasattr(resp, "get") else "")
            raise _classify_status(int(resp.status_code), error, resp.headers) from exc
        except SlackRequestError as exc:
            raise SendFailure("config", f"bad Slack request: {exc}") from exc
        except _NETWORK_EXC as exc:
            raise _network_failure(exc) from exc

    def check_auth(self, timeout: float) -> None:
        client = self._client(timeout)
        self._call(lambda: client.auth_test())

    def post(self, msg: OutboxMessage, *, thread_ts: str | None, timeout: float) -> Posted:
        client = self._client(timeout)
        resp = self._call(
            lambda: client.chat_postMessage(
                channel=self.channel,
                text=msg.text,
                blocks=msg.blocks or None,
                thread_ts=thread_ts,
                metadata=_metadata(msg),
            )
        )
        return Posted(ts=resp.get("ts"), channel=resp.get("channel"))

    def find_posted(
        self, msg: OutboxMessage, *, channel: str | None, timeout: float
    ) -> Posted | None:
        created = _parse(msg.created_at)
        oldest = (created.timestamp() - HISTORY_SKEW_S) if created else 0.0
        client = self._client(timeout)
        cursor: str | None = None

        def page() -> Any:
            return client.conversations_history(
                channel=channel or self.channel,
                oldest=f"{oldest:.6f}",
                include_all_metadata=True,
                limit=200,
                cursor=cursor,
            )

        for _ in range(10):  # 10 pages of 200: far more than one tick's backlog
            resp = self._call(page)
            for m in resp.get("messages") or []:
                meta = m.get("metadata") or {}
                payload = meta.get("event_payload") or {}
                if payload.get("dedup_key") == msg.dedup_key or msg.dedup_key in (
                    m.get("text") or ""
                ):
                    return Posted(ts=m.get("ts"), channel=channel or self.channel)
            cursor = ((resp.get("response_metadata") or {}).get("next_cursor")) or None
            if not cursor:
                break
        return None


def _sdk_timeout(seconds: float) -> int:
    # slack-sdk annotates int but hands the value to urllib, which takes fractions; sub-second
    # timeouts matter when the send budget is nearly used up
    return cast(int, max(0.1, seconds))


def make_sender(settings: Settings) -> Sender | None:
    mode = settings.slack.mode
    if mode == "webhook":
        return WebhookSender(settings)
    if mode == "bot":
        return BotSender(settings)
    return None


# ======================================================================================
# deliver


@dataclass
class DeliveryReport:
    sent: int = 0
    failed: int = 0
    dead: int = 0
    merged: int = 0  # digests folded into one
    pending: int = 0  # still undelivered afterwards
    resolved_by_history: int = 0
    deferred: str | None = None  # why delivery stopped early
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "failed": self.failed,
            "dead": self.dead,
            "merged": self.merged,
            "pending": self.pending,
            "resolved_by_history": self.resolved_by_history,
            "deferred": self.deferred,
            "errors": list(self.errors),
        }


def backoff_s(attempts: int) -> float:
    """2, 4, 8, … seconds up to 2 minutes: one request per 2 min is no load for Slack, and
    a longer cap would delay the backlog long after an outage ends."""
    return float(min(MAX_BACKOFF_S, 2.0 ** max(1, attempts)))


def _resolve_parent(ledger: LedgerLike, key: str) -> OutboxMessage | None:
    for msg in ledger.outbox:
        if msg.dedup_key == key or key in msg.merged_from:
            return msg
    return None


def merge_pending_digests(ledger: LedgerLike, settings: Settings, now: datetime) -> int:
    """Fold digests that piled up (Slack was down) into one; returns how many were folded.

    Rebuilt from the records, so the merged digest shows the latest state (e.g. a task
    resubmitted since). Skipped when any reported record is gone (retention), because
    then the digest could not be rebuilt faithfully.
    """
    waiting = [m for m in ledger.outbox if m.kind == "digest" and m.state == "pending"]
    if len(waiting) < 2:
        return 0
    keys = sorted({k for m in waiting for k in m.job_keys})
    records = [ledger.jobs.get(k) for k in keys]
    if any(r is None for r in records):
        return 0
    present = [r for r in records if r is not None]
    first = min(m.created_at for m in waiting)
    last = max(m.created_at for m in waiting)
    note = (
        f"Delayed: {len(waiting)} digests from {first[11:16]} to {last[11:16]} UTC merged "
        "while Slack was unreachable."
    )
    text, blocks = build_digest(
        present,
        max_groups=settings.notify.max_groups_per_digest,
        resubmit_enabled=settings.resubmit.enabled,
        note=note,
    )
    merged_from: list[str] = []
    for m in waiting:
        merged_from.append(m.dedup_key)
        merged_from.extend(m.merged_from)
    dues = [_parse(m.next_attempt_at) for m in waiting]
    merged = OutboxMessage(
        dedup_key=f"digest:{dedup_hash(keys)}",
        kind="digest",
        created_at=first,
        text=text,
        blocks=blocks,
        attempts=max(m.attempts for m in waiting),
        next_attempt_at=None
        if any(d is None for d in dues)
        else min(m.next_attempt_at or "" for m in waiting),
        last_error=waiting[-1].last_error,
        merged_from=sorted(set(merged_from)),
        job_keys=keys,
    )
    gone = {id(m) for m in waiting}
    position = next(i for i, m in enumerate(ledger.outbox) if id(m) in gone)
    rest = [m for m in ledger.outbox if id(m) not in gone]
    rest.insert(min(position, len(rest)), merged)
    ledger.outbox[:] = rest
    ledger.mark_dirty()
    return len(waiting)


def _next_message(ledger: LedgerLike) -> OutboxMessage | None:
    """The oldest undelivered message whose thread parent (if any) is settled."""
    undone = [m for m in ledger.outbox if m.state not in DONE_STATES]
    for msg in sorted(undone, key=lambda m: m.created_at):  # stable: enqueue order within a tick
        if msg.thread_of:
            parent = _resolve_parent(ledger, msg.thread_of)
            if parent is not None and parent.state not in DONE_STATES:
                continue  # its digest goes first
        return msg
    return None


def _last_sent_at(ledger: LedgerLike) -> datetime | None:
    stamps = [_parse(m.sent_at) for m in ledger.outbox if m.state == "sent" and m.sent_at]
    valid = [s for s in stamps if s is not None]
    return max(valid) if valid else None


def _known_channel_id(ledger: LedgerLike) -> str | None:
    for msg in reversed(ledger.outbox):
        if msg.state == "sent" and msg.channel:
            return msg.channel
    return None


def deliver(
    ledger: LedgerLike,
    settings: Settings,
    now: datetime,
    save: Callable[[], None],
    sender: Sender | None = None,
    *,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> DeliveryReport:
    """Send pending outbox messages in order, within ``budget_s`` (default slack.send_budget_s)."""
    report = DeliveryReport()
    if sender is None:
        sender = make_sender(settings)
    if sender is None:
        report.deferred = "slack is off"
        report.pending = sum(1 for m in ledger.outbox if m.state not in DONE_STATES)
        return report
    budget = settings.slack.send_budget_s if budget_s is None else budget_s
    interval = settings.slack.min_interval_s
    t0 = clock()

    def wall() -> datetime:
        return now + timedelta(seconds=clock() - t0)

    def remaining() -> float:
        return budget - (clock() - t0)

    report.merged = merge_pending_digests(ledger, settings, now)
    if report.merged:
        save()

    failures = 0
    while True:
        msg = _next_message(ledger)
        if msg is None:
            break
        if remaining() <= 0:
            report.deferred = "send budget used up"
            break
        wait = 0.0
        due = _parse(msg.next_attempt_at)
        if due is not None:
            wait = (due - wall()).total_seconds()
            if wait > _MAX_WAIT_S:
                # no backoff or Retry-After is this long: it was stamped before the clock
                # was set back; waiting for it would stall delivery until the clock catches up
                wait = 0.0
        last = _last_sent_at(ledger)
        if last is not None:
            # a send "in the future" also means the clock went back: count it as just sent
            wait = max(wait, interval - max(0.0, (wall() - last).total_seconds()))
        if wait > 0:
            if wait >= remaining():
                # in order: a message in backoff holds back the ones after it
                report.deferred = f"next attempt in {wait:.1f}s"
                break
            sleep(wait)

        timeout = min(settings.slack.timeout_s, max(1.0, remaining()))
        if msg.state == "sending" and sender.can_check_history:
            try:
                found = sender.find_posted(msg, channel=_known_channel_id(ledger), timeout=timeout)
            except SendFailure as exc:
                found = None
                if exc.kind in ("transient", "uncertain", "rate_limited"):
                    failures += 1
                    report.failed += 1
                    msg.last_error = f"history check: {exc.error}"
                    msg.next_attempt_at = _iso(
                        wall() + timedelta(seconds=exc.retry_after or backoff_s(msg.attempts))
                    )
                    ledger.mark_dirty()
                    save()
                    if failures >= settings.slack.max_send_attempts_per_tick:
                        report.deferred = "too many failures this tick"
                        break
                    continue
                # channel unreadable by id: we cannot know, resend (at-least-once)
                log.warning("history check impossible (%s); resending %s", exc.error, msg.dedup_key)
            if found is not None:
                _mark_sent(ledger, msg, found, wall())
                report.resolved_by_history += 1
                save()
                continue

        thread_ts = None
        if msg.thread_of:
            parent = _resolve_parent(ledger, msg.thread_of)
            if parent is not None and parent.state == "sent":
                thread_ts = parent.slack_ts
        msg.state = "sending"
        msg.attempts += 1
        ledger.mark_dirty()
        save()
        crash_point("notify.before_send")
        try:
            posted = sender.post(msg, thread_ts=thread_ts, timeout=timeout)
        except SendFailure as exc:
            failures += 1
            report.failed += 1
            _record_failure(ledger, msg, exc, wall(), report, sender.destination)
            save()
            if exc.kind == "config":
                report.deferred = f"undeliverable: {exc.error}"
                break
            if failures >= settings.slack.max_send_attempts_per_tick:
                report.deferred = "too many failures this tick"
                break
            continue
        crash_point("notify.after_send")
        _mark_sent(ledger, msg, posted, wall())
        save()
        report.sent += 1
        log.info("slack message sent: %s to %s", msg.dedup_key, sender.destination)

    report.pending = sum(1 for m in ledger.outbox if m.state not in DONE_STATES)
    report.dead = sum(1 for m in ledger.outbox if m.state == "dead")
    return report


def _mark_sent(ledger: LedgerLike, msg: OutboxMessage, posted: Posted, when: datetime) -> None:
    msg.state = "sent"
    msg.sent_at = _iso_precise(when)
    msg.slack_ts = posted.ts or msg.slack_ts
    msg.channel = posted.channel or msg.channel
    msg.next_attempt_at = None
    msg.last_error = None
    ledger.mark_dirty()


def _record_failure(
    ledger: LedgerLike,
    msg: OutboxMessage,
    exc: SendFailure,
    when: datetime,
    report: DeliveryReport,
    destination: str,
) -> None:
    msg.last_error = exc.error
    ledger.mark_dirty()
    report.errors.append(f"{msg.dedup_key}: {exc.error}")
    log.warning(
        "slack send failed (%s) for %s to %s: %s", exc.kind, msg.dedup_key, destination, exc.error
    )
    if exc.kind == "rate_limited":
        msg.state = "pending"
        delay = exc.retry_after if exc.retry_after is not None else DEFAULT_RETRY_AFTER_S
        msg.next_attempt_at = _iso_precise(when + timedelta(seconds=delay))
    elif exc.kind == "transient":
        msg.state = "pending"
        msg.next_attempt_at = _iso_precise(when + timedelta(seconds=backoff_s(msg.attempts)))
    elif exc.kind == "uncertain":
        # may be in the channel already: stays "sending" so the next attempt checks first
        msg.state = "sending"
        msg.next_attempt_at = _iso_precise(when + timedelta(seconds=backoff_s(msg.attempts)))
    elif exc.kind == "message":
        msg.state = "dead"
    else:
        # the destination itself is unusable: every waiting message shares this fate
        for other in ledger.outbox:
            if other.state not in DONE_STATES:
                other.state = "dead"
                other.last_error = exc.error if other is msg else f"not sent: {exc.error}"


# ======================================================================================
# notify test


@dataclass
class NotifyTestResult:
    ok: bool
    mode: str
    destination: str
    problem: str | None = None  # short code: invalid_auth, not_in_channel, network, off, ...
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mode": self.mode,
            "destination": self.destination,
            "problem": self.problem,
            "detail": self.detail,
        }

    def render_text(self) -> str:
        if self.ok:
            return f"ok: test message delivered to {self.destination} ({self.mode} mode)"
        return f"failed: {self.destination} ({self.mode} mode): {self.detail}"

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_FAILURE


def send_test(settings: Settings, sender: Sender | None = None) -> NotifyTestResult:
    """The ``notify test`` command: post a test message now, bypassing the outbox."""
    mode = settings.slack.mode
    if mode == "off" and sender is None:
        return NotifyTestResult(
            ok=False,
            mode="off",
            destination="-",
            problem="off",
            detail="Slack is off; set slack.mode to 'webhook' (with slack.webhook_url) "
            "or 'bot' (with slack.bot_token and slack.channel)",
        )
    if sender is None:
        sender = make_sender(settings)
    assert sender is not None
    text, blocks = build_test_message(sender.destination)
    msg = OutboxMessage(
        dedup_key=f"test:{_iso_precise(datetime.now(timezone.utc))}",
        kind="test",
        created_at=_iso(datetime.now(timezone.utc)),
        text=text,
        blocks=blocks,
    )
    try:
        if isinstance(sender, BotSender):
            sender.check_auth(settings.slack.timeout_s)
        sender.post(msg, thread_ts=None, timeout=settings.slack.timeout_s)
    except SendFailure as exc:
        return NotifyTestResult(
            ok=False, mode=mode, destination=sender.destination, problem=exc.code, detail=exc.error
        )
    return NotifyTestResult(ok=True, mode=mode, destination=sender.destination)
