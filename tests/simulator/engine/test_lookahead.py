"""Speculative lookahead KV slots (vLLM's num_lookahead_tokens): the rule, where the scheduler
applies it, and what it does to preemptions under KV pressure."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from simulator.engine.kv_cache import cdiv
from simulator.engine.loop import simulate
from simulator.engine.native import NativeScheduler
from simulator.engine.request import SimRequest
from simulator.records.engine_config import EngineConfig, SpeculativeConfig, lookahead_tokens
from simulator.records.workload import Workload
from tests.simulator.conftest import LinearModel


def spec(k=4, lookahead=None, rate=0.5):
    return SpeculativeConfig(num_speculative_tokens=k, acceptance_rate=(rate,), proposal_rate=1.0,
                             num_lookahead_tokens=lookahead)


@pytest.mark.parametrize(("method", "flags"), [
    ("ngram", {}), ("eagle", {"use_eagle": True}), ("draft_model", {"uses_draft_model": True}),
    ("dflash", {"use_dflash": True}),
])
def test_the_rule_is_vllms_own(method, flags):
    """Our table against vLLM's VllmConfig.num_lookahead_tokens, evaluated on a config of that kind."""
    vllm_config = pytest.importorskip("vllm.config.vllm")
    k = 4
    answers = {name: flags.get(name, False) for name in ("use_dspark", "use_dflash", "use_eagle", "uses_draft_model")}
    calls = {name: (lambda v=value: v) for name, value in answers.items()}
    fake = SimpleNamespace(num_speculative_tokens=k, speculative_config=SimpleNamespace(
        **calls, draft_model_config=SimpleNamespace(hf_config=SimpleNamespace())))
    assert lookahead_tokens(method, k) == vllm_config.VllmConfig.num_lookahead_tokens.fget(fake)


def test_ngram_reserves_no_lookahead_and_an_override_does():
    assert spec().lookahead == 0  # n-gram drafts get slots as scheduled tokens, nothing beyond
    assert spec(lookahead=3).lookahead == 3
    assert SpeculativeConfig(num_lookahead_tokens=3).lookahead == 0  # no speculation, no slots


@pytest.mark.parametrize("lookahead", [0, 4, 20])
def test_an_admitted_request_holds_its_tokens_plus_the_lookahead(lookahead):
    """vLLM's allocate_slots: blocks for computed + new + lookahead tokens (known case)."""
    config = EngineConfig(block_size=16, max_model_len=1024, speculative=spec(lookahead=lookahead))
    sched = NativeScheduler(config, num_blocks=64, async_scheduling=False)
    sched.add_request(SimRequest(0, 0.0, 30, 100, block_size=16))
    out = sched.schedule()
    assert out.num_scheduled[0] == 30
    assert sched.kv.num_blocks_of(0) == cdiv(30 + lookahead, 16)


def preemptions(lookahead: int) -> int:
    """Ten requests of 90 + 64 tokens at once on a cache of exactly their 10 x 10 blocks: n-gram
    drafts (4 slots at most past the 154 tokens) still fit; lookahead slots past them do not."""
    n = 10
    workload = Workload(arrival_s=np.zeros(n), prompt_tokens=np.full(n, 90), output_tokens=np.full(n, 64),
                        reasoning_tokens=np.full(n, 32), domain=np.full(n, "math", object))
    config = EngineConfig(block_size=16, max_model_len=1024, num_gpu_blocks_override=1 + 10 * n,
                          max_num_batched_tokens=2048, speculative=spec(lookahead=lookahead, rate=0.3))
    result = simulate(workload, config, LinearModel(), seed=0)
    assert result.summary["completed"] == n
    return int(result.summary["preemptions"])


def test_lookahead_slots_raise_preemptions_under_kv_pressure():
    assert preemptions(0) == 0
    assert preemptions(8) > 0
