"""Shared helpers for simulator tests: a small linear step-time model and workloads."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.records.performance import MemoryBreakdown, PerformanceModel, StepBatch
from simulator.records.workload import Workload


class LinearModel(PerformanceModel):
    """step = overhead + per prefill token + per decode sequence + per KV token read."""

    name = "test-linear"

    def __init__(self, overhead=0.004, prefill=2e-5, decode=1e-4, kv_read=1e-8, kv_bytes=1000):
        self.overhead, self.prefill, self.decode, self.kv_read = overhead, prefill, decode, kv_read
        self.kv_bytes = kv_bytes

    def step_time(self, batch: StepBatch) -> float:
        return (self.overhead + self.prefill * sum(batch.prefill_tokens)
                + self.decode * len(batch.decode_context) + self.kv_read * sum(batch.decode_context))

    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes

    def memory(self, gpu_memory_utilization: float) -> MemoryBreakdown:
        total = 10 * 2**30
        return MemoryBreakdown(total, int(total * gpu_memory_utilization), 0, 0, 0,
                               int(total * gpu_memory_utilization))


def make_workload(n=50, seed=0, rate=5.0, prompt=(16, 600), output=(1, 800), prefix_groups=0,
                  prefix_tokens=0) -> Workload:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    out = rng.integers(output[0], output[1] + 1, n)
    group = rng.integers(0, prefix_groups, n) if prefix_groups else np.full(n, -1)
    prompts = rng.integers(prompt[0], prompt[1] + 1, n)
    if prefix_groups:
        prompts = np.maximum(prompts, prefix_tokens + 1)
    return Workload(
        arrival_s=arrivals,
        prompt_tokens=prompts,
        output_tokens=out,
        reasoning_tokens=(out * rng.uniform(0, 1, n)).astype(int),
        domain=np.full(n, "math", object),
        prefix_group=group,
        prefix_tokens=np.full(n, prefix_tokens) if prefix_groups else None,
    )


def assert_identical(slow, fast) -> None:
    """Every column of both runs' tables equal, bit for bit (NaN where NaN), and their summaries."""
    for table in ("requests", "timeline"):
        a, b = getattr(slow, table), getattr(fast, table)
        assert list(a) == list(b)
        for key in a:
            x, y = np.asarray(a[key]), np.asarray(b[key])
            assert x.dtype == y.dtype, f"{table}.{key}"
            if x.dtype.kind == "f":
                np.testing.assert_array_equal(np.isnan(y), np.isnan(x), err_msg=f"{table}.{key}")
                assert np.array_equal(x[~np.isnan(x)], y[~np.isnan(y)]), f"{table}.{key}"
            else:
                np.testing.assert_array_equal(y, x, err_msg=f"{table}.{key}")
    assert slow.summary.to_dict() == fast.summary.to_dict()


@pytest.fixture(scope="module")
def composed():
    """The default run's composed performance model (H100, R1-Distill-Qwen-7B): step-time tables."""
    from hydra import compose, initialize_config_dir

    from simulator.configure import CONF_DIR, build_run

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=["workload.num_requests=2"])
    return build_run(cfg, ["workload.num_requests=2"]).perf


@pytest.fixture
def linear_model() -> LinearModel:
    return LinearModel()


class VectorLinearModel(LinearModel):
    """LinearModel that also gives pure-decode step times in bulk (enables the fast path)."""

    name = "test-linear-vector"

    def decode_times(self, num_seqs, total_context):
        return self.overhead + self.decode * num_seqs + self.kv_read * np.asarray(total_context, float)


def interrupt_simulator(args: list[str], run_dir, after_s: float) -> tuple[int, str, str]:
    """Start ``python -m simulator`` with ``args`` (its run dir ``run_dir``), send it a real SIGINT
    ``after_s`` seconds after Hydra made the run dir, return (exit code, stdout, stderr)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "simulator", f"hydra.run.dir={run_dir}", *args]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (Path(run_dir) / ".hydra").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # Hydra made the run dir: the run is being built
    time.sleep(after_s)  # into the simulation
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err
