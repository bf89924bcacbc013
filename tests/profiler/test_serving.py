"""The profiler's serving phase: its settings, the server it starts, the environment it gets,
and (real engine) what it stores for perf=profile."""

from __future__ import annotations

import json
import os

import pytest

from profiler.serving import (
    PROFILER_ONLY_ENV,
    ServingSettings,
    cli_flags,
    server_engine,
    server_environment,
)
from simulator.records.errors import ConfigError


@pytest.mark.parametrize("kwargs, field", [({"repeats": 0}, "serving.repeats"), ({"servers": "two"}, "serving.servers"),
                                           ({"enabled": "yes"}, "serving.enabled"),
                                           ({"load_requests": -1}, "serving.load_requests"),
                                           ({"pin_frontend": "yes"}, "serving.pin_frontend")])
def test_bad_serving_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        ServingSettings(**kwargs)


def test_the_served_load_is_bursty_fits_the_engine_and_aims_at_its_concurrency():
    import numpy as np

    from profiler.serving import LOAD_CONCURRENCY, LOAD_CV, load_step_s, served_load
    from simulator.records.engine_config import EngineConfig

    engine = EngineConfig(block_size=128, max_num_seqs=128, max_num_batched_tokens=512, max_model_len=1024)
    workload, rate = served_load(400, 0.01, engine, seed=5)
    again, _ = served_load(400, 0.01, engine, seed=5)
    assert np.array_equal(workload.arrival_s, again.arrival_s)  # the seed fixes it
    assert np.all(workload.prompt_tokens <= 512) and np.all(workload.prompt_tokens + workload.output_tokens < 1024)
    # offered load: rate x mean output x step time = the target concurrency
    assert rate * workload.output_tokens.mean() * 0.01 == pytest.approx(LOAD_CONCURRENCY)
    gaps = np.diff(workload.arrival_s)
    assert 0.7 * LOAD_CV < gaps.std() / gaps.mean() < 1.3 * LOAD_CV  # bursty, not Poisson
    sets = [{"decode_probe": [{"batch": 1, "wall_per_step_s": 0.004}, {"batch": 6, "wall_per_step_s": 0.009}]},
            {"decode_probe": [{"batch": 6, "wall_per_step_s": 0.011}], "decode_probe_after": None}]
    assert load_step_s(sets) == 0.011 and load_step_s([{}]) is None  # the batch nearest the target, median


def test_the_server_runs_the_profiled_engine_settings():
    resolved = {"max_num_seqs": 96, "max_num_batched_tokens": 1024, "max_model_len": 4096,
                "enable_prefix_caching": False, "kv_cache_dtype": "fp8", "num_gpu_blocks_override": None}
    engine = server_engine(resolved, {"block_size": 64})
    assert (engine.block_size, engine.max_num_seqs, engine.max_num_batched_tokens, engine.max_model_len) == (
        64, 96, 1024, 4096)
    assert engine.enable_prefix_caching is False and engine.kv_cache_dtype == "fp8"
    flags = cli_flags({"quantization": "int8_per_channel_weight_only", "enable_x": False,
                       "speculative_config": {"method": "ngram"}, "kv_cache_dtype": "fp8"})
    assert flags == ("--quantization", "int8_per_channel_weight_only", "--no-enable-x",
                     "--speculative-config", '{"method": "ngram"}')


def test_the_server_gets_every_cpu_and_none_of_the_in_process_settings(monkeypatch):
    cpus = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    os.sched_setaffinity(0, cpus[:1])
    try:
        with server_environment(cpus):
            assert not any(k in os.environ for k in PROFILER_ONLY_ENV)
            assert sorted(os.sched_getaffinity(0)) == cpus
        assert os.environ["OMP_NUM_THREADS"] == "1" and sorted(os.sched_getaffinity(0)) == cpus[:1]
    finally:
        os.sched_setaffinity(0, cpus)


@pytest.mark.engine
@pytest.mark.slow
def test_the_serving_phase_stores_what_perf_profile_applies(tmp_path):
    """The real thing, small: a reduced grid, then one probe round on `vllm serve` (~60 s)."""
    import math

    from calibration.registry import build_performance_model
    from calibration.serving import ServedModel
    from tests.profiler.engine_runs import engine_available, run_profiler

    if not engine_available():
        pytest.skip("no vLLM engine env (./scripts/setup_vllm_cpu.sh)")
    import tempfile
    from pathlib import Path

    from profiler.run import SERVING_LOGS_PREFIX

    def working_dirs() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob(SERVING_LOGS_PREFIX + "*"))

    before = working_dirs()
    out = tmp_path / "profile"
    result = run_profiler("model=tiny-llama", "grid=smoke", "progress=false", "grid.prefill_chunks=[64]",
                          "grid.prefill_contexts=[256]", "grid.decode_batches=[1,4]", "grid.decode_contexts=[128]",
                          "grid.mixed.requests=0", "engine.max_model_len=2048", "serving.repeats=1",
                          "serving.load_requests=12", "serving.servers=1",
                          "optimization=none", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert working_dirs() <= before  # the servers' logs and the load's run went with the phase
    meta = json.loads((out / "profile.json").read_text())
    serving = meta["serving"]
    assert serving["async_scheduling"] is False  # vLLM's CPU platform serves synchronously
    assert serving["engine"]["max_model_len"] == 2048 and "--max-model-len" in serving["server_command"]
    (probes,) = serving["probes"]
    assert probes["decode_probe"] and probes["request_overhead_s"] is not None
    # each new prompt length sent twice: a cold and a warm TTFT, from which the fit takes the set-up cost,
    # where the engine's linear layers keep per-shape set-up (oneDNN); vLLM's torch fallback has none
    from profiler.live.runner import shape_probe_lengths
    from simulator.records.performance import keeps_shape_cache

    budget = serving["engine"]["max_num_batched_tokens"]
    oneDNN = keeps_shape_cache(meta["engine"]["linear_dispatch"])
    assert serving["shape_probes"] is oneDNN
    expected = sorted(set(shape_probe_lengths(0, budget))) if oneDNN else []
    assert [p["tokens"] for p in probes["shape_probe"] or []] == expected
    assert all(p["cold_s"] > 0 and p["warm_s"] > 0 for p in probes["shape_probe"] or [])
    perf = build_performance_model("h100", "r1-distill-qwen-7b", "none", 1, {"source": "profile", "profile": str(out)})
    assert isinstance(perf, ServedModel) and perf.hardware_label == meta["hardware"]["slug"]
    terms = perf.overheads
    assert all(math.isfinite(v) for v in (terms.per_step_s, terms.per_request_s, terms.request_overhead_s))
    if oneDNN:
        assert perf.shape_cache is not None and "shape probes on `vllm serve`" in perf.shape_cache.source
    else:
        assert perf.shape_cache is None
    assert perf.engine_settings["max_model_len"] == 2048 and perf.engine_settings["async_scheduling"] is False
    (load,) = serving["loads"]  # the served load: every request completed, and the scale fitted to it
    assert len(load["e2e_s"]) == 12 and all(load["completed"]) and min(load["e2e_s"]) > 0
    assert perf.overheads.load_requests == 12 and 0.5 <= perf.overheads.step_scale <= 2.0
    # the real server's log is the replay's order of things: every step's batch is worked out
    from calibration.load_steps import replayed_batches

    batches = replayed_batches(load)
    assert batches is not None and sum(b.num_prefill_tokens for b in batches) == sum(load["prompt_tokens"])


def test_a_live_runs_tables_become_a_load_the_calibration_replays():
    """Two requests (prompts 4 and 3 tokens, outputs 2 and 1): the log's steps replay."""
    import pandas as pd

    from calibration.load_steps import replayed_batches
    from profiler.serving import LOAD_STEP_COLUMNS, load_record

    steps = pd.DataFrame({"ctx_requests": [2, 0], "ctx_tokens": [7, 0], "gen_requests": [0, 1],
                          "gen_tokens": [0, 1], "elapsed_s": [0.012345678912, 0.01], "kv_usage": [0.5, 0.5],
                          "other": [9, 9]})
    summary = {"live": {"inter_step_gap_s": 0.001}, "kv_cache": {"num_blocks": 4, "block_size": 4}}
    load = load_record(pd.Series([0.0, 0.1]), [4, 3], [2, 1], ["completed", "completed"], steps, summary)
    assert set(load["steps"]) == set(LOAD_STEP_COLUMNS) and load["steps"]["elapsed_s"][0] == 0.0123457
    assert load["completed"] == [True, True] and (load["num_blocks"], load["block_size"]) == (4, 4)
    assert load["inter_step_gap_s"] == 0.001
    json.dumps(load)  # plain JSON values (stored in profile.json)
    batches = replayed_batches(load)
    assert batches is not None and batches[0].prefill_tokens == [4, 3] and batches[1].decode_context == [5]
    load["completed"][1] = False
    assert replayed_batches(load) is None


def test_a_drafting_server_s_load_keeps_the_acceptance_its_counters_measured():
    """vLLM's counters (drafts, accepted per position) become the simulator's drafting: acceptance
    per position given the earlier ones, and the share of decode steps that drafted."""
    import numpy as np

    from profiler.serving import load_speculation, served_speculation
    from simulator.records.workload import Workload

    ngram = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}}
    speculative = served_speculation(ngram)
    assert (speculative.method, speculative.num_speculative_tokens) == ("ngram", 3)
    assert served_speculation({}) is None
    assert served_speculation({"speculative_config": {"method": "eagle", "num_speculative_tokens": 3}}) is None
    # 10 requests, 1,010 tokens: 10 from prefill, 1,000 decoded; 200 drafts, 100 + 50 + 25 accepted
    workload = Workload(arrival_s=np.zeros(10), prompt_tokens=np.full(10, 8), output_tokens=np.full(10, 101),
                        reasoning_tokens=np.zeros(10, int), domain=np.full(10, "load", object))
    summary = {"spec_decode": {"drafts": 200, "draft_tokens": 600, "accepted_tokens": 175,
                               "accepted_per_pos": [100, 50, 25]}}
    drafting = load_speculation(summary, workload, speculative)
    assert drafting["acceptance_rate"] == [0.5, 0.5, 0.5]
    assert drafting["proposal_rate"] == pytest.approx(200 / (1010 - 10 - 175), abs=1e-6)  # drafts per decode step
    assert load_speculation(summary, workload, None) is None
    assert load_speculation({"spec_decode": {**summary["spec_decode"], "accepted_per_pos": []}}, workload,
                            speculative) is None
