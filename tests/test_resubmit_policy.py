"""The pure retry policy: grouping, refusals, caps, pause, backoff, escalation."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from test_resubmit_helpers import NOW, USER, failed, iso, ledger_of, settings

from daemon.model import ErrorType
from daemon.records import SubmitIntent
from daemon.resubmit import Plan, backoff_delay_s, lift_pause, plan
from daemon.settings import TypePolicy


def always(_: str) -> bool:
    return True


def run_plan(led, st=None, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("user", USER)
    kw.setdefault("exists", always)
    return plan(led, st or settings(), NOW, random.Random(7), **kw)


def statuses(p: Plan) -> dict[str, str]:
    return {d.key: d.status for d in p.decisions}


def test_failed_tasks_of_one_job_go_out_as_one_array_with_the_throttle() -> None:
    led = ledger_of(
        *(failed(f"100_{i}") for i in (38, 39, 40, 41, 47, 49)),
        failed("200", submit_line="sbatch job.sh"),
    )
    p = run_plan(led)
    by_job = {s.job_id: s for s in p.submissions}
    assert set(by_job) == {"100", "200"}
    assert by_job["100"].array_spec == "38-41,47,49%2"
    assert by_job["100"].task_keys == ("100_38", "100_39", "100_40", "100_41", "100_47", "100_49")
    assert by_job["200"].array_spec is None
    argv = by_job["100"].argv("tag1")
    assert argv[0] == "sbatch" and "--parsable" in argv
    assert "--array=38-41,47,49%2" in argv and "--comment=slurm-triage:tag1" in argv
    assert by_job["100"].attempt == 2


@pytest.mark.parametrize("etype", ["code_error", "cancelled", "unknown"])
def test_never_retryable_types_are_never_planned_even_if_enabled_by_hand(etype: str) -> None:
    st = settings()
    # settings validation refuses enabling them; force it past validation to prove the guard
    st.resubmit.types[ErrorType(etype)] = TypePolicy(enabled=True)
    led = ledger_of(failed("100_1", etype))
    p = run_plan(led, st, manual=True)
    assert p.submissions == []
    assert statuses(p) == {"100_1": "not_retryable"}


def test_billing_failure_pauses_everything() -> None:
    led = ledger_of(failed("100_1", "billing"), failed("100_2"), failed("300_1", "network"))
    p = run_plan(led)
    assert p.submissions == []
    assert p.pause_reason is not None and "100_1" in p.pause_reason
    st = statuses(p)
    assert st["100_1"] == "not_retryable"
    assert st["100_2"] == "paused" and st["300_1"] == "paused"


def test_paused_ledger_plans_nothing_until_resumed() -> None:
    led = ledger_of(failed("100_2"))
    led.resubmit.paused, led.resubmit.paused_reason = True, "billing failure in job 9"
    p = run_plan(led)
    assert p.submissions == [] and statuses(p) == {"100_2": "paused"}
    assert "--resume" in p.decisions[0].note
    assert lift_pause(led) is True
    assert [s.task_keys for s in run_plan(led).submissions] == [("100_2",)]


def test_billing_already_handled_does_not_pause_again_after_resume() -> None:
    bill = failed("100_1", "billing", resubmit="not_retryable")
    led = ledger_of(bill, failed("100_2"))
    p = run_plan(led)
    assert p.pause_reason is None and len(p.submissions) == 1


def test_cap_counts_attempts_over_the_whole_lineage() -> None:
    st = settings()
    cap = st.resubmit.types[ErrorType.RATE_LIMIT].max_attempts
    at_cap = failed("500_1", attempt=cap, origin="100_1", parent="400_1")
    below = failed("500_2", attempt=cap - 1, origin="100_2", parent="400_2")
    p = run_plan(ledger_of(at_cap, below), st)
    assert statuses(p) == {"500_1": "cap_reached"}
    assert [s.task_keys for s in p.submissions] == [("500_2",)]
    assert p.submissions[0].attempt == cap


def test_disabled_type_and_resubmission_off() -> None:
    led = ledger_of(failed("100_1", "json_parse"))
    p = run_plan(led)
    assert statuses(p) == {"100_1": "disabled"}
    # the manual command may ask for an opt-in type explicitly
    p2 = run_plan(led, manual=True, types=[ErrorType.JSON_PARSE])
    assert len(p2.submissions) == 1
    off = run_plan(ledger_of(failed("100_2")), settings(enabled=False))
    assert statuses(off) == {"100_2": "disabled"} and off.submissions == []


def test_time_limit_hung_is_never_retried_even_when_enabled() -> None:
    st = settings(types={"time_limit": {"enabled": True}})
    led = ledger_of(failed("100_1", "time_limit", hung=True), failed("100_2", "time_limit"))
    p = run_plan(led, st)
    assert statuses(p) == {"100_1": "hung"}
    assert [s.task_keys for s in p.submissions] == [("100_2",)]


def test_only_the_users_own_jobs() -> None:
    led = ledger_of(failed("100_1", user="bob"), failed("100_2", user=""))
    p = run_plan(led)
    assert p.submissions == []
    assert statuses(p) == {"100_1": "not_retryable", "100_2": "not_retryable"}


def test_hourly_cap_defers_the_rest() -> None:
    st = settings(max_per_hour=3)
    led = ledger_of(failed("100_1"), failed("200_1"), failed("300_1"))
    led.resubmit.submission_times = [iso(NOW - timedelta(minutes=m)) for m in (10, 70)]
    p = run_plan(led, st)
    assert len(p.submissions) == 2  # the 70-minute-old one no longer counts
    assert list(statuses(p).values()) == ["deferred"]


def test_cannot_rebuild_without_submit_line_then_scripts_table() -> None:
    led = ledger_of(failed("100_1", submit_line=""))
    p = run_plan(led)
    assert statuses(p) == {"100_1": "cannot_rebuild"}
    assert "cannot rebuild the submit command" in p.decisions[0].note
    st = settings(scripts=[{"job_name": "tt*", "script": "run.sh", "args": ["--x"]}])
    p2 = run_plan(led, st)
    assert p2.submissions[0].argv("t")[-2:] == ["run.sh", "--x"]


def test_ambiguous_submit_line_is_cannot_rebuild() -> None:
    led = ledger_of(failed("100_1", submit_line="sbatch --comment=a b run.sh"))
    p = run_plan(led, exists=lambda path: path.endswith("/run.sh"))
    assert statuses(p) == {"100_1": "cannot_rebuild"}


def test_missing_script_is_cannot_rebuild() -> None:
    p = run_plan(ledger_of(failed("100_1")), exists=lambda path: False)
    assert statuses(p) == {"100_1": "cannot_rebuild"}
    assert "script not found: /w/run.sh" in p.decisions[0].note


def test_unresolved_intent_blocks_its_tasks() -> None:
    led = ledger_of(failed("100_1", resubmit="pending"), failed("100_2"))
    led.intents["i1"] = SubmitIntent(
        intent_id="i1", created_at=iso(NOW), origin_job_id="100", task_keys=["100_1"],
        array_spec="1", argv=["sbatch"], work_dir="/w", error_type="rate_limit", attempt=2,
    )  # fmt: skip
    p = run_plan(led)
    assert [s.task_keys for s in p.submissions] == [("100_2",)]


def test_terminal_and_recovered_records_are_left_alone() -> None:
    led = ledger_of(
        failed("100_1", resubmit="submitted", retried_as="900_1"),
        failed("100_2", recovered_by="900_2"),
        failed("100_3", resubmit="cap_reached"),
    )
    p = run_plan(led)
    assert p.submissions == [] and p.decisions == []


def test_filters_by_type_and_job() -> None:
    led = ledger_of(failed("100_1"), failed("100_2", "network"), failed("200_1"))
    p = run_plan(led, manual=True, types=[ErrorType.NETWORK])
    assert [s.task_keys for s in p.submissions] == [("100_2",)]
    p = run_plan(led, manual=True, jobs=["200"])
    assert [s.task_keys for s in p.submissions] == [("200_1",)]


def test_backoff_is_exponential_capped_and_jittered() -> None:
    pol = TypePolicy(enabled=True, base_delay_s=100, max_delay_s=1000)
    rng = random.Random(1)
    delays = [backoff_delay_s(pol, a, storm_factor=1, jitter=0, rng=rng) for a in (1, 2, 3, 4, 5)]
    assert delays == [100, 200, 400, 800, 1000]
    assert backoff_delay_s(pol, 2, storm_factor=4, jitter=0, rng=rng) == 800
    jittered = {backoff_delay_s(pol, 1, storm_factor=1, jitter=0.2, rng=rng) for _ in range(200)}
    assert min(jittered) >= 80 and max(jittered) <= 120 and len(jittered) > 10


def test_begin_delay_uses_type_policy_and_storm_stretches_everyone() -> None:
    st = settings(storm_threshold=3, storm_window_s=600, storm_factor=4.0)
    base = st.resubmit.types[ErrorType.NETWORK].base_delay_s
    calm = run_plan(ledger_of(failed("100_1", "network")), st)
    assert calm.storm is False
    assert calm.submissions[0].begin_delay_s == round(base)
    assert f"--begin=now+{round(base)}" in calm.submissions[0].argv("t")
    stormy = ledger_of(
        failed("100_1", "network"),
        *(failed(f"300_{i}", resubmit="submitted", retried_as=f"9_{i}") for i in range(3)),
    )
    p = run_plan(stormy, st)
    assert p.storm is True
    assert p.submissions[0].begin_delay_s == round(base * 4)
    # rate-limit failures older than the window do not make a storm
    old = ledger_of(
        failed("100_1", "network"),
        *(failed(f"3_{i}", minutes_ago=30, resubmit="cap_reached") for i in range(3)),
    )
    assert run_plan(old, st).storm is False


def test_oom_escalates_mem_up_to_the_ceiling() -> None:
    st = settings(
        types={"oom": {"enabled": True, "escalate_factor": 2.0, "escalate_ceiling": "6G"}}
    )
    led = ledger_of(failed("100_1", "oom", submit_line="sbatch --mem=4G run.sh"))
    sub = run_plan(led, st).submissions[0]
    assert sub.overrides == (("mem", "6G"),)
    assert "--mem=6G" in sub.argv("t") and "--mem=4G" not in sub.argv("t")


def test_time_limit_escalates_time_from_the_command_or_elapsed() -> None:
    st = settings(types={"time_limit": {"enabled": True, "escalate_factor": 2.0}})
    with_t = failed("100_1", "time_limit", submit_line="sbatch -t 01:00:00 run.sh")
    no_t = failed("200", "time_limit", submit_line="sbatch run.sh", elapsed_s=1800)
    subs = {s.job_id: s for s in run_plan(ledger_of(with_t, no_t), st).submissions}
    assert "--time=02:00:00" in subs["100"].argv("t")
    assert "--time=01:00:00" in subs["200"].argv("t")


def test_plan_does_not_mutate_the_ledger() -> None:
    led = ledger_of(failed("100_1"), failed("100_2", "billing"))
    before = {k: r.to_json() for k, r in led.jobs.items()}
    run_plan(led)
    assert {k: r.to_json() for k, r in led.jobs.items()} == before
    assert led.resubmit.paused is False and led.dirty is False
