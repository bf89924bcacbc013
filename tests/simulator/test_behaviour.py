"""The simulator responds to load the way a vLLM deployment does."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from simulator.configure import CONF_DIR, build_run
from simulator.engine.loop import simulate


def run(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    spec = build_run(cfg)
    return simulate(spec.workload, spec.engine, spec.perf, slo=spec.slo, seed=spec.seed).summary


def test_burstier_arrivals_worsen_tail_ttft():
    # a small KV cache makes the replica sensitive to bursts: at the same mean rate, cv=4 queues more
    common = ("workload=gamma", "workload.rate=3", "workload.num_requests=400", "workload.seed=1",
              "engine.num_gpu_blocks_override=6000")
    smooth = run(*common, "workload.cv=1")
    bursty = run(*common, "workload.cv=4")
    assert bursty["ttft_s"]["p99"] > smooth["ttft_s"]["p99"]


@pytest.mark.slow
def test_thousand_request_reasoning_workload_preempts_under_kv_pressure():
    common = ("workload=gamma", "workload.rate=1", "workload.cv=2", "workload.num_requests=1000",
              "workload.lengths_file=data/bench/reasoning_lengths_20k.csv")
    roomy = run(*common)
    tight = run(*common, "engine.num_gpu_blocks_override=8000")
    assert roomy["completed"] == tight["completed"] == 1000
    assert tight["preemptions"] > 0 and tight["preemptions"] > roomy["preemptions"]
    assert tight["kv_usage"]["mean"] > roomy["kv_usage"]["mean"]
    assert tight["kv_usage"]["seconds_above_95pct"] > 0
    assert tight["e2e_s"]["p99"] > roomy["e2e_s"]["p99"]
