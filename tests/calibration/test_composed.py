"""The composed kernel-table step model: its physics, its grids and its hot path."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

from calibration.catalog import load_hardware, load_model
from calibration.composed import STEP_OVERHEAD_S, ComposedPerformanceModel, LogGrid2D, TableKernels
from calibration.kernel_tables import load_tables
from simulator.records.errors import ConfigError
from simulator.records.performance import StepBatch


def decode(n, kv=1024):
    return StepBatch(decode_context=[kv] * n)


def prefill(q, c=0):
    return StepBatch(prefill_tokens=[q], prefill_context=[c])


def test_empty_step_costs_nothing(qwen7b_h100):
    assert qwen7b_h100.step_time(StepBatch()) == 0.0


def test_step_time_is_the_sum_of_its_components(qwen7b_h100):
    rng = random.Random(3)
    for _ in range(20):
        n_pre = rng.randint(0, 3)
        batch = StepBatch(
            prefill_tokens=[rng.randint(1, 3000) for _ in range(n_pre)],
            prefill_context=[rng.randint(0, 20000) for _ in range(n_pre)],
            decode_context=[rng.randint(1, 30000) for _ in range(rng.randint(0, 300))],
        )
        if batch.is_empty:
            continue
        parts = qwen7b_h100.components(batch)
        assert qwen7b_h100.step_time(batch) == pytest.approx(sum(parts.values()), rel=1e-12)
        assert parts["overhead"] == STEP_OVERHEAD_S


def test_step_time_is_pure(qwen7b_h100):
    batch = StepBatch(prefill_tokens=[500], prefill_context=[100], decode_context=[10, 2000, 300])
    before = copy.deepcopy(batch)
    assert qwen7b_h100.step_time(batch) == qwen7b_h100.step_time(batch)
    assert batch == before


def test_more_work_never_takes_less_time(qwen7b_h100):
    t = qwen7b_h100.step_time
    decodes = [t(decode(n)) for n in (1, 2, 8, 32, 128, 512, 1024)]
    assert decodes == sorted(decodes)
    contexts = [t(decode(64, kv)) for kv in (16, 256, 4096, 32768, 131072)]
    assert contexts == sorted(contexts)
    prefills = [t(prefill(q)) for q in (1, 17, 129, 1000, 3585, 8192, 20000)]
    assert prefills == sorted(prefills)
    assert t(prefill(2048, 30000)) > t(prefill(2048, 0))
    spec = StepBatch(decode_context=[1024] * 32, decode_spec_tokens=[4] * 32)
    assert t(spec) > t(decode(32))


def test_regimes_match_the_hardware(qwen7b_h100, h100):
    """Decode of one sequence reads every weight once; long prefills run near the tensor-core peak."""
    arch = qwen7b_h100.arch
    one = qwen7b_h100.components(decode(1, 16))
    weight_read_s = arch.weight_bytes() / (h100.memory_bandwidth_gbps * 1e9)
    assert weight_read_s < one["dense"] + one["lm_head_sampler"] < 1.5 * weight_read_s
    big = qwen7b_h100.components(prefill(8192))
    flops = 2 * arch.num_params * 8192
    mfu = flops / (big["dense"] + big["lm_head_sampler"]) / (h100.bf16_tflops * 1e12)
    assert 0.5 < mfu < 0.9
    # decode attention is bound by the KV read: 256 x 8k tokens of KV, at most at peak bandwidth
    attn = qwen7b_h100.components(decode(256, 8192))["generation_attention"]
    kv_read_s = 256 * 8192 * qwen7b_h100.kv_bytes_per_token() / (h100.memory_bandwidth_gbps * 1e9)
    assert kv_read_s < attn < 1.6 * kv_read_s


def test_chunked_prefill_prices_the_context(qwen7b_h100):
    """A chunk over a long context costs more than the same chunk alone, and less than a full prefill."""
    t = qwen7b_h100.components
    alone = t(prefill(2048))["context_attention"]
    late = t(prefill(2048, 14336))["context_attention"]
    full = t(prefill(16384))["context_attention"]
    assert alone < late < full
    # a short chunk over a long context is at least a read of that context's KV
    tiny = t(prefill(16, 100000))["context_attention"]
    assert tiny >= 100016 * qwen7b_h100.kv_read_s_per_token


def test_several_chunks_cost_their_combined_work(qwen7b_h100):
    t = qwen7b_h100.components
    two = t(StepBatch(prefill_tokens=[4096, 4096], prefill_context=[0, 0]))["context_attention"]
    one = t(prefill(4096))["context_attention"]
    merged = t(prefill(8192))["context_attention"]
    assert one < two < merged  # two separate causal blocks are less work than one of twice the length
    assert two == pytest.approx(2 * one, rel=0.25)


def test_log_grid_matches_direct_evaluation(qwen7b_h100, h100_tables):
    kernels = TableKernels(h100_tables, qwen7b_h100.hardware)
    sh = qwen7b_h100.shapes
    rng = np.random.default_rng(0)
    b = np.exp(rng.uniform(0, np.log(2048), 200))
    kv = np.exp(rng.uniform(0, np.log(131072), 200))
    direct = 28 * 1e-3 * kernels.generation_attention_ms(sh.heads, sh.kv_heads, 128, "bf16", b, kv)
    direct = np.maximum(direct, b * kv * qwen7b_h100.kv_read_s_per_token)  # the KV-read floor
    grid = np.array([qwen7b_h100.generation_grid(x, y) for x, y in zip(b, kv, strict=True)])
    assert np.max(np.abs(grid / direct - 1)) < 0.05
    assert np.median(np.abs(grid / direct - 1)) < 0.01


def test_log_grid_extrapolates_with_its_powers():
    grid = LogGrid2D(lambda x, y: x * y**2, 64, 64, x_power=1.0, y_power=2.0)
    assert grid(10.0, 20.0) == pytest.approx(4000.0, rel=1e-9)
    assert grid(128.0, 32.0) == pytest.approx(128 * 32.0**2, rel=1e-9)
    assert grid(2.0, 256.0) == pytest.approx(2 * 256.0**2, rel=1e-9)
    assert np.allclose(grid.many(np.array([10.0, 128.0]), np.array([20.0, 32.0])), [4000.0, 128 * 1024.0])


def test_vectorised_variant_agrees(qwen7b_h100):
    rng = np.random.default_rng(1)
    p = rng.choice([0, 0, 16, 512, 2048, 9000], 100)
    c = rng.integers(0, 30000, 100) * (p > 0)
    n = rng.integers(0, 400, 100)
    kv = rng.integers(1, 40000, 100)
    n[(p == 0) & (n == 0)] = 1
    arr = qwen7b_h100.step_time_arrays(p, c, n, kv)
    for i in range(100):
        batch = StepBatch(prefill_tokens=[int(p[i])] if p[i] else [], prefill_context=[int(c[i])] if p[i] else [],
                          decode_context=[int(kv[i])] * int(n[i]))
        assert arr[i] == pytest.approx(qwen7b_h100.step_time(batch), rel=1e-6)


def test_tensor_parallel_splits_work_and_adds_all_reduce(h100_tables, h100):
    arch = load_model("r1-distill-qwen-14b")
    tp1 = ComposedPerformanceModel(arch, h100, TableKernels(h100_tables, h100), tp=1)
    tp2 = ComposedPerformanceModel(arch, h100, TableKernels(h100_tables, h100), tp=2)
    for batch in (decode(1), decode(128, 2048), prefill(4096)):
        a, b = tp1.components(batch), tp2.components(batch)
        assert b["dense"] < a["dense"]
        assert b["dense"] > a["dense"] / 2  # the all-reduces are not free
    assert tp2.kv_bytes_per_token() == tp1.kv_bytes_per_token() // 2


def test_fp8_weights_and_kv(h100_tables, h100):
    arch = load_model("r1-distill-qwen-7b")
    k = TableKernels(h100_tables, h100)
    bf16 = ComposedPerformanceModel(arch, h100, k)
    fp8w = ComposedPerformanceModel(arch, h100, k, weight_dtype="fp8")
    fp8kv = ComposedPerformanceModel(arch, h100, k, kv_dtype="fp8")
    assert fp8w.step_time(decode(8)) < 0.8 * bf16.step_time(decode(8))
    assert fp8kv.kv_bytes_per_token() * 2 == bf16.kv_bytes_per_token()
    assert fp8kv.components(decode(256, 8192))["generation_attention"] < \
        bf16.components(decode(256, 8192))["generation_attention"]


def test_head_dim_outside_the_tables_is_refused(h100_tables, h100):
    from dataclasses import replace

    arch = replace(load_model("llama-3.1-8b"), head_dim=64, name="odd")
    with pytest.raises(ConfigError, match="model.head_dim"):
        ComposedPerformanceModel(arch, h100, TableKernels(h100_tables, h100))


def test_a100_fp8_kv_uses_bf16_attention_and_says_so():
    a100 = load_hardware("a100")
    kernels = TableKernels(load_tables("a100_sxm"), a100)
    pm = ComposedPerformanceModel(load_model("r1-distill-qwen-7b"), a100, kernels, kv_dtype="fp8")
    assert "bf16 attention tables" in pm.describe()["built_from"]
    assert pm.step_time(decode(64, 4096)) > 0


def test_hot_path_is_fast(qwen7b_h100):
    """A generous bound (the benchmark prints the real figure): well under 100 us per call."""
    import time

    batch = StepBatch(prefill_tokens=[700], prefill_context=[3000],
                      decode_context=[random.Random(0).randint(100, 9000) for _ in range(256)])
    qwen7b_h100.step_time(batch)
    start = time.perf_counter()
    for _ in range(2000):
        qwen7b_h100.step_time(batch)
    assert (time.perf_counter() - start) / 2000 < 100e-6


def test_decode_times_match_step_time_and_the_general_grid_look_up(qwen7b_h100):
    """The fast path's bulk decode times: per-step step_time to rounding, ``many`` bit for bit."""
    model = qwen7b_h100
    rng = np.random.default_rng(5)
    grid = model.generation_grid
    for n in (1, 2, 3, 7, 64, 255, 1000, 5000):  # 5000: beyond the grid's sequence counts
        for start in (0, int(rng.integers(1, 2000)) * n, int(rng.integers(1, 10**6)), 260000 * n):
            length = int(rng.choice([1, 5, 300]))
            totals = start + n * np.arange(1, length + 1, dtype=np.float64)  # 260000 * n: past the grid's lengths
            fast = model.decode_times(n, totals)
            base = model.overhead_s + model._dense_at(n) + model._head_at(n)
            general = base + grid.many(np.full(length, float(n)), totals / n)
            np.testing.assert_array_equal(fast, general)
            for k in {0, length - 1}:
                total = int(totals[k])
                per = [total // n] * n
                per[0] += total - sum(per)
                assert model.step_time(StepBatch(decode_context=per)) == pytest.approx(fast[k], rel=1e-12)
    assert model.decode_times(4, np.array([], dtype=float)).shape == (0,)
    assert model.decode_times(4, 4000.0) == pytest.approx(model.step_time(decode(4, 1000)), rel=1e-12)
    totals = np.array([4000.0, 8000.0])
    model.decode_times(4, totals)
    assert totals.tolist() == [4000.0, 8000.0]  # the caller's array is left alone


@pytest.mark.parametrize("name", ["r1-distill-qwen-7b", "gpt-oss-20b"])  # gpt-oss: sliding-window layers
def test_decode_times_of_several_counts_equal_each_count_s_own(name, h100_tables, h100):
    """``decode_times_by_count`` (the fast path's step times of a run whose batch changes) is
    bit for bit ``decode_times`` count by count, and counts its extrapolations the same."""
    rng = np.random.default_rng(7)
    counts = [3, 256, 255, 256, 1000, 5000, 1]  # a count again, and counts beyond the grid
    lengths = [int(x) for x in rng.integers(1, 40, len(counts))]
    totals = np.concatenate([c * rng.integers(1, 300000, n) for c, n in zip(counts, lengths, strict=True)])
    one = ComposedPerformanceModel(load_model(name), h100, TableKernels(h100_tables, h100))
    several = copy.deepcopy(one)
    bounds = np.cumsum([0, *lengths]).tolist()
    expected = np.concatenate([one.decode_times(c, totals[a:b].astype(float))
                               for c, a, b in zip(counts, bounds, bounds[1:], strict=False)])
    np.testing.assert_array_equal(several.decode_times_by_count(counts, lengths, totals), expected)
    assert several.extrapolations == one.extrapolations


@pytest.mark.parametrize("wrap", ["gap", "gap_per_context", "jitter_run", "jitter_step"])
def test_serving_wrappers_time_several_counts_as_each_count(wrap, h100_tables, h100):
    """A model wrapping the composed one (a live server's gaps, a run's jitter) gives the fast
    path's several-count step times bit for bit as its own ``decode_times`` count by count."""
    from calibration.live_model import JitteredModel, StepGapModel

    base = ComposedPerformanceModel(load_model("r1-distill-qwen-7b"), h100, TableKernels(h100_tables, h100))
    model = {"gap": lambda: StepGapModel(base, 0.0014, 2e-5),
             "gap_per_context": lambda: StepGapModel(base, -0.003, 1e-5, per_context_token_s=-2e-9),
             "jitter_run": lambda: JitteredModel(base, seed=3, run_sigma=0.2),
             "jitter_step": lambda: JitteredModel(base, seed=3, step_sigma=0.1)}[wrap]()
    counts, lengths = [3, 64, 2], [5, 7, 4]
    totals = np.concatenate([c * np.arange(100, 100 + n) for c, n in zip(counts, lengths, strict=True)])
    several = model.decode_times_by_count(counts, lengths, totals)
    if wrap == "jitter_step":  # a draw per step: no closed form
        assert several is None and model.decode_times(3, totals[:5]) is None
        return
    bounds = np.cumsum([0, *lengths]).tolist()
    expected = np.concatenate([model.decode_times(c, totals[a:b].astype(float))
                               for c, a, b in zip(counts, bounds, bounds[1:], strict=False)])
    np.testing.assert_array_equal(several, expected)
    assert not np.array_equal(several, base.decode_times_by_count(counts, lengths, totals))
