"""The pure Slack message builder: grouping, limits, escaping, golden output.

Golden files: tests/golden/slack/*.json. After an intended change to the message
layout, regenerate them with ``UPDATE_GOLDEN=1 pytest tests/test_notify_build.py`` and
review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from daemon.model import expand_ranges
from daemon.notify_build import (
    MAX_BLOCKS,
    MAX_HEADER,
    MAX_SECTION,
    MAX_TEXT,
    build_billing_alert,
    build_digest,
    build_recovery,
    group_records,
)
from daemon.records import JobRecord

GOLDEN = Path(__file__).parent / "golden" / "slack"
RATE_LIMIT_LINE = (
    "openai.RateLimitError: Error code: 429 - {'error': {'message': 'Rate limit reached'}}"
)


def failed(
    key: str,
    etype: str = "rate_limit",
    *,
    name: str = "debate_sweep",
    text: str = RATE_LIMIT_LINE,
    line: int | None = 212,
    config: dict[str, Any] | None = None,
    **kw: Any,
) -> JobRecord:
    job_id, _, task = key.partition("_")
    return JobRecord(
        key=key,
        job_id=job_id,
        array_task=int(task) if task else None,
        job_name=name,
        outcome="failure",
        error_type=etype,
        retryable=etype in ("rate_limit", "network"),
        evidence={"text": text, "line_no": line, "source": f"/home/u/logs/{name}_{key}.err"},
        config=config or {},
        **kw,
    )


def check_golden(name: str, payload: Any) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"golden file {path} missing; create it with UPDATE_GOLDEN=1 pytest {__file__}")
    expected = path.read_text(encoding="utf-8")
    assert text == expected, (
        f"Slack output differs from {path}; if the change is intended, run "
        f"UPDATE_GOLDEN=1 pytest {__file__} and review the diff"
    )


def assert_within_limits(text: str, blocks: list[dict[str, Any]]) -> None:
    assert len(blocks) <= MAX_BLOCKS
    assert len(text) <= MAX_TEXT
    for block in blocks:
        if block["type"] == "header":
            assert len(block["text"]["text"]) <= MAX_HEADER
        if block["type"] == "section":
            assert len(block["text"]["text"]) <= MAX_SECTION
        if block["type"] == "context":
            for el in block["elements"]:
                assert len(el["text"]) <= MAX_SECTION


def sample_records() -> list[JobRecord]:
    recs = []
    for t in [*range(38, 48), 49]:
        recs.append(
            failed(
                f"4512_{t}",
                config={"reasoning_model": "o3-mini", "competition_level": t % 2},
                resubmit="submitted",
                retried_as=f"4620_{t}",
                next_retry_at="2025-03-01T14:10:00+00:00",
            )
        )
    recs.append(
        failed(
            "4512_3",
            "code_error",
            text="KeyError: 'reasoning_token_budget'",
            line=88,
            config={"reasoning_model": "o3-mini", "competition_level": 1},
            resubmit="not_retryable",
        )
    )
    recs.append(
        failed(
            "4513",
            "network",
            name="eval_single",
            text="httpx.ConnectError: [Errno 111] Connection refused",
            line=40,
            resubmit="cap_reached",
            attempt=3,
        )
    )
    return recs


def test_digest_groups_by_type_then_job_with_compressed_ranges() -> None:
    text, blocks = build_digest(sample_records(), resubmit_enabled=True)
    sections = [b["text"]["text"] for b in blocks if b["type"] == "section"]
    # code_error first: it needs a human; then the retryable ones
    assert sections[0].startswith("*code_error*")
    rl = next(s for s in sections if s.startswith("*rate_limit*"))
    assert "tasks 38-47,49 (11)" in rl
    assert "resubmitted as job 4620" in rl
    assert "_all:_ reasoning_model=o3-mini" in rl
    assert "competition_level ∈ {" in rl
    net = next(s for s in sections if s.startswith("*network*"))
    assert "retry cap reached" in net and "attempt 3" in net
    assert blocks[0]["text"]["text"] == "🔴 13 failed tasks in 2 jobs"
    assert "rate_limit job 4512 tasks 38-47,49" not in text  # fallback uses its own format
    assert "rate_limit: job 4512 debate_sweep tasks 38-47,49 (11)" in text
    assert_within_limits(text, blocks)


def test_digest_golden() -> None:
    text, blocks = build_digest(sample_records(), resubmit_enabled=True)
    check_golden("digest_small", {"text": text, "blocks": blocks})


def test_merged_digest_note_golden() -> None:
    text, blocks = build_digest(
        sample_records()[:3], note="Delayed: 3 digests from 14:00 to 14:30 UTC merged"
    )
    assert "Delayed: 3 digests" in text
    check_golden("digest_merged", {"text": text, "blocks": blocks})


def test_billing_alert_golden() -> None:
    recs = [
        failed(
            f"4700_{t}",
            "billing",
            text="anthropic.BadRequestError: Your credit balance is too low to access the API",
        )
        for t in (1, 2, 3)
    ]
    text, blocks = build_billing_alert(recs, paused=True)
    assert "paused" in text and "credit balance is too low" in text
    check_golden("billing_alert", {"text": text, "blocks": blocks})


def test_recovery_golden() -> None:
    recs = [failed(f"4512_{t}", recovered_by=f"4620_{t}") for t in (38, 39, 40, 47)]
    text, blocks = build_recovery(recs, {})
    assert "job 4512 tasks 38-40,47 (by job 4620)" in text
    check_golden("recovery", {"text": text, "blocks": blocks})


def test_large_batch_is_one_message_within_slack_limits() -> None:
    long = "Traceback line " + "x" * 10_000 + " <!channel> & more"
    recs = []
    types = ["rate_limit", "network", "code_error", "oom", "unknown"]
    for job in range(300):
        for t in range(0, 40, 3):
            recs.append(
                failed(
                    f"{9000 + job}_{t}",
                    types[job % len(types)],
                    name="n" * 300,
                    text=long,
                    config={f"field{i}": "v" * 200 + str(t) for i in range(10)},
                )
            )
    text, blocks = build_digest(recs, max_groups=20)
    assert_within_limits(text, blocks)
    overflow = blocks[-1]["text"]["text"]
    assert "… and 280 more groups" in overflow
    # user text can never ping the channel or inject links
    raw = json.dumps(blocks, ensure_ascii=False)
    assert "<!channel>" not in raw


def test_ranges_in_digest_cover_every_task_exactly_once() -> None:
    recs = [failed(f"5000_{t}") for t in range(0, 500, 1) if t % 7]
    _, blocks = build_digest(recs)
    section = next(b["text"]["text"] for b in blocks if b["type"] == "section")
    ranges = section.split("tasks ", 1)[1].split(" (", 1)[0]
    assert sorted(expand_ranges(ranges)) == [r.array_task for r in recs]


def test_backticks_and_mentions_in_evidence_are_neutralised() -> None:
    rec = failed("1_1", text="ValueError: bad `json` <@U123> <https://evil|click>")
    _, blocks = build_digest([rec])
    section = blocks[2]["text"]["text"]
    assert "<@U123>" not in section and "<https://" not in section
    assert "&lt;@U123&gt;" in section
    assert "`json`" not in section  # would end the code span early


def test_plain_jobs_and_mixed_evidence() -> None:
    recs = [
        failed("77", "unknown", text="Segmentation fault", line=None),
        failed("78", "unknown", text="Bus error"),
    ]
    groups = group_records(recs)
    assert [g.job_id for g in groups] == ["77", "78"]
    text, _ = build_digest(recs)
    assert "job 77 debate_sweep the whole job" in text
