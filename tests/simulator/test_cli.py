"""`python -m simulator` end to end: outputs, overrides moving results, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]


def run_cli(tmp_path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "simulator", f"hydra.run.dir={tmp_path}", "progress=false", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


SMALL = ("workload=gamma", "workload.num_requests=120", "workload.seed=3")


def test_default_run_writes_every_output(tmp_path):
    proc = run_cli(tmp_path, *SMALL)
    for name in ("requests.parquet", "timeline.parquet", "summary.json", "resolved_config.yaml",
                 "kv_usage.png", "queues.png", "latency_cdf.png", "workload.parquet"):
        assert (tmp_path / name).stat().st_size > 0, name
    s = summary(tmp_path)
    assert s["completed"] + s["rejected"] == 120
    for key in ("ttft_s", "ttfvt_s", "tpot_s", "e2e_s"):
        assert set(s[key]) == {"p50", "p90", "p99", "mean"}
        assert s[key]["p50"] <= s[key]["p99"]
    assert set(s["kv_usage"]) == {"mean", "peak", "std", "seconds_above_95pct"}
    assert set(s["throughput"]) == {"output_tokens_per_s", "requests_per_s"}
    assert {"kv_block_seconds_share", "e2e_over_median"} <= set(s["stragglers"])
    assert s["goodput"]["requests_per_s"] <= s["throughput"]["requests_per_s"] + 1e-12
    md = s["metadata"]
    assert md["seed"] == 3 and md["versions"]["simpy"] and md["performance_model"]["calibrated"]
    req = pd.read_parquet(tmp_path / "requests.parquet")
    assert {"arrival_s", "domain", "prompt_tokens", "output_tokens", "reasoning_tokens", "queue_s",
            "ttft_s", "ttfvt_s", "tpot_s", "e2e_s", "preemptions", "status"} <= set(req.columns)
    tl = pd.read_parquet(tmp_path / "timeline.parquet")
    assert {"time_s", "running", "waiting", "kv_blocks_used", "kv_usage", "prefill_tokens",
            "decode_tokens", "step_time_s"} <= set(tl.columns)
    assert "TTFT" in proc.stdout and "KV cache" in proc.stdout


def test_same_seed_same_results_and_overrides_move_results(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli(a, *SMALL)
    run_cli(b, *SMALL)
    pd.testing.assert_frame_equal(pd.read_parquet(a / "requests.parquet"), pd.read_parquet(b / "requests.parquet"))
    # a small KV cache makes requests wait and get preempted
    small = tmp_path / "small"
    run_cli(small, *SMALL, "engine.num_gpu_blocks_override=2100")
    base, tight = summary(a), summary(small)
    assert tight["preemptions"] > base["preemptions"]
    assert tight["kv_usage"]["mean"] > base["kv_usage"]["mean"]
    assert tight["e2e_s"]["p99"] > base["e2e_s"]["p99"]
    # capping the batch makes requests queue
    capped = tmp_path / "capped"
    run_cli(capped, *SMALL, "engine.max_num_seqs=2")
    assert summary(capped)["ttft_s"]["p99"] > base["ttft_s"]["p99"]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("workload.rate=-1", "workload.rate"),
        ("workload.cv=0", "workload.cv"),
        ("workload=nosuch", "workload"),
        ("engine.block_size=48", "engine.block_size"),
        ("engine.scheduler=other", "engine.scheduler"),
        ("hardware=tpu9", "hardware"),
    ],
)
def test_bad_input_gives_one_line_naming_the_field(tmp_path, override, field):
    proc = run_cli(tmp_path, *SMALL, override, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert field in lines[0]


def test_missing_trace_file_is_named(tmp_path):
    proc = run_cli(tmp_path, "workload=azure_conv", "workload.path=/nonexistent/trace.csv", check=False)
    assert proc.returncode != 0
    assert "workload.path" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_multirun_sweep(tmp_path):
    cmd = [sys.executable, "-m", "simulator", "-m", f"hydra.sweep.dir={tmp_path}", "progress=false",
           "plots=false", "workload.num_requests=40", "workload.rate=1,8"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    low, high = summary(tmp_path / "0"), summary(tmp_path / "1")
    assert high["throughput"]["requests_per_s"] > low["throughput"]["requests_per_s"]


def test_ctrl_c_writes_partial_results(tmp_path):
    """SIGINT mid-run: the run stops at a step boundary, writes what it simulated, exits 130."""
    from tests.simulator.conftest import interrupt_simulator

    code, out, err = interrupt_simulator(["progress=false", "plots=false", "workload=gamma",
                                          "workload.num_requests=30000", "workload.rate=4",
                                          "compiled=false"],  # ~40 s if left alone (compiled: ~2 s)
                                         tmp_path, after_s=2.0)
    assert code == 130, err[-2000:]
    assert "interrupted at" in err and "partial results" in err
    s = summary(tmp_path)
    partial = s["partial"]
    assert 0 < s["completed"] < 30000 and partial["interrupted_at_s"] > 0
    requests = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(requests) == 30000 - partial["not_arrived"]
    assert (requests["status"] == "unfinished").sum() == partial["unfinished"] > 0
    assert requests["arrival_s"].max() <= partial["interrupted_at_s"]
    for name in ("timeline.parquet", "resolved_config.yaml", "workload.parquet"):
        assert (tmp_path / name).exists(), name


def test_the_config_is_composed_once(tmp_path, monkeypatch):
    # Hydra composes the config a first time only to read hydra.mode; the command line skips that
    from hydra._internal.hydra import Hydra

    import simulator.__main__ as cli

    modes = []
    compose = Hydra.compose_config

    def counting(self, *args, **kwargs):
        modes.append(kwargs.get("run_mode"))
        return compose(self, *args, **kwargs)

    monkeypatch.setattr(Hydra, "compose_config", counting)
    monkeypatch.setattr(Hydra, "get_mode", Hydra.get_mode)  # restored after the test
    monkeypatch.setattr(sys, "argv", ["simulator", f"hydra.run.dir={tmp_path}", "progress=false",
                                      "plots=false", "workload.num_requests=10"])
    assert cli.main() == 0
    assert len(modes) == 1
    assert (tmp_path / "summary.json").exists()


def test_hydra_mode_set_on_the_command_line_still_sweeps(tmp_path):
    cmd = [sys.executable, "-m", "simulator", "hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path}",
           "progress=false", "plots=false", "workload.num_requests=20", "workload.rate=1,8"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "0" / "summary.json").exists() and (tmp_path / "1" / "summary.json").exists()
