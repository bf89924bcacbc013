"""The uncalibrated roofline fallback."""

from __future__ import annotations

import pytest

from calibration.catalog import load_hardware, load_model
from calibration.composed import roofline_model
from simulator.records.performance import StepBatch

BATCHES = [
    StepBatch(decode_context=[1000]),
    StepBatch(decode_context=[2000] * 128),
    StepBatch(prefill_tokens=[2048], prefill_context=[0]),
    StepBatch(prefill_tokens=[4096], prefill_context=[4096], decode_context=[3000] * 32),
]


def test_labelled_uncalibrated():
    pm = roofline_model(load_model("r1-distill-qwen-7b"), load_hardware("l40s"))
    assert pm.calibrated is False
    assert "UNCALIBRATED" in pm.name and "UNCALIBRATED" in pm.describe()["built_from"]


def test_close_to_the_tables_on_the_gpu_its_efficiencies_come_from(qwen7b_h100):
    rough = roofline_model(qwen7b_h100.arch, qwen7b_h100.hardware)
    for batch in BATCHES:
        assert rough.step_time(batch) == pytest.approx(qwen7b_h100.step_time(batch), rel=0.2)


def test_faster_hardware_is_faster():
    arch = load_model("r1-distill-qwen-7b")
    l40s, h100, b200 = (roofline_model(arch, load_hardware(n)) for n in ("l40s", "h100", "b200"))
    for batch in BATCHES:
        assert b200.step_time(batch) < h100.step_time(batch) < l40s.step_time(batch)


def test_tp_over_pcie_pays_for_its_all_reduce():
    arch = load_model("r1-distill-qwen-14b")
    batch = StepBatch(prefill_tokens=[4096], prefill_context=[0])
    for name in ("l40s", "b200"):
        one = roofline_model(arch, load_hardware(name), tp=1).components(batch)["dense"]
        two = roofline_model(arch, load_hardware(name), tp=2).components(batch)["dense"]
        assert two < one
    l40s_two = roofline_model(arch, load_hardware("l40s"), tp=2).components(batch)["dense"]
    l40s_one = roofline_model(arch, load_hardware("l40s"), tp=1).components(batch)["dense"]
    b200_two = roofline_model(arch, load_hardware("b200"), tp=2).components(batch)["dense"]
    b200_one = roofline_model(arch, load_hardware("b200"), tp=1).components(batch)["dense"]
    assert l40s_two / l40s_one > b200_two / b200_one  # PCIe all-reduce eats more of the gain than NVLink
