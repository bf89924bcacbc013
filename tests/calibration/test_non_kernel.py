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
