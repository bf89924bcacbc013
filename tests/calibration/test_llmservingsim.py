"""The LLMServingSim layer-profile model."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from calibration.catalog import load_hardware, load_model
from calibration.llmservingsim import (
    Lattice,
    LLMServingSimPerformanceModel,
    available_profiles,
    find_profile,
)
from simulator.records.errors import ConfigError
from simulator.records.performance import StepBatch


@pytest.fixture(scope="module")
def model():
    key = find_profile("rtxpro6000", "meta-llama/Llama-3.1-8B", 1)
    return LLMServingSimPerformanceModel(key, load_model("llama-3.1-8b"), load_hardware("rtxpro6000"),
                                         max_num_batched_tokens=2048, max_num_seqs=128)


def measured(path, **match):
    with open(path) as fh:
        for row in csv.DictReader(fh):
            if all(int(row[k]) == v for k, v in match.items()):
                return float(row["time_us"])
    raise KeyError(match)


def test_profiles_shipped():
    keys = available_profiles()
    assert [(k.gpu, k.model, k.tp) for k in keys if k.gpu == "RTXPRO6000"] == [
        ("RTXPRO6000", "Qwen/Qwen3-30B-A3B-Instruct-2507", 1),
        ("RTXPRO6000", "Qwen/Qwen3-32B", 1), ("RTXPRO6000", "Qwen/Qwen3-32B", 2),
        ("RTXPRO6000", "meta-llama/Llama-3.1-8B", 1)]
    # a release's profile serves its base model (the same shapes)
    assert find_profile("rtxpro6000", "Qwen/Qwen3-30B-A3B", 1).model == "Qwen/Qwen3-30B-A3B-Instruct-2507"
    with pytest.raises(ConfigError, match="allowed: .*rtxpro6000/meta-llama/Llama-3.1-8B/tp1"):
        find_profile("rtxpro6000", "meta-llama/Llama-3.1-8B", 2)


def test_attention_reproduces_measured_points(model):
    path = model.key.path / "attention.csv"
    cases = [dict(prefill_chunk=0, kv_prefill=0, n_decode=32, kv_decode=1024),
             dict(prefill_chunk=0, kv_prefill=0, n_decode=256, kv_decode=5832),
             dict(prefill_chunk=512, kv_prefill=2048, n_decode=0, kv_decode=0),
             dict(prefill_chunk=256, kv_prefill=1024, n_decode=16, kv_decode=4096)]
    for case in cases:
        batch = StepBatch(prefill_tokens=[case["prefill_chunk"]] if case["prefill_chunk"] else [],
                          prefill_context=[case["kv_prefill"]] if case["prefill_chunk"] else [],
                          decode_context=[case["kv_decode"]] * case["n_decode"])
        assert model._attention_s(batch) * 1e6 == pytest.approx(measured(path, **case), rel=1e-6)


def test_step_is_layers_times_ops_plus_head(model):
    dense = model.key.path / "dense.csv"
    ops = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "act_fn", "rotary_emb")

    def op(name, tokens):
        with open(dense) as fh:
            return next(float(r["time_us"]) for r in csv.DictReader(fh) if r["layer"] == name and int(r["tokens"]) == tokens)

    def per_seq(name, n):
        with open(model.key.path / "per_sequence.csv") as fh:
            return next(float(r["time_us"]) for r in csv.DictReader(fh) if r["layer"] == name and int(r["sequences"]) == n)

    batch = StepBatch(decode_context=[1024] * 32)
    layer = sum(op(o, 32) for o in ops) + 2 * op("layernorm", 32) + measured(
        model.key.path / "attention.csv", prefill_chunk=0, kv_prefill=0, n_decode=32, kv_decode=1024)
    expected = 32 * layer + op("embedding", 32) + op("final_layernorm", 32) + per_seq("lm_head", 32) + per_seq("sampler", 32)
    assert model.step_time(batch) == pytest.approx(expected * 1e-6 + model.overhead_s, rel=1e-6)


def test_monotone_in_load(model):
    t = model.step_time
    assert t(StepBatch(decode_context=[1000] * 64)) > t(StepBatch(decode_context=[1000] * 8))
    assert t(StepBatch(decode_context=[8000] * 64)) > t(StepBatch(decode_context=[1000] * 64))
    assert t(StepBatch(prefill_tokens=[2048], prefill_context=[0])) > t(StepBatch(prefill_tokens=[256], prefill_context=[0]))


def test_lattice_is_exact_on_points_and_linear_beyond():
    axes = [np.array([0.0, 16.0, 32.0]), np.array([1.0, 2.0, 4.0])]
    values = np.array([[1.0, 2.0, 4.0], [2.0, 4.0, 8.0], [3.0, 6.0, 12.0]])
    lattice = Lattice(axes, values)
    assert lattice(16.0, 2.0) == pytest.approx(4.0)
    assert lattice(64.0, 4.0) == pytest.approx(24.0)
    assert 2.0 < lattice(24.0, 2.0) < 6.0


def test_a_tp2_step_pays_what_vllm_sends_between_the_gpus():
    """The TP-2 profile times one shard on one GPU; the step adds two all-reduces a layer of its
    tokens, the embedding's all-reduce and the logits' all-gather. Between a slow and a (nearly)
    free link, a decode step of 128 differs by exactly those bytes at the slow link's speed."""
    from dataclasses import replace

    from calibration.roofline import INTERCONNECT_EFFICIENCY

    arch, card = load_model("qwen3-32b"), load_hardware("rtxpro6000")
    key = find_profile("rtxpro6000", "Qwen/Qwen3-32B", 2)

    def step(link_gbps):
        hw = replace(card, interconnect_gbps=link_gbps / INTERCONNECT_EFFICIENCY)
        pm = LLMServingSimPerformanceModel(key, arch, hw, max_num_batched_tokens=2048, max_num_seqs=128)
        return pm.step_time(StepBatch(decode_context=[1024] * 128))

    act = 128 * arch.hidden_size * 2  # bytes of one all-reduce's bf16 activations
    per_gpu = (2 * arch.num_layers + 1) * act + 128 * arch.vocab_size * 2 / 2
    assert step(16.0) - step(1e9) == pytest.approx(per_gpu / 16e9, rel=1e-3)


def moe_model(dp: int) -> LLMServingSimPerformanceModel:
    key = find_profile("rtxpro6000", "Qwen/Qwen3-30B-A3B", 1)
    return LLMServingSimPerformanceModel(key, load_model("qwen3-30b-a3b"), load_hardware("rtxpro6000"),
                                         max_num_batched_tokens=2048, max_num_seqs=128,
                                         expert_parallel=dp > 1, data_parallel_size=dp)


def test_moe_table_reproduces_measured_rows_and_grows_linearly_beyond():
    pm = moe_model(1)
    path = pm.key.path / "moe.csv"
    for tokens, experts in ((1, 8), (64, 32), (512, 128), (2048, 64)):
        got = pm._moe(np.array([tokens]), np.array([experts]))[0]
        assert got == pytest.approx(measured(path, tokens=tokens, activated_experts=experts), rel=1e-9)
    top = measured(path, tokens=2048, activated_experts=128)
    assert pm._moe(np.array([4096]), np.array([128]))[0] == pytest.approx(2 * top)
    between = pm._moe(np.array([700]), np.array([100]))[0]
    assert measured(path, tokens=512, activated_experts=64) < between < measured(path, tokens=1024, activated_experts=128)


def test_a_moe_step_is_attention_ops_plus_the_measured_moe_layer():
    """No MLP ops in an all-MoE model's layers: a 1,024-token prefill at dp 1 pays, per layer, the
    MoE table at 1,024 tokens over the experts they touch (all 128, expected), not gate_up/down."""
    pm = moe_model(1)
    arch = pm.arch
    path = pm.key.path / "moe.csv"
    batch = StepBatch(prefill_tokens=[1024], prefill_context=[0])
    without_moe = pm.step_time(batch) - arch.num_layers * 1e-6 * pm._moe(np.array([1024]), np.array([128.0]))[0]
    assert pm._moe(np.array([1024]), np.array([128.0]))[0] == pytest.approx(
        measured(path, tokens=1024, activated_experts=128))
    assert 0 < without_moe < 0.5 * pm.step_time(batch)
    assert pm.experts_time(1024) == 0.0  # one engine: nothing shared with another


def test_data_parallel_experts_are_priced_for_the_tokens_that_meet():
    """Two engines, experts over two GPUs: T tokens meeting give each GPU the table's row at T/2
    tokens over its expected 64 experts, plus the exchange of all T tokens over the link;
    step_time prices twice the engine's own tokens."""
    from calibration.layer_terms import moe_exchange_ms
    from calibration.roofline import RooflineKernels

    pm = moe_model(2)
    arch, path = pm.arch, pm.key.path / "moe.csv"
    link = moe_exchange_ms(RooflineKernels(pm.hardware).allreduce_ms, 2, np.array([4096]), arch.hidden_size,
                           arch.num_experts)[0]
    layer_s = 1e-6 * measured(path, tokens=2048, activated_experts=64) + 1e-3 * link
    assert pm.experts_time(4096) == pytest.approx(arch.moe_layers * layer_s, rel=1e-3)
    batch = StepBatch(prefill_tokens=[2048], prefill_context=[0])
    alone = moe_model(1)
    # the same step, its experts priced for 2 x 2,048 tokens over half the experts each, vs all on one GPU
    assert pm.step_time(batch) - pm.experts_time(4096) == pytest.approx(
        alone.step_time(batch) - arch.moe_layers * 1e-6 * alone._moe(np.array([2048]), np.array([128.0]))[0],
        rel=1e-6)
