"""`python -m simulator` with mixture-of-experts models: runs end to end, or refuses in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "simulator", f"hydra.run.dir={tmp_path}", "progress=false", "plots=false",
           *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_qwen3_30b_a3b_runs_end_to_end_and_says_where_its_step_time_comes_from(tmp_path):
    proc = run_cli(tmp_path, "model=qwen3-30b-a3b", "hardware=h100", "workload.num_requests=50")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["completed"] + s["rejected"] == 50 and s["completed"] > 0
    perf = s["metadata"]["performance_model"]
    assert "moe.csv" in perf["step_time_sources"]["moe"]


def test_gpt_oss_with_sliding_windows_runs_end_to_end(tmp_path):
    proc = run_cli(tmp_path, "model=gpt-oss-20b", "hardware=h100", "workload.num_requests=40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["completed"] > 0
    assert "128 tokens" in s["metadata"]["performance_model"]["step_time_sources"]["sliding_window"]


def test_r1_on_four_h200_is_refused_in_one_line_naming_tp(tmp_path):
    proc = run_cli(tmp_path, "model=deepseek-r1", "hardware=h200", "tp=4", "workload.num_requests=5")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tp: deepseek-r1 does not fit on h200 at tp=4")


def test_expert_parallel_is_an_engine_setting(tmp_path):
    proc = run_cli(tmp_path, "model=qwen3-30b-a3b", "hardware=h100", "tp=2", "engine.enable_expert_parallel=true",
                   "workload.num_requests=30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    perf = json.loads((tmp_path / "summary.json").read_text())["metadata"]["performance_model"]
    assert perf["expert_parallel"] is True and "over 2 GPUs" in perf["step_time_sources"]["expert_parallel"]


def test_data_parallel_ranks_run_as_replicas_balanced_as_vllm_does(tmp_path):
    proc = run_cli(tmp_path, "model=qwen3-30b-a3b", "hardware=h100", "engine.data_parallel_size=2",
                   "engine.enable_expert_parallel=true", "workload.num_requests=60")
    assert proc.returncode == 0, proc.stderr[-3000:]
    replica = pq.read_table(tmp_path / "requests.parquet").column("replica").to_pylist()
    assert len(replica) == 60 and set(replica) == {0, 1}
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["layout"] == {"data_parallel_size": 2, "tp": 1, "gpus": 2, "expert_parallel": True}
    assert s["metadata"]["data_parallel_size"] == 2 and s["metadata"]["gpus"] == 2
    assert s["metadata"]["performance_model"]["data_parallel_size"] == 2
    assert "least_outstanding" in proc.stdout and "tp 1 x dp 2 = 2 GPUs" in proc.stdout


def test_bad_data_parallel_size_is_refused_in_one_line(tmp_path):
    for value in ("0", "x"):
        proc = run_cli(tmp_path / value, "model=qwen3-30b-a3b", "hardware=h100", f"engine.data_parallel_size={value}")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith("error: engine.data_parallel_size: must be an integer")


def test_replicas_of_data_parallel_engines_are_refused_naming_both_fields(tmp_path):
    proc = run_cli(tmp_path, "model=qwen3-30b-a3b", "hardware=h100", "engine.data_parallel_size=2",
                   "cluster.replicas=2")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: engine.data_parallel_size: 2 with cluster.replicas=2")
