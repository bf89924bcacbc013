"""The engine's shape cache (vLLM CPU's per-token-count kernel set-up): an LRU charged per step."""

import dataclasses

import numpy as np
import pytest

from simulator.engine.loop import simulate
from simulator.engine.shape_cache import ShapeCache
from simulator.records.engine_config import EngineConfig
from simulator.records.performance import ShapeCacheCost, StepBatch
from tests.simulator.conftest import VectorLinearModel, make_workload
from tests.simulator.engine.test_fast_forward import assert_same

MISS = ShapeCacheCost(capacity=3, per_miss_s=0.010, per_miss_token_s=1e-5)


def prefill(tokens: int, decodes: int = 0) -> StepBatch:
    return StepBatch(prefill_tokens=[tokens], prefill_context=[0], decode_context=[100] * decodes,
                     decode_spec_tokens=[0] * decodes)


def test_a_token_count_costs_once_until_it_is_evicted():
    cache = ShapeCache(MISS, warm=[2048])
    assert cache.charge(prefill(2048)) == 0.0  # the engine's warm-up shape
    assert cache.charge(prefill(100)) == pytest.approx(0.010 + 1e-3)
    assert cache.charge(prefill(99, decodes=1)) == 0.0  # the same 100 tokens through the model
    assert cache.charge(StepBatch(decode_context=[5] * 7, decode_spec_tokens=[0] * 7)) == 0.0  # decode-only
    cache.charge(prefill(200))
    cache.charge(prefill(300))  # capacity 3: 2048 (least recent) goes
    assert cache.charge(prefill(2048)) > 0 and cache.charge(prefill(300)) == 0.0
    assert cache.misses == 4


def isolated(lengths: list[int]):
    """Requests far apart (each alone in the engine), prompts of the given lengths in turn."""
    n = len(lengths)
    w = make_workload(n=n, seed=1, rate=0.5, output=(5, 5))
    return dataclasses.replace(w, arrival_s=np.arange(n) * 5.0, prompt_tokens=np.array(lengths))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_first_seen_prompt_lengths_pay_the_miss_and_repeated_ones_do_not(async_scheduling):
    lengths = [100, 200, 300] * 4 + [400 + i for i in range(8)]  # 3 distinct, then 8 new ones
    cfg = EngineConfig(num_gpu_blocks_override=400)
    plain = simulate(isolated(lengths), cfg, VectorLinearModel(), async_scheduling=async_scheduling)
    model = VectorLinearModel()
    model.shape_cache = dataclasses.replace(MISS, capacity=4)
    cached = simulate(isolated(lengths), cfg, model, async_scheduling=async_scheduling)
    extra = cached.requests["ttft_s"] - plain.requests["ttft_s"]
    missed = np.array([i < 3 or i >= 12 for i in range(len(lengths))])
    np.testing.assert_allclose(extra[missed], [MISS.miss_s(n) for n in np.array(lengths)[missed]], rtol=1e-9)
    np.testing.assert_allclose(extra[~missed], 0.0, atol=1e-12)
    report = cached.summary["shape_cache"]  # what the run tells its user
    assert report["misses"] == missed.sum() and report["capacity"] == 4
    assert report["seconds"] == pytest.approx(sum(MISS.miss_s(n) for n in np.array(lengths)[missed]))
    assert "shape_cache" not in plain.summary.sections


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_fast_path_charges_as_the_step_by_step_path(async_scheduling, monkeypatch):
    from simulator.engine import fast_forward

    w = make_workload(n=120, seed=4, rate=8, prompt=(16, 400), output=(20, 300))
    cfg = EngineConfig(num_gpu_blocks_override=300, max_num_seqs=32)
    model = VectorLinearModel()
    model.shape_cache = ShapeCacheCost(capacity=8, per_miss_s=0.003, per_miss_token_s=2e-5)
    slow = simulate(w, cfg, model, async_scheduling=async_scheduling, fast=False)
    runs = []
    apply_run = fast_forward.apply_run

    def counted(sched, run, *args):
        runs.append(run.k)
        return apply_run(sched, run, *args)

    monkeypatch.setattr(fast_forward, "apply_run", counted)
    fast = simulate(w, cfg, model, async_scheduling=async_scheduling, fast=True)
    assert sum(runs) > 1000  # most steps went by runs
    assert_same(slow, fast)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_scheduler_agreement_runs_on_the_engines_clock(async_scheduling):
    """lockstep times steps as the engine does: with a shape cache, the same steps as simulate."""
    from simulator.engine.scheduler_diff import lockstep

    w = make_workload(n=60, seed=6, rate=20, prompt=(16, 400), output=(5, 40))
    cfg = EngineConfig(num_gpu_blocks_override=200, max_num_batched_tokens=512, max_num_seqs=64)
    model = VectorLinearModel()
    model.shape_cache = dataclasses.replace(MISS, capacity=4, per_miss_s=0.05)
    engine_steps = simulate(w, cfg, model, async_scheduling=async_scheduling, fast=False).summary["steps"]
    plain_steps = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False).summary["steps"]
    assert engine_steps != plain_steps  # the charges change which arrivals each step sees
    agreement = lockstep(w, cfg, model, async_scheduling=async_scheduling)
    assert agreement.rate == 1.0 and agreement.steps == engine_steps
