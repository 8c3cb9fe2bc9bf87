"""Outbox enqueue and delivery against a real local HTTP server standing in for Slack.

The real slack-sdk clients talk HTTP to ``tests/slackstub.py``; time is a fake clock
injected into ``deliver`` (its sleeps advance it), so backoff and rate tests are fast
and exact. Crash tests run ``deliver`` in a child process that SIGKILLs itself at a
named crash point, then deliver again from the saved ledger.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from daemon.ledger import Ledger, LedgerStore
from daemon.model import expand_ranges
from daemon.notify import (
    DeliveryReport,
    deliver,
    enqueue,
    send_test,
)
from daemon.records import JobRecord, OutboxMessage
from daemon.settings import Settings
from tests.slackstub import TOKEN, WEBHOOK_PATH, SlackStub

NOW = datetime(2025, 3, 1, 14, 0, tzinfo=timezone.utc)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += max(0.0, seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def stub(clock: FakeClock) -> Iterator[SlackStub]:
    s = SlackStub(clock=clock).start()
    yield s
    s.stop()


def bot_settings(stub: SlackStub, tmp_path: Path, **slack: Any) -> Settings:
    conf: dict[str, Any] = {
        "mode": "bot",
        "bot_token": TOKEN,
        "channel": "#alerts",
        "base_url": stub.base_url,
        "timeout_s": 2.0,
    }
    conf.update(slack)
    return Settings(state_dir=tmp_path / "state", slack=conf)


def hook_settings(stub: SlackStub, tmp_path: Path, **slack: Any) -> Settings:
    conf: dict[str, Any] = {"mode": "webhook", "webhook_url": stub.webhook_url, "timeout_s": 2.0}
    conf.update(slack)
    return Settings(state_dir=tmp_path / "state", slack=conf)


def failed(key: str, etype: str = "rate_limit", **kw: Any) -> JobRecord:
    job_id, _, task = key.partition("_")
    return JobRecord(
        key=key,
        job_id=job_id,
        array_task=int(task) if task else None,
        job_name="sweep",
        outcome="failure",
        error_type=etype,
        retryable=etype in ("rate_limit", "network"),
        evidence={"text": f"{etype} happened", "line_no": 3, "source": "x.err"},
        finished_at=NOW.isoformat(),
        **kw,
    )


def add(ledger: Ledger, *recs: JobRecord) -> None:
    for r in recs:
        ledger.jobs[r.key] = r


def msg(key: str, created: datetime = NOW, kind: str = "alert") -> OutboxMessage:
    return OutboxMessage(dedup_key=key, kind=kind, created_at=created.isoformat(), text=key)


def run(
    ledger: Ledger, settings: Settings, clock: FakeClock, now: datetime = NOW, **kw: Any
) -> DeliveryReport:
    saves: list[int] = []
    return deliver(
        ledger, settings, now, lambda: saves.append(1), clock=clock, sleep=clock.sleep, **kw
    )


# --- enqueue ------------------------------------------------------------------------------


def test_enqueue_one_digest_per_tick_marks_notified_and_is_idempotent(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, slack={"mode": "webhook", "webhook_url": "http://h/x"})
    ledger = Ledger.empty(NOW)
    add(ledger, *(failed(f"10_{i}") for i in range(30)), failed("11", "code_error"))
    assert enqueue(ledger, settings, NOW) == 1
    [digest] = ledger.outbox
    assert digest.kind == "digest" and digest.dedup_key.startswith("digest:")
    assert len(digest.job_keys) == 31
    assert all(r.notified for r in ledger.jobs.values())
    # a crash before the save re-runs enqueue on the same records: same key, no second message
    for r in ledger.jobs.values():
        r.notified = False
    assert enqueue(ledger, settings, NOW + timedelta(minutes=1)) == 0
    assert len(ledger.outbox) == 1
    assert enqueue(ledger, settings, NOW) == 0  # nothing new


def test_enqueue_filters_and_mode_off(tmp_path: Path) -> None:
    ledger = Ledger.empty(NOW)
    add(
        ledger,
        failed("1_1", resubmit="submitted", retried_as="2_1"),
        failed("1_2", resubmit="cap_reached"),
        failed("1_3", "code_error", resubmit="not_retryable"),
    )
    s = Settings(
        state_dir=tmp_path,
        slack={"mode": "webhook", "webhook_url": "http://h/x"},
        notify={"on": ["retry_exhausted"]},
    )
    enqueue(ledger, s, NOW)
    assert [m.job_keys for m in ledger.outbox] == [["1_2"]]

    off = Ledger.empty(NOW)
    add(off, failed("5_1"))
    assert enqueue(off, Settings(state_dir=tmp_path), NOW) == 0
    assert off.outbox == [] and off.jobs["5_1"].notified  # no backlog replay when turned on


def test_billing_alert_sacct_alert_once_and_daily_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "UTC")
    import time

    time.tzset()
    s = Settings(
        state_dir=tmp_path,
        slack={"mode": "webhook", "webhook_url": "http://h/x"},
        notify={"daily_summary_at": "09:00", "sacct_failure_alert_after": 3},
    )
    ledger = Ledger.empty(NOW)
    add(ledger, failed("7_1", "billing"))
    ledger.health.consecutive_sacct_failures = 3
    ledger.health.last_tick_errors = ["sacct: sacct timed out after 30 s"]
    enqueue(ledger, s, NOW)
    kinds = [(m.kind, m.dedup_key.split(":")[0:2]) for m in ledger.outbox]
    assert ("alert", ["alert", "billing"]) in kinds
    assert ("alert", ["alert", "sacct"]) in kinds
    assert ("daily", ["daily", "2025-03-01"]) in kinds
    # billing alert is queued before the digest: it must not wait behind it
    assert ledger.outbox[0].dedup_key == "alert:billing:7_1"
    n = len(ledger.outbox)
    ledger.health.consecutive_sacct_failures = 4
    assert enqueue(ledger, s, NOW + timedelta(minutes=1)) == 0  # once per episode, once a day
    assert len(ledger.outbox) == n
    assert enqueue(ledger, s, NOW + timedelta(days=1)) == 1  # next day's summary


def test_ledger_unwritable_alert(tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path, slack={"mode": "webhook", "webhook_url": "http://h/x"})
    ledger = Ledger.empty(NOW)

    class Report:
        def __init__(self) -> None:
            self.ledger_unwritable = True
            self.errors = ["ledger: cannot write ledger.json: No space left on device"]

    assert enqueue(ledger, s, NOW, Report()) == 1
    assert "No space left" in ledger.outbox[0].text
    assert enqueue(ledger, s, NOW + timedelta(minutes=1), Report()) == 0


def test_recovery_follow_up_threads_under_its_digest_in_bot_mode(
    stub: SlackStub, tmp_path: Path, clock: FakeClock
) -> None:
    s = bot_settings(stub, tmp_path)
    ledger = Ledger.empty(NOW)
    add(ledger, *(failed(f"30_{i}") for i in range(5)))
    enqueue(ledger, s, NOW)
    run(ledger, s, clock)
    for i in (1, 2):
        ledger.jobs[f"30_{i}"].recovered_by = f"31_{i}"
    later = NOW + timedelta(minutes=5)
    assert enqueue(ledger, s, later) == 1
    assert enqueue(ledger, s, later) == 0
    run(ledger, s, clock, now=later)
    digest, follow = stub.posted
    assert follow.thread_ts == digest.ts
    assert "2 tasks recovered" in follow.text and "30 tasks 1-2" in follow.text

    w = hook_settings(stub, tmp_path)
    wl = Ledger.empty(NOW)
    add(wl, failed("40_1"))
    enqueue(wl, w, NOW)
    wl.jobs["40_1"].recovered_by = "41_1"
    enqueue(wl, w, NOW)
    assert wl.outbox[-1].kind == "followup" and wl.outbox[-1].thread_of is None


# --- delivery -----------------------------------------------------------------------------


def test_webhook_delivery_in_order_at_most_one_per_second(
    stub: SlackStub, tmp_path: Path, clock: FakeClock
) -> None:
    s = hook_settings(stub, tmp_path, send_budget_s=30.0)
    ledger = Ledger.empty(NOW)
    ledger.outbox = [msg(f"m{i}", NOW + timedelta(seconds=i)) for i in range(6)]
    report = run(ledger, s, clock)
    assert report.sent == 6
    assert [p.text for p in stub.posted] == [f"m{i}" for i in range(6)]
    times = [r.at for r in stub.post_requests()]
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    assert all(m.state == "sent" for m in ledger.outbox)
    # across ticks too: the last send time comes from the ledger, not from memory
    ledger.outbox.append(msg("m6", NOW + timedelta(seconds=10)))
    # the next tick starts right away (wall time and the fake clock agree)
    run(ledger, s, clock, now=NOW + timedelta(seconds=clock.t - 1000.0))
    times = [r.at for r in stub.post_requests()]
    assert times[-1] - times[-2] >= 1.0 - 1e-6


def test_429_retry_after_is_honoured(stub: SlackStub, tmp_path: Path, clock: FakeClock) -> None:
    s = bot_settings(stub, tmp_path)
    ledger = Ledger.empty(NOW)
    ledger.outbox = [msg("a")]
    stub.fail_next("429", retry_after=5)
    report = run(ledger, s, clock)
    assert report.sent == 1 and report.failed == 1
    first, second = stub.post_requests()
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 5.0

    # Retry-After beyond the budget: no sleeping past it, the due time is stored
    ledger.outbox.append(msg("b", NOW + timedelta(seconds=1)))
    stub.fail_next("429", retry_after=60)
    t0 = clock.t
    report = run(ledger, s, clock, now=NOW + timedelta(seconds=30))
    assert clock.t - t0 <= s.slack.send_budget_s
    b = ledger.outbox[-1]
    assert b.state == "pending" and b.next_attempt_at is not None
    assert datetime.fromisoformat(b.next_attempt_at) >= NOW + timedelta(seconds=89)
    assert report.deferred and "next attempt" in report.deferred


def test_500_backs_off_exponentially(stub: SlackStub, tmp_path: Path, clock: FakeClock) -> None:
    s = hook_settings(stub, tmp_path, send_budget_s=30.0, max_send_attempts_per_tick=5)
    ledger = Ledger.empty(NOW)
    ledger.outbox = [msg("a")]
    stub.fail_next("500", count=2)
    report = run(ledger, s, clock)
    assert report.sent == 1 and report.failed == 2
    times = [r.at for r in stub.post_requests()]
    assert times[1] - times[0] >= 2.0 and times[2] - times[1] >= 4.0
    assert len(stub.posted) == 1


def test_timeout_after_slack_took_the_message_is_not_resent_in_bot_mode(
    stub: SlackStub, tmp_path: Path, clock: FakeClock
) -> None:
    # the channel id: conversations.history cannot take a #name
    s = bot_settings(stub, tmp_path, timeout_s=0.3, channel="C0ALERTS")
    ledger = Ledger.empty(NOW)
    ledger.outbox = [msg("slow")]
    stub.fail_next("post_then_slow", delay_s=1.0, path="chat.postMessage")
    report = run(ledger, s, clock, budget_s=1.0)
    m = ledger.outbox[0]
    assert report.failed == 1 and m.state == "sending"  # we do not know: must check first
    assert "did not answer" in (m.last_error or "")
    clock.t += 600
    report = run(ledger, s, clock, now=NOW + timedelta(minutes=10))
    assert report.resolved_by_history == 1
    assert m.state == "sent" and m.slack_ts == stub.posted[0].ts
    assert len(stub.posted) == 1


def test_not_in_channel_is_dead_with_a_clear_error(
    stub: SlackStub, tmp_path: Path, clock: FakeClock
) -> None:
    stub.not_member.add("C0ALERTS")
    s = bot_settings(stub, tmp_path)
    ledger = Ledger.empty(NOW)
    ledger.outbox = [msg("a"), msg("b", NOW + timedelta(seconds=1))]
    report = run(ledger, s, clock)
    assert [m.state for m in ledger.outbox] == ["dead", "dead"]
    assert "not in the channel" in (ledger.outbox[0].last_error or "")
    assert len(stub.post_requests()) == 1  # no hammering: one request told us enough
    assert report.dead == 2
    assert run(ledger, s, clock).sent == 0


def test_webhook_revoked_is_dead(stub: SlackStub, tmp_path: Path, clock: FakeClock) -> None:
    stub.revoked_webhooks.add(WEBHOOK_PATH)
    s = hook_settings(stub, tmp_path)
    ledger = Ledger.empty(NOW)
    ledger.outbox = [msg("a")]
    run(ledger, s, clock)
    assert ledger.outbox[0].state == "dead"
    assert "webhook was revoked" in (ledger.outbox[0].last_error or "")


def test_restart_with_messages_in_the_outbox_delivers_once_in_order(
    stub: SlackStub, tmp_path: Path, clock: FakeClock
) -> None:
    s = hook_settings(stub, tmp_path)
    path = tmp_path / "state" / "ledger.json"
    with LedgerStore(path) as store:
        ledger = store.load()
        ledger.outbox = [msg(f"r{i}", NOW + timedelta(seconds=i)) for i in range(3)]
        stub.down = 503
        deliver(ledger, s, NOW, lambda: store.save(ledger, now=NOW), clock=clock, sleep=clock.sleep)
        store.save(ledger, now=NOW)
    assert stub.posted == []
    stub.down = None
    later = NOW + timedelta(minutes=5)
    with LedgerStore(path) as store:  # a new daemon process
        ledger = store.load()
        assert [m.state for m in ledger.outbox] == ["pending"] * 3
        deliver(
            ledger, s, later, lambda: store.save(ledger, now=later), clock=clock, sleep=clock.sleep
        )
    assert [p.text for p in stub.posted] == ["r0", "r1", "r2"]
    with LedgerStore(path) as store:
        assert [m.state for m in store.load().outbox] == ["sent"] * 3


CHILD = textwrap.dedent(
    """
    import sys
    from datetime import datetime
    from daemon.ledger import LedgerStore
    from daemon.notify import deliver
    from daemon.settings import Settings
    import json

    path, conf, now = sys.argv[1], json.loads(sys.argv[2]), datetime.fromisoformat(sys.argv[3])
    settings = Settings(**conf)
    with LedgerStore(path) as store:
        ledger = store.load()
        deliver(ledger, settings, now, lambda: store.save(ledger, now=now))
        store.save(ledger, now=now)
    """
)


def _crash_run(tmp_path: Path, conf: dict[str, Any], point: str) -> int:
    import json

    env = {**os.environ, "SLURM_TRIAGE_CRASH_AT": point}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(tmp_path / "ledger.json"),
            json.dumps(conf),
            NOW.isoformat(),
        ],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=60,
        capture_output=True,
        text=True,
    )
    return proc.returncode


@pytest.mark.parametrize(
    ("mode", "point", "expected_posts"),
    [
        ("bot", "notify.after_send", 1),  # history check finds it: exactly once
        ("bot", "notify.before_send", 1),
        ("webhook", "notify.before_send", 1),
        # webhook cannot look: a crash in the send window resends (documented at-least-once)
        ("webhook", "notify.after_send", 2),
    ],
)
def test_crash_around_the_send(
    stub: SlackStub, tmp_path: Path, clock: FakeClock, mode: str, point: str, expected_posts: int
) -> None:
    conf: dict[str, Any] = {"state_dir": str(tmp_path)}
    if mode == "bot":
        conf["slack"] = {
            "mode": "bot",
            "bot_token": TOKEN,
            "channel": "C0ALERTS",
            "base_url": stub.base_url,
        }
    else:
        conf["slack"] = {"mode": "webhook", "webhook_url": stub.webhook_url}
    with LedgerStore(tmp_path / "ledger.json") as store:
        ledger = store.load()
        ledger.outbox = [msg("crashy")]
        store.save(ledger, now=NOW)
    assert _crash_run(tmp_path, conf, point) == -9
    with LedgerStore(tmp_path / "ledger.json") as store:
        ledger = store.load()
        assert ledger.outbox[0].state == "sending"
        later = NOW + timedelta(minutes=1)
        deliver(
            ledger,
            Settings(**conf),
            later,
            lambda: store.save(ledger, now=later),
            clock=clock,
            sleep=clock.sleep,
        )
        store.save(ledger, now=later)
        assert ledger.outbox[0].state == "sent"
    assert len(stub.posted) == expected_posts
    assert set(stub.dedup_keys()) == {"crashy"}


def test_thirty_minute_outage_with_500_failures_merges_loses_and_duplicates_nothing(
    stub: SlackStub, tmp_path: Path, clock: FakeClock
) -> None:
    s = bot_settings(stub, tmp_path, channel="C0ALERTS", send_budget_s=10.0)
    ledger = Ledger.empty(NOW)
    keys: list[str] = []
    types = ["rate_limit", "network", "code_error"]
    stub.down = 503
    tick_start = clock.t
    for tick in range(30):  # one tick a minute; Slack refuses everything for 30 minutes
        now = NOW + timedelta(minutes=tick)
        for _ in range(17 if tick < 29 else 7):
            n = len(keys)
            key = f"{8000 + n % 5}_{n // 5}"
            keys.append(key)
            add(ledger, failed(key, types[n % 3]))
        if tick == 12:
            stub.stop()  # now connection refused instead of 503
        enqueue(ledger, s, now)
        before = clock.t
        report = run(ledger, s, clock, now=now)
        assert clock.t - before <= s.slack.send_budget_s  # the tick never stalls
        assert report.sent == 0
        clock.t = max(clock.t, tick_start + 60 * (tick + 1))
    assert len(keys) == 500
    pending = [m for m in ledger.outbox if m.state != "sent"]
    assert len(pending) == 1 and len(pending[0].merged_from) >= 29  # merged while waiting

    stub.start()
    stub.down = None
    # backoff is capped (2 min), so the first tick after that delivers
    after = NOW + timedelta(minutes=33)
    clock.t += 180
    report = run(ledger, s, clock, now=after)
    assert report.sent == 1
    assert stub.dedup_keys() == [pending[0].dedup_key]
    delivered: Counter[str] = Counter()
    for m in ledger.outbox:
        if m.state == "sent":
            delivered.update(m.job_keys)
    assert set(delivered) == set(keys) and max(delivered.values()) == 1
    # and the message itself names every failed task once
    seen: Counter[str] = Counter()
    for block in stub.posted[0].blocks:
        if block["type"] != "section":
            continue
        text = block["text"]["text"]
        job = text.split("job `", 1)[1].split("`", 1)[0]
        ranges = text.split("tasks ", 1)[1].split(" (", 1)[0]
        seen.update(f"{job}_{i}" for i in expand_ranges(ranges))
    assert set(seen) == set(keys) and max(seen.values()) == 1


def test_secrets_never_logged(
    stub: SlackStub, tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ledger = Ledger.empty(NOW)
    ledger.outbox = [msg("a"), msg("b", NOW + timedelta(seconds=1))]
    stub.fail_next("500")
    run(ledger, hook_settings(stub, tmp_path), clock)
    run(ledger, bot_settings(stub, tmp_path), clock)
    assert "/services/T000" not in caplog.text and TOKEN not in caplog.text
    assert "127.0.0.1" in caplog.text  # the host is fine to show


# --- notify test -------------------------------------------------------------------------


def test_send_test_reports_precisely(stub: SlackStub, tmp_path: Path) -> None:
    ok = send_test(bot_settings(stub, tmp_path))
    assert ok.ok and ok.exit_code == 0 and len(stub.posted) == 1

    bad = send_test(bot_settings(stub, tmp_path, bot_token="xoxb-wrong"))
    assert bad.problem == "invalid_auth" and "bot token is invalid" in bad.render_text()
    assert bad.exit_code == 1

    nochan = send_test(bot_settings(stub, tmp_path, channel="#nope"))
    assert nochan.problem == "channel_not_found"

    stub.not_member.add("C0ALERTS")
    assert send_test(bot_settings(stub, tmp_path)).problem == "not_in_channel"

    stub.revoked_webhooks.add(WEBHOOK_PATH)
    revoked = send_test(hook_settings(stub, tmp_path))
    assert revoked.problem == "no_service" and "revoked" in revoked.detail
    assert "/services/" not in revoked.render_text() + str(revoked.to_json())

    off = send_test(Settings(state_dir=tmp_path))
    assert off.exit_code == 1 and "Slack is off" in off.render_text()

    url = stub.webhook_url
    stub.stop()
    down = send_test(Settings(state_dir=tmp_path, slack={"mode": "webhook", "webhook_url": url}))
    assert down.problem == "network" and not down.ok


def test_send_test_timeout(stub: SlackStub, tmp_path: Path) -> None:
    stub.fail_next("slow", delay_s=1.0)
    res = send_test(hook_settings(stub, tmp_path, timeout_s=0.3))
    assert res.problem == "timeout"
