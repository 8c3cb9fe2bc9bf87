"""kill -9 at every step of a tick, then restart: nothing lost, nothing done twice.

One real daemon process per crash (``python -m daemon run --once`` with
``SLURM_TRIAGE_CRASH_AT``) against the fake Slurm and the local Slack stand-in, then
restarts until the world settles. What is counted comes from outside the daemon: the
fake's record of every ``sbatch`` call and the stub's record of every Slack post.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest

from daemon.model import expand_ranges
from tests.reliability.conftest import (
    KEY_ERROR_TB,
    NETWORK_TB,
    RATE_LIMIT_TB,
    SUCCESS_OUT,
    Rig,
    make_rig,
    reported_keys,
)
from tests.slackstub import SlackStub

FAILED = {"_1": "rate_limit", "_2": "code_error", "_3": "network"}
RETRYABLE = {"_1", "_3"}


def _seed(rig: Rig) -> str:
    job = rig.array("0-3")
    rig.fake.finish(f"{job}_0", "COMPLETED", out=SUCCESS_OUT, err="")
    rig.fake.finish(f"{job}_1", "FAILED", err=RATE_LIMIT_TB)
    rig.fake.finish(f"{job}_2", "FAILED", err=KEY_ERROR_TB)
    rig.fake.finish(f"{job}_3", "FAILED", err=NETWORK_TB)
    return job


def submitted_tasks(rig: Rig, job: str) -> Counter[str]:
    """Original task keys carried by every sbatch the fake accepted."""
    counts: Counter[str] = Counter()
    for sub in rig.fake.submissions():
        if sub["job_id"] is None:
            continue
        specs = [a.removeprefix("--array=") for a in sub["argv"] if a.startswith("--array=")]
        assert len(specs) == 1, sub["argv"]
        counts.update(f"{job}_{i}" for i in expand_ranges(specs[0]))
    return counts


# An sbatch whose outcome a crash hid is looked for in two ticks and 5 minutes before it
# is planned again (resubmit.ABANDON_AFTER_*): the restarts run with the clock moved on.
SETTLE_AT_S = (0.0, 360.0, 720.0)


def _settle(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    for later in SETTLE_AT_S:
        assert rig.once(monkeypatch, later_s=later) in (0, 1)


def _check_world(rig: Rig, job: str) -> None:
    ledger = rig.ledger()  # loads: not corrupt, not empty
    failed = {f"{job}{s}": t for s, t in FAILED.items()}
    for key, etype in failed.items():
        rec = ledger.jobs[key]
        assert rec.outcome == "failure" and rec.error_type == etype, (key, rec)
    assert ledger.jobs[f"{job}_0"].outcome == "success"
    # resubmission: each retryable task exactly once, nothing else
    subs = submitted_tasks(rig, job)
    assert subs == Counter({f"{job}{s}": 1 for s in RETRYABLE}), subs
    assert all(i.state != "intent" for i in ledger.intents.values())
    for s in RETRYABLE:
        child = ledger.jobs[ledger.jobs[f"{job}{s}"].retried_as or "missing"]
        assert child.origin == f"{job}{s}" and child.attempt == 2
    # Slack (bot mode): each failed task reported exactly once, no message posted twice
    assert rig.stub is not None
    keys = rig.stub.dedup_keys()
    assert len(keys) == len(set(keys)), f"a message was posted twice: {keys}"
    reported = reported_keys(rig)
    assert {k: reported[k] for k in failed} == dict.fromkeys(failed, 1), reported
    assert all(m.state == "sent" for m in ledger.outbox), [
        (m.dedup_key, m.state, m.last_error) for m in ledger.outbox
    ]


CASES = [
    ("tick.after_sacct", 0),
    ("tick.mid_scan", 0),
    ("tick.mid_scan", 3),
    ("resubmit.before_sbatch", 0),
    ("resubmit.after_sbatch", 0),
    ("notify.before_send", 0),
    ("notify.after_send", 0),
    *[("ledger.before_rename", n) for n in range(5)],
    *[("ledger.after_rename", n) for n in range(5)],
]


@pytest.mark.parametrize(("point", "after"), CASES, ids=[f"{p}+{a}" for p, a in CASES])
def test_kill_at_every_tick_step_then_restart_loses_and_duplicates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stub: SlackStub, point: str, after: int
) -> None:
    rig = make_rig(tmp_path, monkeypatch, stub)
    job = _seed(rig)
    rc = rig.once_forked(point, after)
    assert rc == -signal.SIGKILL, f"the daemon never reached {point} (+{after}): rc={rc}"
    _settle(rig, monkeypatch)
    _check_world(rig, job)
    # and a later tick changes nothing that matters
    before = {k: r.classified_at for k, r in rig.ledger().jobs.items()}
    assert rig.once(monkeypatch, later_s=800.0) == 0
    assert {k: r.classified_at for k, r in rig.ledger().jobs.items()} == before
    _check_world(rig, job)


def test_two_crashes_in_a_row_at_different_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stub: SlackStub
) -> None:
    rig = make_rig(tmp_path, monkeypatch, stub)
    job = _seed(rig)
    assert rig.once_subprocess(crash="resubmit.after_sbatch").returncode == -signal.SIGKILL
    assert rig.once_subprocess(crash="notify.after_send").returncode == -signal.SIGKILL
    _settle(rig, monkeypatch)
    _check_world(rig, job)


@pytest.mark.parametrize(
    ("point", "max_posts"),
    [("notify.before_send", 1), ("notify.after_send", 2)],
)
def test_webhook_mode_is_at_least_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stub: SlackStub, point: str, max_posts: int
) -> None:
    """A webhook cannot be asked what it got: a kill between Slack's answer and the save
    resends the digest (documented at-least-once); it is never lost."""
    rig = make_rig(tmp_path, monkeypatch, stub, slack_mode="webhook")
    job = _seed(rig)
    assert rig.once_subprocess(crash=point).returncode == -signal.SIGKILL
    _settle(rig, monkeypatch)
    texts = [p.text for p in stub.posted]
    digests = [t for t in texts if job in t]
    assert 1 <= len(digests) <= max_posts, texts
    assert all(m.state == "sent" for m in rig.ledger().outbox)
