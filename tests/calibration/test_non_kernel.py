"""The non-kernel work the composed model charges, against vLLM's measured kernels and a real H200's steps."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from calibration.catalog import load_hardware, load_model
from calibration.composed import (
    MEMORY_EFFICIENCY,
    MEMORY_OP_LATENCY_S,
    LayerShapes,
    layer_memory_ops,
)
from calibration.llmservingsim import find_profile
from calibration.non_kernel import (
    PROFILE_OPS,
    fit_elementwise,
    layer_kernels,
    model_layer_us,
    non_kernel_ms,
    profile_layer_us,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama_rtxpro():
    arch = load_model("llama-3.1-8b")
    return find_profile("rtxpro6000", arch.hf_name, 1), arch, load_hardware("rtxpro6000")


@dataclass(frozen=True)
class Folder:
    path: Path
    tp: int = 1

    def describe(self) -> str:
        return str(self.path)


def test_fit_recovers_a_known_latency_and_efficiency(tmp_path, llama_rtxpro):
    _, arch, hw = llama_rtxpro
    per_token = layer_memory_ops(LayerShapes.of(arch, 1), "bf16", "bf16")
    lines = ["layer,tokens,time_us"]
    for op, (kernel, _) in PROFILE_OPS.items():
        for tokens in (1, 2, 4, 64, 1024, 4096):  # t = 2 us + bytes at half the bandwidth
            lines.append(f"{op},{tokens},{2.0 + per_token[kernel] * tokens / (0.5 * hw.memory_bandwidth_gbps * 1e3)}")
    (tmp_path / "dense.csv").write_text("\n".join(lines) + "\n")
    fit = fit_elementwise(Folder(tmp_path), arch, hw)
    assert fit.latency_s == pytest.approx(2e-6, rel=0.02)  # the 1-4 token rows carry a few ns of bytes
    assert fit.efficiency == pytest.approx(0.5, rel=1e-3)


def test_the_model_charges_at_least_what_vllms_kernels_took(llama_rtxpro):
    key, arch, hw = llama_rtxpro
    tokens, measured, nbytes = profile_layer_us(key, arch)
    assert len(tokens) > 10
    charged = model_layer_us(nbytes, layer_kernels(), hw)
    assert np.all(charged >= 0.95 * measured)
    fit = fit_elementwise(key, arch, hw)
    assert fit.latency_s <= MEMORY_OP_LATENCY_S and fit.efficiency >= MEMORY_EFFICIENCY


H200_STEPS = REPO.parent / "shared" / "data" / "gpu-measurements" / "h200-r1-distill-qwen-7b" / "h200_steps.jsonl"


@pytest.mark.skipif(not H200_STEPS.exists(), reason="the H200 measurements are not on this machine")
def test_the_model_stays_below_a_real_h200s_non_kernel_time():
    """The H200 decoder's element-wise work is unfused PyTorch: an upper bound, never a target."""
    spec = importlib.util.spec_from_file_location("compare_h200_steps", REPO / "benchmarks" / "compare_h200_steps.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from calibration.registry import build_performance_model

    pm = build_performance_model("h200", "r1-distill-qwen-7b", None, 1, {"source": "aiconfigurator"})
    rows = bench.compare(pm, bench.measured_steps(H200_STEPS))
    assert len(rows) >= 10
    for row in rows:
        assert 0 < non_kernel_ms(row, "predicted") <= non_kernel_ms(row, "measured"), row["step"]


def test_family_term_scales_with_tokens_times_layers():
    """Qwen3's q/k norm: the dense cost grows by layers x (3 us + m x bytes at 80% of the bandwidth),
    exactly; a family without it (Llama) gets nothing."""
    from calibration.composed import ACT_BYTES
    from calibration.non_kernel import family_layer_ops
    from calibration.registry import build_performance_model

    pm = build_performance_model("h100", "qwen3-8b", None, 1, {"source": "aiconfigurator"})
    sh, arch = pm.shapes, pm.arch
    per_token = 2 * (sh.heads + sh.kv_heads) * sh.head_dim * ACT_BYTES
    assert family_layer_ops(arch, sh) == {"qk_norm": per_token}
    m = np.array([0, 1, 64, 2048, 8192])
    with_term = pm._dense_seconds(m)
    pm._non_kernel_ms = lambda tokens: np.zeros(np.shape(tokens))  # the term switched off
    plain = pm._dense_seconds(m)
    bandwidth = pm.hardware.memory_bandwidth_gbps * 1e9 * MEMORY_EFFICIENCY
    expected = np.where(m > 0, arch.num_layers * (MEMORY_OP_LATENCY_S + m * per_token / bandwidth), 0.0)
    assert np.allclose(with_term - plain, expected, rtol=1e-9, atol=1e-15)
    assert family_layer_ops(load_model("llama-3.1-8b"), LayerShapes.of(load_model("llama-3.1-8b"), 1)) == {}


def test_family_term_charges_at_least_what_vllms_qk_norm_took():
    """LLMServingSim's Qwen3-32B profile (RTX PRO 6000) times vLLM's qk_norm: the model's charge is
    at or above it from 64 tokens on (at 1-16 tokens both are the ~2-3 us launch floor)."""
    import pandas as pd

    from calibration.non_kernel import family_layer_ops

    arch, hw = load_model("qwen3-32b"), load_hardware("rtxpro6000")
    key = find_profile("rtxpro6000", arch.hf_name, 1)
    dense = pd.read_csv(Path(key.path) / "dense.csv")
    rows = dense[(dense["layer"] == "qk_norm") & (dense["tokens"] >= 64)]
    assert len(rows) > 10
    [per_token] = family_layer_ops(arch, LayerShapes.of(arch, 1)).values()
    charged = model_layer_us(per_token * rows["tokens"].to_numpy(), 1, hw)
    assert (charged >= rows["time_us"].to_numpy()).all()
    assert (charged <= 3.0 * rows["time_us"].to_numpy()).all()  # and not far above it
