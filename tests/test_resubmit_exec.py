"""The submit protocol against the stateful fake Slurm (real SlurmRunner, real sbatch argv)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fakeslurm.controller import FakeSlurm
from test_resubmit_helpers import NOW, USER, failed, ledger_of, settings

from daemon.errors import SlurmTimeout
from daemon.ledger import Ledger, encode_ledger, parse_ledger
from daemon.records import JobRecord
from daemon.resubmit import (
    ABANDON_AFTER_S,
    on_classified,
    process_tick,
    reconcile,
)
from daemon.slurm import CommandOutput, SlurmRunner, query_sacct, query_squeue


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSlurm:
    f = FakeSlurm(tmp_path, user=USER, now=NOW)
    f.install(monkeypatch)
    return f


@pytest.fixture
def work(tmp_path: Path) -> Path:
    d = tmp_path / "exp"
    d.mkdir()
    (d / "run.sh").write_text("#!/bin/bash\n#SBATCH --partition=gpu\necho hi\n")
    return d


class SpyRunner:
    """The real runner, plus what the ledger looked like (as saved) when sbatch ran."""

    def __init__(self, saved: list[Ledger]) -> None:
        self.real = SlurmRunner()
        self.saved = saved
        self.seen_at_sbatch: list[Ledger] = []

    def run(self, argv: Sequence[str], **kw: Any) -> CommandOutput:
        if argv and argv[0].endswith("sbatch"):
            self.seen_at_sbatch.append(self.saved[-1] if self.saved else Ledger())
        return self.real.run(argv, **kw)


class StallingRunner:
    """slurmctld stalls before accepting: sbatch is killed at the timeout, no job exists."""

    def run(self, argv: Sequence[str], **kw: Any) -> CommandOutput:
        raise SlurmTimeout(f"{argv[0]} timed out after {kw['timeout']:g} s")


def tick(led: Ledger, st: Any, runner: Any, now: Any = NOW) -> tuple[Any, list[Ledger]]:
    saved: list[Ledger] = []
    if isinstance(runner, SpyRunner):
        saved = runner.saved
    report = process_tick(
        led,
        st,
        runner,
        now,
        lambda: saved.append(parse_ledger(encode_ledger(led))[0]),
        rng=random.Random(3),
    )
    return report, saved


def accepted(fake: FakeSlurm) -> list[dict[str, Any]]:
    return [s for s in fake.submissions() if s["job_id"] is not None]


def test_submit_records_intent_before_sbatch_and_lineage_after(fake: FakeSlurm, work: Path) -> None:
    led = ledger_of(*(failed(f"100_{i}", work_dir=str(work)) for i in (3, 4, 7)))
    spy = SpyRunner([])
    report, saved = tick(led, settings(), spy)
    assert len(report.submitted) == 1
    # what was on disk while sbatch ran: the intent, tasks pending
    on_disk = spy.seen_at_sbatch[0]
    (intent,) = on_disk.intents.values()
    assert intent.state == "intent" and sorted(intent.task_keys) == ["100_3", "100_4", "100_7"]
    assert on_disk.jobs["100_3"].resubmit == "pending"
    # sbatch got an argv list in the original folder
    (sub,) = fake.submissions()
    assert sub["cwd"] == str(work)
    assert (
        "--array=3-4,7%2" in sub["argv"]
        and f"--comment=slurm-triage:{intent.intent_id}" in sub["argv"]
    )
    new = sub["job_id"]
    # after: submitted, children with lineage
    assert led.intents[intent.intent_id].state == "submitted"
    assert led.intents[intent.intent_id].new_job_id == new
    for i in (3, 4, 7):
        parent, child = led.jobs[f"100_{i}"], led.jobs[f"{new}_{i}"]
        assert parent.retried_as == child.key and parent.resubmit == "submitted"
        assert f"resubmitted as job {new}" in parent.resubmit_note
        assert (child.origin, child.parent, child.attempt, child.outcome) == (
            f"100_{i}",
            f"100_{i}",
            2,
            "pending",
        )
    assert saved[-1].intents[intent.intent_id].state == "submitted"
    # the next tick does nothing more
    report2, _ = tick(led, settings(), spy)
    assert report2.outcomes == [] and len(fake.submissions()) == 1


def test_sbatch_refusal_marks_failed_and_tasks_come_back(fake: FakeSlurm, work: Path) -> None:
    led = ledger_of(failed("100_1", work_dir=str(work)))
    fake.fail_next("sbatch", 1, "sbatch: error: Batch job submission failed: Invalid partition")
    report, _ = tick(led, settings(), SlurmRunner())
    assert [o.state for o in report.outcomes] == ["failed"]
    assert "Invalid partition" in (report.failed[0].error or "")
    assert led.jobs["100_1"].resubmit == "submit_failed"
    assert led.jobs["100_1"].attempt == 1  # a refused sbatch does not count as an attempt
    report2, _ = tick(led, settings(), SlurmRunner())
    assert [o.state for o in report2.outcomes] == ["submitted"]
    assert len(accepted(fake)) == 1


def test_missing_sbatch_is_a_clear_failure(fake: FakeSlurm, work: Path) -> None:
    led = ledger_of(failed("100_1", work_dir=str(work)))
    st = settings()
    st.slurm.sbatch = "sbatch-that-does-not-exist"
    report, _ = tick(led, st, SlurmRunner())
    assert report.failed and "not found" in (report.failed[0].error or "")


def _rows(fake: FakeSlurm, st: Any) -> tuple[Any, Any]:
    runner = SlurmRunner()
    sq = query_squeue(runner, st.slurm, user=USER)
    sa = query_sacct(runner, st.slurm, user=USER, start=NOW - timedelta(hours=1))
    return sa, sq


def test_sbatch_that_accepts_then_hangs_is_found_not_duplicated(
    fake: FakeSlurm, work: Path
) -> None:
    st = settings()
    st.slurm.sbatch_timeout_s = 1.0
    led = ledger_of(failed("100_1", work_dir=str(work)), failed("100_2", work_dir=str(work)))
    fake.sbatch_hang_after_submit(5.0)
    report, _ = tick(led, st, SlurmRunner())
    assert [o.state for o in report.outcomes] == ["intent"]
    assert "timed out" in (report.outcomes[0].error or "")
    assert len(accepted(fake)) == 1
    # the next tick: plan must not resubmit while the intent is open ...
    report2, _ = tick(led, st, SlurmRunner())
    assert report2.outcomes == []
    # ... and reconcile finds the job by its tag
    sa, sq = _rows(fake, st)
    rec = reconcile(led, sa, sq, NOW + timedelta(minutes=1))
    new = accepted(fake)[0]["job_id"]
    assert rec.found == [(report.outcomes[0].intent_id, new)]
    assert led.jobs["100_1"].retried_as == f"{new}_1"
    report3, _ = tick(led, st, SlurmRunner())
    assert report3.outcomes == [] and len(fake.submissions()) == 1


def test_unfound_intent_is_abandoned_after_two_ticks_and_grace_then_replanned(
    fake: FakeSlurm, work: Path
) -> None:
    st = settings()
    st.slurm.sbatch_timeout_s = 1.0
    led = ledger_of(failed("100_1", work_dir=str(work)))
    report, _ = tick(led, st, StallingRunner())
    assert [o.state for o in report.outcomes] == ["intent"] and accepted(fake) == []
    (intent,) = led.intents.values()
    sa, sq = _rows(fake, st)
    # a failed query proves nothing
    reconcile(led, None, sq, NOW + timedelta(minutes=1))
    assert intent.checks == 0 and intent.state == "intent"
    reconcile(led, sa, sq, NOW + timedelta(minutes=1))
    reconcile(led, sa, sq, NOW + timedelta(minutes=2))
    assert intent.state == "intent"  # two misses, but still within the grace period
    reconcile(led, sa, sq, NOW + timedelta(seconds=ABANDON_AFTER_S + 1))
    assert intent.state == "abandoned"
    report2, _ = tick(led, st, SlurmRunner(), NOW + timedelta(seconds=ABANDON_AFTER_S + 1))
    assert [o.state for o in report2.outcomes] == ["submitted"]
    assert len(accepted(fake)) == 1


def test_dry_run_runs_no_sbatch_and_reports_once(fake: FakeSlurm, work: Path) -> None:
    led = ledger_of(failed("100_1", work_dir=str(work)))
    st = settings(dry_run=True)
    report, _ = tick(led, st, SlurmRunner())
    assert [o.state for o in report.outcomes] == ["dry_run"]
    assert fake.submissions() == []
    assert led.jobs["100_1"].resubmit == "dry_run"
    assert "would run sbatch --parsable" in led.jobs["100_1"].resubmit_note
    report2, _ = tick(led, st, SlurmRunner())
    assert report2.outcomes == []


def test_resubmission_off_marks_only_retryable_ones(fake: FakeSlurm, work: Path) -> None:
    led = ledger_of(failed("100_1", work_dir=str(work)), failed("100_2", "code_error"))
    report, _ = tick(led, settings(enabled=False), SlurmRunner())
    assert report.outcomes == [] and fake.submissions() == []
    assert led.jobs["100_1"].resubmit == "disabled"
    assert "resubmission is off" in led.jobs["100_1"].resubmit_note
    assert led.jobs["100_2"].resubmit is None


def test_never_submits_billing_code_error_cancelled_unknown(fake: FakeSlurm, work: Path) -> None:
    recs = [failed(f"100_{i}", t, work_dir=str(work)) for i, t in enumerate(
        ["code_error", "cancelled", "unknown", "billing"])]  # fmt: skip
    led = ledger_of(*recs, failed("200_1", work_dir=str(work)))
    report, _ = tick(led, settings(), SlurmRunner())
    assert fake.submissions() == []
    assert report.newly_paused and led.resubmit.paused
    assert led.jobs["200_1"].resubmit == "paused"


def test_shell_metacharacters_reach_sbatch_as_literal_argv(
    fake: FakeSlurm, work: Path, tmp_path: Path
) -> None:
    canary = tmp_path / "pwned"
    line = (
        f"sbatch --job-name=x;touch${{IFS}}{canary} run.sh $(touch {canary}) `touch {canary}` ;id"
    )
    led = ledger_of(failed("100", work_dir=str(work), submit_line=line))
    report, _ = tick(led, settings(), SlurmRunner())
    assert [o.state for o in report.outcomes] == ["submitted"]
    (sub,) = fake.submissions()
    assert f"--job-name=x;touch${{IFS}}{canary}" in sub["argv"]
    tail = sub["argv"][sub["argv"].index("run.sh") + 1 :]
    assert tail == ["$(touch", f"{canary})", "`touch", f"{canary}`", ";id"]
    assert not canary.exists()


def _child(led: Ledger, parent_key: str, outcome: str, etype: str | None = None) -> JobRecord:
    child = led.jobs[led.jobs[parent_key].retried_as or ""]
    child.outcome, child.error_type = outcome, etype
    return child


def test_lineage_closes_recovered_or_cap_reached(fake: FakeSlurm, work: Path) -> None:
    st = settings(types={"rate_limit": {"enabled": True, "max_attempts": 2}})
    led = ledger_of(failed("100_1", work_dir=str(work)), failed("100_2", work_dir=str(work)))
    tick(led, st, SlurmRunner())
    ok = _child(led, "100_1", "success")
    on_classified(led, ok, st, NOW)
    assert led.jobs["100_1"].recovered_by == ok.key
    bad = _child(led, "100_2", "failure", "rate_limit")
    on_classified(led, bad, st, NOW)
    assert bad.resubmit == "cap_reached" and "attempt 2" in bad.resubmit_note
    report, _ = tick(led, st, SlurmRunner())
    assert report.outcomes == [] and len(fake.submissions()) == 1


def test_failed_child_is_resubmitted_with_next_attempt_until_cap(
    fake: FakeSlurm, work: Path
) -> None:
    st = settings(types={"network": {"enabled": True, "max_attempts": 3, "base_delay_s": 10}})
    led = ledger_of(failed("100_5", "network", work_dir=str(work)))
    keys = ["100_5"]
    for _ in range(4):
        tick(led, st, SlurmRunner())
        last = led.jobs[keys[-1]]
        if not last.retried_as:
            break
        child = _child(led, keys[-1], "failure", "network")
        child.user = USER
        on_classified(led, child, st, NOW)
        keys.append(child.key)
    assert [led.jobs[k].attempt for k in keys] == [1, 2, 3]
    assert led.jobs[keys[-1]].resubmit == "cap_reached"
    assert len(fake.submissions()) == 2
    # the second retry's delay doubled
    begins = [a for s in fake.submissions() for a in s["argv"] if a.startswith("--begin=")]
    assert begins == ["--begin=now+10", "--begin=now+20"]
    # the grandchild was rebuilt from the child's own (generated) submit line
    assert led.jobs[keys[2]].origin == "100_5" and led.jobs[keys[2]].parent == keys[1]


def test_child_classified_before_reconcile_still_closes_the_loop(
    fake: FakeSlurm, work: Path
) -> None:
    st = settings()
    st.slurm.sbatch_timeout_s = 1.0
    led = ledger_of(failed("100_1", work_dir=str(work)))
    fake.sbatch_hang_after_submit(5.0)
    tick(led, st, SlurmRunner())
    new = accepted(fake)[0]["job_id"]
    # the tick saw the new job in sacct first and classified it as a fresh success
    seen = JobRecord(key=f"{new}_1", job_id=new, array_task=1, user=USER, outcome="success")
    led.jobs[seen.key] = seen
    sa, sq = _rows(fake, st)
    reconcile(led, sa, sq, NOW)
    assert (seen.origin, seen.parent, seen.attempt) == ("100_1", "100_1", 2)
    assert led.jobs["100_1"].recovered_by == seen.key


def test_success_two_generations_down_recovers_every_ancestor(fake: FakeSlurm, work: Path) -> None:
    st = settings()
    led = ledger_of(failed("100_1", work_dir=str(work)))
    tick(led, st, SlurmRunner())
    child = _child(led, "100_1", "failure", "rate_limit")
    tick(led, st, SlurmRunner())
    grandchild = _child(led, child.key, "success")
    on_classified(led, grandchild, st, NOW)
    assert led.jobs["100_1"].recovered_by == grandchild.key
    assert child.recovered_by == grandchild.key
