"""Physical plausibility of kernel rows: rows faster than the card's roofline are rejected and filled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration import catalog
from calibration.cmd_list import rows as list_rows
from calibration.composed import ComposedPerformanceModel, TableKernels
from calibration.kernel_tables import PROVENANCE_FILE, load_table_dir, load_tables
from calibration.plausibility import MARGIN, Roofline, implausible
from simulator.records.engine_config import EngineConfig
from simulator.records.hardware import Hardware
from simulator.records.model_arch import ModelArchitecture

CARD = Hardware(name="test-card", gpu="test", memory_gib=16, memory_bandwidth_gbps=1000, bf16_tflops=100,
                fp8_tflops=200, interconnect_gbps=100)
H, KV, D = 8, 2, 64  # heads, KV heads, head dim
EFFICIENCY = 0.5  # the planted tables run at half the roofline


def test_shipped_h200_context_row_of_issue_15_is_rejected():
    """batch 8, isl 16384, 64 heads, 4 KV heads took 1.08 ms: the causal attention alone is ~35 TFLOP."""
    roofline = Roofline.of(catalog.load_hardware("h200"))
    floor = roofline.context_attention_s(8, 16384, 64, 4, 128, 2.0)
    assert 34e12 < 2 * 8 * 64 * 16384**2 * 128 < 36e12 and floor > 0.03
    assert implausible(1.0806346734364827, floor)
    tables = load_tables("h200_sxm")
    assert tables.rejections.rejected["context_attention"] > 0
    # what the model uses there now is no faster than physics
    used_ms = tables.context.grid(64, 4, "bf16")(np.array([8.0]), np.array([16384.0]), 2.0)[0]
    assert used_ms * 1e-3 >= (1 - MARGIN) * floor


def test_list_shows_the_rejections():
    engine = EngineConfig.from_dict({})
    (row,) = list_rows(["h200"], ["r1-distill-qwen-7b"], ["none"], [1], "auto", engine, False)
    assert "context_attention" in row["built_from"] and "faster than physics" in row["built_from"]


def _write_tables(folder, plant: dict[str, float]):
    """A profiler-format folder whose rows run at EFFICIENCY of CARD's roofline; ``plant`` speeds up one row
    of each named table by the given factor (an impossible measurement)."""
    r = Roofline.of(CARD)
    folder.mkdir()
    meta = {"hardware": CARD.to_dict(), "device": {"name": "test"}, "versions": {"torch": "test"},
            "created": "now", "model": {"name": "planted"}, "tp": 1}
    (folder / PROVENANCE_FILE).write_text(json.dumps(meta))
    ms = lambda floor, table, i: 1e3 * floor / EFFICIENCY / (plant.get(table, 1.0) if i == 0 else 1.0)  # noqa: E731
    tokens = [1, 4, 16, 64, 256, 1024]
    planted_m = 64
    lines = ['"kernel_source","gemm_dtype","m","n","k","latency"']
    for n, k in ((1024, 512), (512, 1024)):
        for m in tokens:
            i = 0 if (m, n) == (planted_m, 1024) else 1
            lines.append(f'"t","bfloat16",{m},{n},{k},{ms(r.gemm_s(m, n, k, "bf16"), "gemm", i)}')
    (folder / "gemm_perf.csv").write_text("\n".join(lines) + "\n")
    head = ('"version","kernel_source","batch_size","isl","num_heads","num_key_value_heads","head_dim",'
            '"beam_width","attn_dtype","kv_cache_dtype","step","window_size","latency"')
    for kind in ("context", "generation"):
        lines = [head]
        for b in (1, 2, 4):
            for n in (128, 256, 512, 1024, 2048):
                floor = (r.context_attention_s(b, n, H, KV, D, 2.0) if kind == "context"
                         else r.generation_attention_s(b, n, H, KV, D, 2.0))
                i = 0 if (b, n) == (2, 512) else 1
                lines.append(f'"t","t",{b},{n},{H},{KV},{D},1,"bfloat16","bfloat16",0,0,'
                             f'{ms(floor, kind, i)}')
        (folder / f"{kind}_attention_perf.csv").write_text("\n".join(lines) + "\n")
    (folder / "custom_allreduce_perf.csv").write_text('"kernel_source","allreduce_dtype","num_gpus",'
                                                      '"message_size","latency","backend"\n')
    lines = ['"kernel_source","op","dtype","tokens","width","bytes","latency"']
    for op, width in (("rmsnorm", 512), ("residual_add", 512), ("rotary", (H + KV) * D), ("silu_mul", 1024),
                      ("sampler", 4096)):
        for t in tokens:
            nbytes = 3 * t * width * 2
            i = 0 if (op, t) == ("rmsnorm", 64) else 1
            lines.append(f'"t","{op}","bfloat16",{t},{width},{nbytes},{ms(r.elementwise_s(nbytes), "elementwise", i)}')
    (folder / "elementwise_perf.csv").write_text("\n".join(lines) + "\n")
    return r


@pytest.mark.parametrize("factor", [1.0, 20.0])
def test_planted_impossible_rows_are_rejected_and_filled_from_neighbours(tmp_path, factor):
    """One row of each table made ``factor`` times faster than measured: rejected (counted) when that
    beats physics, and the prediction there stays near what its neighbours imply, never below physics."""
    plant = dict.fromkeys(("gemm", "context", "generation", "elementwise"), factor)
    r = _write_tables(tmp_path / "t", plant)
    tables = load_table_dir(tmp_path / "t")
    expected = 1 if factor > 1 / (1 - MARGIN) / EFFICIENCY else 0
    rejected = tables.rejections.rejected
    assert rejected == dict.fromkeys(("gemm", "context_attention", "generation_attention", "elementwise"), expected)
    honest = {  # what a row at EFFICIENCY of the roofline would have said
        "gemm": 1e3 * r.gemm_s(64, 1024, 512, "bf16") / EFFICIENCY,
        "context": 1e3 * r.context_attention_s(2, 512, H, KV, D, 2.0) / EFFICIENCY,
        "generation": 1e3 * r.generation_attention_s(2, 512, H, KV, D, 2.0) / EFFICIENCY,
        "elementwise": 1e3 * r.elementwise_s(3 * 64 * 512 * 2) / EFFICIENCY,
    }
    got = {
        "gemm": tables.gemm_table("bf16").latency_ms(np.array([64.0]), 1024, 512)[0],
        "context": tables.context.grid(H, KV, "bf16")(np.array([2.0]), np.array([512.0]), 2.0)[0],
        "generation": tables.generation.grid(H, KV, "bf16")(np.array([2.0]), np.array([512.0]), 1.0)[0],
        "elementwise": tables.elementwise.latency_ms("rmsnorm", 512, np.array([64.0]))[0],
    }
    for name, value in got.items():
        if expected:  # filled from the neighbours: near the honest value, above the floor
            assert honest[name] / 2 < value < honest[name] * 2, name
            assert value >= EFFICIENCY * honest[name] * (1 - MARGIN), name
        else:
            assert value == pytest.approx(honest[name], rel=1e-9), name


def test_run_metadata_counts_rejected_rows(tmp_path):
    _write_tables(tmp_path / "t", {"gemm": 20.0, "context": 20.0})
    tables = load_table_dir(tmp_path / "t")
    arch = ModelArchitecture(name="planted", num_layers=2, hidden_size=512, num_attention_heads=H,
                             num_key_value_heads=KV, head_dim=D, intermediate_size=512, vocab_size=4096)
    pm = ComposedPerformanceModel(arch, CARD, TableKernels(tables, CARD), max_num_batched_tokens=256,
                                  max_num_seqs=16)
    described = pm.describe()
    assert described["kernel_rows_rejected"]["gemm"] == 1
    assert described["kernel_rows_rejected"]["context_attention"] == 1
    assert "rows rejected as faster than physics (test-card)" in described["built_from"]


def test_cached_tables_are_rebuilt_when_the_check_or_the_card_changes(monkeypatch):
    """The on-disk cache stores filtered tables: its key covers the check's code and the card's specs."""
    import calibration.plausibility
    import calibration.table_cache

    seen = {}
    monkeypatch.setattr(calibration.table_cache, "cached",
                        lambda name, sources, *a, **k: seen.setdefault("sources", list(sources)))
    load_tables.__wrapped__("h200_sxm")
    sources = {p.resolve() for p in seen["sources"]}
    assert Path(calibration.plausibility.__file__).resolve() in sources
    assert (catalog.CONF_DIR / "hardware" / "h200.yaml").resolve() in sources


def test_measured_elementwise_kernels_replace_the_roofline_ones(tmp_path):
    """With the model's widths in elementwise_perf.csv, a layer's norms, adds, rotary, SiLU and the sampler
    are priced from it; without them (another model's widths) they stay on the roofline."""
    import dataclasses

    _write_tables(tmp_path / "t", {})
    tables = load_table_dir(tmp_path / "t")
    arch = ModelArchitecture(name="planted", num_layers=2, hidden_size=512, num_attention_heads=H,
                             num_key_value_heads=KV, head_dim=D, intermediate_size=1024, vocab_size=4096)
    kernels = TableKernels(tables, CARD)
    assert kernels.layer_elementwise_ms(np.array([64.0]), [("rmsnorm", 512, 2), ("silu_mul", 1024, 1)]) is not None
    assert kernels.layer_elementwise_ms(np.array([64.0]), [("silu_mul", 999, 1)]) is None
    measured = ComposedPerformanceModel(arch, CARD, kernels, max_num_batched_tokens=256, max_num_seqs=16)
    roofline = ComposedPerformanceModel(arch, CARD, TableKernels(dataclasses.replace(tables, elementwise=None), CARD),
                                        max_num_batched_tokens=256, max_num_seqs=16)
    for m in (1, 64, 1024):
        assert measured.dense_s[m] != roofline.dense_s[m]
    assert measured.head_s[4] != roofline.head_s[4]
