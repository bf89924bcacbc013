"""Shared fixtures for calibration tests: tables and models are built once per session."""

from __future__ import annotations

import pytest

from calibration.catalog import load_hardware, load_model
from calibration.composed import ComposedPerformanceModel, TableKernels
from calibration.kernel_tables import load_tables


@pytest.fixture(scope="session")
def h100_tables():
    return load_tables("h100_sxm")


@pytest.fixture(scope="session")
def h100():
    return load_hardware("h100")


@pytest.fixture(scope="session")
def qwen7b_h100(h100_tables, h100):
    """The simulator's default: R1-Distill-Qwen-7B, one H100, bf16, vLLM default engine limits."""
    return ComposedPerformanceModel(load_model("r1-distill-qwen-7b"), h100, TableKernels(h100_tables, h100))
