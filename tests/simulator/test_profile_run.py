"""A run of a profile: its engine's settings as defaults (overrides stated), its hardware's label,
the async/sync switch, and seeds that change nothing said so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulator.configure import build_run
from simulator.engine.loop import simulate
from simulator.records.engine_config import EngineConfig
from simulator.records.performance import MemoryBreakdown, PerformanceModel
from simulator.records.workload import Workload

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "calibration" / "profiles" / "cpu-amd-2c" / "tiny-llama" / "none"
needs_profile = pytest.mark.skipif(not (PROFILE / "profile.json").exists(), reason="no shipped CPU profile")


class TenMs(PerformanceModel):
    """Every step takes 10 ms."""

    name = "ten-ms"

    def step_time(self, batch) -> float:
        return 0.01

    def kv_bytes_per_token(self) -> int:
        return 1

    def memory(self, gpu_memory_utilization: float) -> MemoryBreakdown:
        return MemoryBreakdown(10**9, 10**9, 0, 0, 0, 10**9)


def test_async_scheduling_delays_a_mid_step_arrival_by_one_step():
    """Async: step k+1 is scheduled when step k starts, so a request arriving during step k
    joins step k+2, not k+1 (one step of lookahead); sync: it joins step k+1."""
    workload = Workload(arrival_s=[0.0, 0.015], prompt_tokens=[100, 100], output_tokens=[10, 3],
                        reasoning_tokens=[0, 0], domain=np.array(["x", "x"], object))
    ttft = {}
    for mode in (False, True):
        result = simulate(workload, EngineConfig(async_scheduling=mode), TenMs())
        assert result.summary["async_scheduling"] is mode
        ttft[mode] = result.requests["ttft_s"][1]
    assert ttft[False] == pytest.approx(0.015) and ttft[True] == pytest.approx(0.025)


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulator", "plots=false", "progress=false",
                           f"hydra.run.dir={tmp_path}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_a_bad_async_setting_is_one_line_and_exit_2(tmp_path):
    proc = cli(tmp_path, "workload.num_requests=5", "engine.async_scheduling=sometimes")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: engine.async_scheduling: must be true or false or null, got 'sometimes'"]


@needs_profile
def test_a_profile_sets_the_engine_defaults_and_an_override_is_stated():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        base = ["perf=profile", f"perf.profile={PROFILE}", "workload.num_requests=5"]
        spec = build_run(compose("config", overrides=base), overrides=base)
        given = [*base, "engine.max_num_seqs=64"]
        changed = build_run(compose("config", overrides=given), overrides=given)
    resolved = json.loads((PROFILE / "profile.json").read_text())["engine"]["resolved"]
    e = spec.engine
    assert (e.max_num_seqs, e.max_num_batched_tokens, e.block_size, e.max_model_len) == (
        resolved["max_num_seqs"], resolved["max_num_batched_tokens"], resolved["block_size"],
        resolved["max_model_len"])
    assert e.async_scheduling is False  # vLLM's CPU platform serves synchronously
    assert spec.notes["engine"] == "engine settings: the profile's"
    assert changed.engine.max_num_seqs == 64
    assert changed.notes["engine"] == ("engine settings: the profile's, except engine.max_num_seqs=64 "
                                       f"(the profile ran {resolved['max_num_seqs']})")


@needs_profile
def test_a_bare_engine_is_stated_and_a_served_one_is_not(tmp_path):
    """The shipped profile carries a serving phase: ``perf=profile`` simulates the server; with
    ``perf.serving=false`` (or a profile without one) the run says it simulates the bare engine."""
    served = cli(tmp_path / "served", "perf=profile", f"perf.profile={PROFILE}", "workload.num_requests=5")
    bare = cli(tmp_path / "bare", "perf=profile", f"perf.profile={PROFILE}", "perf.serving=false",
               "workload.num_requests=5")
    assert served.returncode == 0 == bare.returncode, served.stderr[-2000:] + bare.stderr[-2000:]
    served_meta = json.loads((tmp_path / "served" / "summary.json").read_text())["metadata"]
    bare_meta = json.loads((tmp_path / "bare" / "summary.json").read_text())["metadata"]
    assert "serving" in served_meta["performance_model"] and "serving" not in served_meta.get("notes", {})
    assert "bare engine" in bare_meta["notes"]["serving"]
    assert [ln for ln in bare.stderr.splitlines() if ln.startswith("note: server overheads: none")]
    assert not [ln for ln in served.stderr.splitlines() if "server overheads" in ln]


@needs_profile
def test_a_cpu_profile_run_is_labelled_with_its_hardware_and_says_what_it_overrode(tmp_path):
    workload = tmp_path / "w.parquet"
    Workload(arrival_s=[0.0, 0.5], prompt_tokens=[64, 64], output_tokens=[8, 8], reasoning_tokens=[0, 0],
             domain=np.array(["x", "x"], object)).save(workload)
    proc = cli(tmp_path / "run", "perf=profile", f"perf.profile={PROFILE}", "workload=file",
               f"workload.path={workload}", "engine.max_num_batched_tokens=1024")
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((tmp_path / "run" / "summary.json").read_text())["metadata"]
    profile_hw = json.loads((PROFILE / "profile.json").read_text())["hardware"]["slug"]
    assert meta["hardware"] == profile_hw != "h100"
    assert "engine.max_num_batched_tokens=1024 (the profile ran 2048)" in meta["notes"]["engine"]
    assert "changes nothing" in meta["notes"]["seed"]  # a replayed workload: seeds give one run
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: engine settings")]
    assert len(notes) == 1
