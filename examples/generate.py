import json
import pathlib

# Regenerates the example tree: python examples/generate.py
root = pathlib.Path(__file__).resolve().parent
logs = root / "logs"
res = root / "results" / "ttc_scaling_20260125"
(res / "configs").mkdir(parents=True, exist_ok=True)
logs.mkdir(parents=True, exist_ok=True)

MODELS = ["claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5"]
BASE = ["gpt-4o-2024-08-06", "qwen3-235b-a22b"]


def cfg(i):
    return {
        "experiment": "ttc_scaling_20260125",
        "task_index": i,
        "reasoning_model": MODELS[0] if i in (2, 3, 15, 16) else MODELS[i % 3],
        "baseline_model": BASE[i % 2],
        "model_order": "reasoning_first" if i % 2 == 0 else "baseline_first",
        "reasoning_token_budget": [1024, 4096, 16384][i % 3],
        "competition_level": ["easy", "medium", "hard"][(i // 3) % 3],
        "n_rounds": 5,
        "seed": 1000 + i,
    }


for i in range(18):
    p = res / "configs" / f"config_{i:04d}.json"
    if i == 13:
        # malformed on purpose: a trailing comma and a cut-off file
        p.write_text(
            '{\n  "experiment": "ttc_scaling_20260125",\n  "task_index": 13,\n  "reasoning_model": "claude-opus-4-1",\n  "baseline_model": "qwen3-235b-a22b",\n'
        )
    else:
        p.write_text(json.dumps(cfg(i), indent=2) + "\n")


def head_err(job, task, raw, node):
    c = cfg(task)
    return f"""2026-01-25 14:01:{10 + task:02d},112 INFO __main__: Starting experiment ttc_scaling_20260125 task {task} (SLURM_JOB_ID={raw}, SLURM_ARRAY_JOB_ID={job}, SLURM_ARRAY_TASK_ID={task})
2026-01-25 14:01:{10 + task:02d},113 INFO __main__: host={node} CUDA_VISIBLE_DEVICES=0 HTTPX_TIMEOUT=600
2026-01-25 14:01:{10 + task:02d},540 INFO __main__: loaded config configs/config_{task:04d}.json: reasoning_model={c["reasoning_model"]} baseline_model={c["baseline_model"]} budget={c["reasoning_token_budget"]}
wandb: Currently logged in as: ttc-lab. Use `wandb login --relogin` to force relogin
wandb: Tracking run with wandb version 0.19.1
wandb: Run data is saved locally in /scratch/gpfs/ttc/wandb/run-20260125_140112-{raw}
"""


def head_out(task):
    return f"""============================================================
TTC scaling experiment  task={task}
============================================================
Loading problems from data/competition_{cfg(task)["competition_level"]}.jsonl ... 240 problems
"""


def rounds(task, n, tokens=4290):
    lines = []
    for r in range(1, n + 1):
        pct = int(100 * r / 5)
        lines.append(
            f"Round {r}/5:  {pct:3d}%|{'█' * (pct // 10)}{' ' * (10 - pct // 10)}| {r}/5 [{r * 41:02d}:{r * 7 % 60:02d}<{(5 - r) * 41:02d}:00, 41.2s/it]"
        )
        lines.append(
            f"  reasoning model answered (input_tokens={tokens + r}, output_tokens={5030 + 17 * r}) -> saved outputs/round_{500 + r}.json"
        )
    return "\n".join(lines) + "\n"


def httpx_ok(task, n=3):
    return "".join(
        f'2026-01-25 14:02:{(7 * task + k) % 60:02d},301 INFO httpx: HTTP Request: POST https://api.anthropic.com/v1/messages "HTTP/1.1 200 OK"\n'
        for k in range(n)
    )


RETRY_NOISE = (
    '2026-01-25 14:03:12,402 INFO httpx: HTTP Request: POST https://api.anthropic.com/v1/messages "HTTP/1.1 429 Too Many Requests"\n'
    "2026-01-25 14:03:12,403 INFO anthropic._base_client: Retrying request to /v1/messages in 2.100000 seconds\n"
    '2026-01-25 14:03:14,690 INFO httpx: HTTP Request: POST https://api.anthropic.com/v1/messages "HTTP/1.1 200 OK"\n'
)
WANDB_WARN = "wandb: Network error (ConnectionError), entering retry loop.\n"


def tb(frames, last):
    out = "Traceback (most recent call last):\n"
    for f, ln, fn, code in frames:
        out += f'  File "{f}", line {ln}, in {fn}\n    {code}\n'
    return out + last + "\n"


APP = [
    ("/home/ttc/ttc/run_experiment.py", 212, "<module>", "main()"),
    ("/home/ttc/ttc/run_experiment.py", 198, "main", "result = run_rounds(cfg, client)"),
    (
        "/home/ttc/ttc/rounds.py",
        87,
        "run_rounds",
        "reply = ask_reasoning_model(client, prompt, budget=cfg.reasoning_token_budget)",
    ),
]
ANTH = [
    (
        "/home/ttc/ttc/models.py",
        54,
        "ask_reasoning_model",
        "resp = client.messages.create(**kwargs)",
    ),
    (
        "/home/ttc/.venv/lib/python3.11/site-packages/anthropic/_utils/_utils.py",
        283,
        "wrapper",
        "return func(*args, **kwargs)",
    ),
    (
        "/home/ttc/.venv/lib/python3.11/site-packages/anthropic/resources/messages/messages.py",
        978,
        "create",
        "return self._post(",
    ),
    (
        "/home/ttc/.venv/lib/python3.11/site-packages/anthropic/_base_client.py",
        1290,
        "post",
        "return cast(ResponseT, self.request(cast_to, opts, stream=stream, stream_cls=stream_cls))",
    ),
    (
        "/home/ttc/.venv/lib/python3.11/site-packages/anthropic/_base_client.py",
        1085,
        "request",
        "raise self._make_status_error_from_response(err.response) from None",
    ),
]

SUCCESS_OUT = "✅ CONSENSUS REACHED after {r} rounds (agreement=0.83)\n✅ Experiment results saved to results/ttc_scaling_20260125/task_{t:04d}.json\n"


def write(job, task, raw, node, err_body, out_body, prefix="ttc_claude"):
    stem = f"{prefix}_{job}_{task}" if task is not None else f"{prefix}_{job}"
    (logs / f"{stem}.err").write_text(
        head_err(job, task if task is not None else 0, raw, node) + err_body
    )
    (logs / f"{stem}.out").write_text(out_body)


J = 4150554


def raw(t):
    return str(J + 1 + t)


def node(t):
    return f"della-r{1 + t % 4}c{1 + t % 3}n{2 + t % 7}"


# 0: success, with recovered client retries and decoys (429 in token counts, round_503.json)
write(
    J,
    0,
    raw(0),
    node(0),
    httpx_ok(0)
    + RETRY_NOISE
    + httpx_ok(0, 2)
    + "2026-01-25 14:06:40,118 INFO __main__: all rounds done\n",
    head_out(0) + rounds(0, 3) + SUCCESS_OUT.format(r=3, t=0),
)
# 1: experiment outcome "no consensus" is not a failure
write(
    J,
    1,
    raw(1),
    node(1),
    httpx_ok(1)
    + WANDB_WARN
    + "2026-01-25 14:08:02,551 WARNING __main__: no consensus after 5 rounds (agreement=0.41); recording disagreement\n",
    head_out(1)
    + rounds(1, 5)
    + "❌ NO CONSENSUS after 5 rounds (agreement=0.41)\n✅ Experiment results saved to results/ttc_scaling_20260125/task_0001.json\n",
)
# 2: rate_limit (anthropic RateLimitError, retries exhausted)
RL = (
    "anthropic.RateLimitError: Error code: 429 - {'type': 'error', 'error': {'type': 'rate_limit_error', 'message': "
    "'This request would exceed the rate limit for your organization (a6f1c3e2-0d1b-4c55-9f3e-2b8f1e7d4c21) of 400,000 input tokens per minute. "
    "For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response headers for current usage. "
    "Please reduce the prompt length or the maximum tokens requested, or try again later. You may also contact sales at "
    "https://www.anthropic.com/contact-sales to discuss your options for a rate limit increase.'}}"
)
rl_err = (
    httpx_ok(2, 2)
    + RETRY_NOISE.replace("2.100000", "0.874000")
    + (
        '2026-01-25 14:04:51,019 INFO httpx: HTTP Request: POST https://api.anthropic.com/v1/messages "HTTP/1.1 429 Too Many Requests"\n'
        "2026-01-25 14:04:51,020 INFO anthropic._base_client: Retrying request to /v1/messages in 1.700000 seconds\n"
        '2026-01-25 14:04:52,771 INFO httpx: HTTP Request: POST https://api.anthropic.com/v1/messages "HTTP/1.1 429 Too Many Requests"\n'
    )
    + tb(APP + ANTH, RL)
)
write(J, 2, raw(2), node(2), rl_err, head_out(2) + rounds(2, 2))
# 3: rate_limit, later recovered by the re-run job
write(J, 3, raw(3), node(3), rl_err.replace("14:04:5", "14:05:1"), head_out(3) + rounds(3, 1))
# 4: network (httpx connect error wrapped by openai client)
NET = tb(
    [
        (
            "/home/ttc/.venv/lib/python3.11/site-packages/httpx/_transports/default.py",
            101,
            "map_httpcore_exceptions",
            "yield",
        ),
        (
            "/home/ttc/.venv/lib/python3.11/site-packages/httpcore/_backends/sync.py",
            206,
            "connect_tcp",
            "sock = socket.create_connection(",
        ),
    ],
    "httpcore.ConnectError: [Errno 111] Connection refused",
)
NET += "\nThe above exception was the direct cause of the following exception:\n\n"
NET += tb(
    [
        *APP,
        (
            "/home/ttc/ttc/models.py",
            71,
            "ask_baseline_model",
            "resp = client.chat.completions.create(**kwargs)",
        ),
        (
            "/home/ttc/.venv/lib/python3.11/site-packages/openai/_base_client.py",
            1014,
            "request",
            "raise APIConnectionError(request=request) from err",
        ),
    ],
    "openai.APIConnectionError: Connection error.",
)
write(
    J,
    4,
    raw(4),
    node(4),
    httpx_ok(4)
    + "2026-01-25 14:05:31,880 INFO openai._base_client: Retrying request to /chat/completions in 0.412000 seconds\n"
    + NET,
    head_out(4) + rounds(4, 2),
)
# 5: empty_response
write(
    J,
    5,
    raw(5),
    node(5),
    httpx_ok(5)
    + "2026-01-25 14:06:02,004 WARNING ttc.models: Model returned empty content string. finish_reason=None\n"
    + tb(
        [
            *APP,
            (
                "/home/ttc/ttc/models.py",
                63,
                "ask_reasoning_model",
                'raise EmptyResponseError(f"Model returned empty content string. finish_reason={resp.stop_reason}")',
            ),
        ],
        "ttc.models.EmptyResponseError: Model returned empty content string. finish_reason=None",
    ),
    head_out(5) + rounds(5, 3),
)
# 6: node_fail
write(
    J,
    6,
    raw(6),
    node(6),
    httpx_ok(6)
    + f"slurmstepd: error: *** JOB {raw(6)} ON {node(6)} CANCELLED AT 2026-01-25T14:07:12 DUE TO NODE FAILURE, SEE SLURMCTLD LOG FOR DETAILS ***\n",
    head_out(6) + rounds(6, 2),
)
# 7: preempted
write(
    J,
    7,
    raw(7),
    node(7),
    httpx_ok(7)
    + f"slurmstepd-{node(7)}: error: *** JOB {raw(7)} ON {node(7)} CANCELLED AT 2026-01-25T14:07:40 DUE TO PREEMPTION ***\n",
    head_out(7) + rounds(7, 1),
)
# 8: json_parse
write(
    J,
    8,
    raw(8),
    node(8),
    httpx_ok(8)
    + "2026-01-25 14:06:55,310 ERROR ttc.parsing: Failed to parse thinking response as JSON: Expecting ',' delimiter: line 1 column 87 (char 86)\n"
    + tb(
        [
            *APP,
            ("/home/ttc/ttc/parsing.py", 33, "parse_thinking", "return json.loads(text)"),
            (
                "/usr/lib/python3.11/json/__init__.py",
                346,
                "loads",
                "return _default_decoder.decode(s)",
            ),
            (
                "/usr/lib/python3.11/json/decoder.py",
                337,
                "decode",
                "obj, end = self.raw_decode(s, idx=_w(s, 0))",
            ),
            (
                "/usr/lib/python3.11/json/decoder.py",
                353,
                "raw_decode",
                "obj, end = self.scan_once(s, idx)",
            ),
        ],
        "json.decoder.JSONDecodeError: Expecting ',' delimiter: line 1 column 87 (char 86)",
    ),
    head_out(8) + rounds(8, 2),
)
# 9: time_limit
write(
    J,
    9,
    raw(9),
    node(9),
    httpx_ok(9, 5)
    + f"slurmstepd: error: *** JOB {raw(9)} ON {node(9)} CANCELLED AT 2026-01-25T16:01:32 DUE TO TIME LIMIT ***\n",
    head_out(9) + rounds(9, 4),
)
# 10: oom (CUDA)
write(
    J,
    10,
    raw(10),
    node(10),
    "2026-01-25 14:02:03,551 INFO ttc.local: loading Qwen/Qwen2.5-32B-Instruct on cuda:0 (bf16)\n"
    "Loading checkpoint shards: 100%|██████████| 17/17 [01:12<00:00,  4.26s/it]\n"
    + tb(
        [
            *APP,
            (
                "/home/ttc/ttc/local_model.py",
                120,
                "generate",
                "out = self.model.generate(**inputs, max_new_tokens=budget)",
            ),
            (
                "/home/ttc/.venv/lib/python3.11/site-packages/torch/nn/modules/module.py",
                1751,
                "_call_impl",
                "return forward_call(*args, **kwargs)",
            ),
        ],
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.25 GiB of which 1.12 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. Of the allocated memory 75.40 GiB is allocated by PyTorch, and 1.98 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
    ),
    head_out(10),
)
# 11: billing
write(
    J,
    11,
    raw(11),
    node(11),
    '2026-01-25 14:02:40,007 INFO httpx: HTTP Request: POST https://api.anthropic.com/v1/messages "HTTP/1.1 400 Bad Request"\n'
    + tb(
        APP + ANTH,
        "anthropic.BadRequestError: Error code: 400 - {'type': 'error', 'error': {'type': 'invalid_request_error', 'message': 'Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.'}, 'request_id': 'req_011CUb8sV9r2XkFq3m7pJ1aZ'}",
    ),
    head_out(11),
)
# 12: cancelled by the user (scancel)
write(
    J,
    12,
    raw(12),
    node(12),
    httpx_ok(12)
    + f"slurmstepd: error: *** JOB {raw(12)} ON {node(12)} CANCELLED AT 2026-01-25T14:09:18 ***\n",
    head_out(12) + rounds(12, 2),
)
# 13: code_error (and its config file is malformed)
write(
    J,
    13,
    raw(13),
    node(13),
    tb(
        [
            *APP[:2],
            (
                "/home/ttc/ttc/rounds.py",
                41,
                "run_rounds",
                'budget = cfg_dict["reasoning_token_budget"]',
            ),
        ],
        "KeyError: 'reasoning_token_budget'",
    ),
    head_out(13),
)
# 14: unknown: failed, nothing recognised
write(
    J,
    14,
    raw(14),
    node(14),
    httpx_ok(14)
    + "2026-01-25 14:07:01,914 ERROR ttc.judge: judge worker exited with status 3; aborting task\n",
    head_out(14) + rounds(14, 2),
)
# 15: rate_limit (overloaded_error via APIStatusError)
write(
    J,
    15,
    raw(15),
    node(15),
    httpx_ok(15)
    + '2026-01-25 14:05:44,120 INFO httpx: HTTP Request: POST https://api.anthropic.com/v1/messages "HTTP/1.1 529 "\n'
    + tb(
        APP + ANTH,
        "anthropic.APIStatusError: {'type': 'error', 'error': {'details': None, 'type': 'overloaded_error', 'message': 'Overloaded'}}",
    ),
    head_out(15) + rounds(15, 1),
)
# 16: rate_limit via litellm
write(
    J,
    16,
    raw(16),
    node(16),
    httpx_ok(16)
    + tb(
        [
            *APP,
            (
                "/home/ttc/ttc/models.py",
                90,
                "ask_via_litellm",
                "return litellm.completion(**kwargs)",
            ),
            (
                "/home/ttc/.venv/lib/python3.11/site-packages/litellm/utils.py",
                1213,
                "wrapper",
                "raise e",
            ),
        ],
        'litellm.exceptions.RateLimitError: litellm.RateLimitError: AnthropicException - {"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}',
    ),
    head_out(16) + rounds(16, 2),
)
# 17: network: 502 from the provider (OpenRouter-style)
NET502 = (
    "2026-01-25 14:06:12,773 ERROR ttc.models: provider error: {'message': 'Network connection lost.', 'code': 502, 'metadata': {'provider_name': 'Novita'}}\n"
    + tb(
        [
            *APP,
            (
                "/home/ttc/ttc/models.py",
                112,
                "ask_openrouter",
                'raise ProviderError(f"HTTP {r.status_code}: {r.text[:200]}")',
            ),
        ],
        "ttc.models.ProviderError: HTTP 502: <!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>",
    )
)
write(J, 17, raw(17), node(17), httpx_ok(17) + NET502, head_out(17) + rounds(17, 2))

# The re-run job: tasks 3 (now succeeds) and 17 (fails again)
R = 4151020
write(
    R,
    3,
    str(R + 1),
    node(5),
    httpx_ok(3) + RETRY_NOISE + "2026-01-25 15:12:40,118 INFO __main__: all rounds done\n",
    head_out(3) + rounds(3, 4) + SUCCESS_OUT.format(r=4, t=3),
    prefix="ttc_claude_rerun",
)
write(
    R,
    17,
    str(R + 2),
    node(6),
    httpx_ok(17) + NET502.replace("14:06", "15:14"),
    head_out(17) + rounds(17, 1),
    prefix="ttc_claude_rerun",
)

# A plain (non-array) job named with underscores: a success
(logs / "ttc_summary_plots_4151100.err").write_text(
    "2026-01-25 16:30:02,010 INFO plots: reading 18 result files\n"
    "2026-01-25 16:30:09,442 WARNING plots: task_0013.json missing, skipped\n"
)
(logs / "ttc_summary_plots_4151100.out").write_text(
    "Wrote figures/ttc_scaling_20260125_accuracy.pdf\n✅ Experiment results saved to figures/\n"
)
# Slurm's default name, plain job: a code error
(logs / "slurm-4151200.out").write_text(
    "Traceback (most recent call last):\n"
    '  File "/home/ttc/ttc/aggregate.py", line 3, in <module>\n'
    "    import polars as pl\n"
    "ModuleNotFoundError: No module named 'polars'\n"
)
# Not a job log: a year in the name is not read as a job id
(logs / "notes_2024.err").write_text("scratch notes: job 4150554 had a 429 in task 2\n")
print("ok")
