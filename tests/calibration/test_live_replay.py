"""Check 3: replay the RTX PRO 6000 Llama-3.1-8B live vLLM run through the simulator.

The step-time model is LLMServingSim's layer profile of that card and model
(never fitted to this run). Tolerances, and why:

- TTFT and E2E p50/p99 within 15%. The run is queue-dominated (up to ~100
  requests waiting, TTFT p50 ~9 s), so TTFT integrates every step time before
  it; vLLM's own run-to-run spread at such load is ~10% (../shared/vllm-cpu.md).
  Seen: TTFT p50 -6.5%, p99 -0.2%, E2E p50 -0.3%, p99 -0.5%.
- Running and waiting requests on the run's 1 s grid: mean absolute error
  within 5% of the live mean for running and 10% for waiting. Seen: 0.9 of
  ~95 running, 0.8 of ~31 waiting.
- KV usage on the 1 s grid: the live series' kv_cache_pct is 0 throughout (not
  captured) and meta.json has no num_gpu_blocks, so the live usage is
  reconstructed from the request timestamps against vLLM's sizing of the
  card's cache (see calibration/live_replay.py). Mean absolute error below 3
  points of usage, peak within 15%. Seen: 0.5 points; peaks 29.3% vs 30.1%.
"""

from __future__ import annotations

import numpy as np
import pytest

from calibration.live_replay import (
    live_engine_config,
    live_workload,
    load_live_run,
    reconstructed_kv_blocks,
    replay,
)
from simulator.records.errors import ConfigError


@pytest.fixture(scope="module")
def report():
    return replay()


def test_latency_percentiles(report):
    for key in ("ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99"):
        assert abs(report.latency[key]["rel_error"]) < 0.15, (key, report.latency[key])


def test_running_and_waiting_over_time(report):
    running, waiting = report.series["running"], report.series["waiting"]
    assert running["mae"] < 0.05 * running["live_mean"]
    assert waiting["mae"] < 0.10 * waiting["live_mean"]


def test_kv_usage_over_time(report):
    kv = report.series["kv_usage"]
    assert kv["mae"] < 0.03
    assert kv["sim_peak"] == pytest.approx(kv["live_peak"], rel=0.15)
    assert report.kv_capacity_blocks > 0
    assert report.perf_model.startswith("llmservingsim:RTXPRO6000")


def test_live_run_reading():
    run = load_live_run()
    assert len(run.arrival_s) == 300 and run.arrival_s[0] == 0.0
    assert np.all(np.diff(run.arrival_s) >= 0)
    assert np.all(run.first_token_s >= run.scheduled_s) and np.all(run.last_token_s >= run.first_token_s)
    workload = live_workload(run)
    assert int(workload.output_tokens.sum()) == int(run.output_tokens.sum())
    config = live_engine_config(run)
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (128, 2048)
    # the reconstruction holds no blocks before the first arrival and after the last token
    grid = np.array([-1.0, run.last_token_s.max() + 1.0])
    assert reconstructed_kv_blocks(run, grid, 16).tolist() == [0.0, 0.0]


def test_missing_run_files(tmp_path):
    with pytest.raises(ConfigError, match="requests.jsonl"):
        load_live_run(tmp_path)


def test_a_workload_from_the_api_servers_arrivals():
    """The client view's replay: requests in the API server's order, from 0, with their own token counts."""
    from dataclasses import replace

    run = load_live_run()
    api = np.array([0.5, 0.2, 0.9] + [1.0 + i for i in range(len(run.arrival_s) - 3)])
    workload = live_workload(replace(run, api_arrival_s=api), at_api_server=True)
    assert workload.arrival_s[0] == 0.0 and np.all(np.diff(workload.arrival_s) >= 0)
    assert workload.arrival_s[:3].tolist() == pytest.approx([0.0, 0.3, 0.7])
    assert workload.prompt_tokens[:3].tolist() == run.prompt_tokens[[1, 0, 2]].tolist()
    assert workload.output_tokens[:3].tolist() == run.output_tokens[[1, 0, 2]].tolist()
    with pytest.raises(ConfigError, match="arrival_time"):
        live_workload(replace(run, api_arrival_s=None), at_api_server=True)
