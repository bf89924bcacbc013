"""An optimization's output_length_scale: the workload's output lengths times it, recorded in the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulator.records.errors import ConfigError
from simulator.workload.output_scale import output_length_scale, scale_outputs
from tests.simulator.conftest import make_workload

REPO = Path(__file__).resolve().parents[3]


def test_a_scale_of_1_2_raises_mean_output_by_20_percent_on_a_fixed_trace():
    trace = make_workload(n=400, seed=3, output=(50, 2000))
    scaled = scale_outputs(trace, 1.2)
    assert np.mean(scaled.output_tokens) / np.mean(trace.output_tokens) == pytest.approx(1.2, abs=0.002)
    assert np.all(scaled.reasoning_tokens <= scaled.output_tokens)
    assert np.mean(scaled.reasoning_tokens) > np.mean(trace.reasoning_tokens)
    assert np.array_equal(scaled.prompt_tokens, trace.prompt_tokens)
    assert scale_outputs(trace, 1.0) is trace


def test_a_request_that_fitted_max_model_len_still_fits():
    trace = make_workload(n=200, seed=1, prompt=(16, 600), output=(100, 1000))
    scaled = scale_outputs(trace, 3.0, max_model_len=1024)
    fitted = trace.prompt_tokens + trace.output_tokens <= 1024
    assert np.all(scaled.prompt_tokens[fitted] + scaled.output_tokens[fitted] <= 1024)
    assert np.all(scale_outputs(trace, 0.01).output_tokens >= 1)


@pytest.mark.parametrize("bad", [0, -1.0, "long", True])
def test_a_bad_scale_names_the_field(bad):
    with pytest.raises(ConfigError, match=r"^optimization\.output_length_scale: must be a number > 0"):
        output_length_scale({"output_length_scale": bad})
    assert output_length_scale({}) == 1.0


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulator", "plots=false", "progress=false",
                           "workload.num_requests=30", f"hydra.run.dir={tmp_path}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_scale_applies_to_a_run_and_is_recorded(tmp_path):
    base = run(tmp_path / "a", "optimization=gptq_int4")
    longer = run(tmp_path / "b", "optimization=gptq_int4", "optimization.output_length_scale=1.5")
    assert base.returncode == 0 and longer.returncode == 0, longer.stderr[-2000:]
    meta = json.loads((tmp_path / "b" / "summary.json").read_text())["metadata"]
    assert meta["output_length_scale"] == 1.5
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["metadata"]["output_length_scale"] == 1.0
    import pandas as pd

    a = pd.read_parquet(tmp_path / "a" / "workload.parquet")["output_tokens"].mean()
    b = pd.read_parquet(tmp_path / "b" / "workload.parquet")["output_tokens"].mean()
    assert b / a == pytest.approx(1.5, abs=0.02)


def test_a_bad_scale_on_the_command_line_is_one_line(tmp_path):
    proc = run(tmp_path, "optimization=gptq_int4", "optimization.output_length_scale=-2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: optimization.output_length_scale: must be a number > 0 (1.0: lengths unchanged), got -2"]


def test_the_scale_keeps_every_other_field_of_the_workload():
    """Nested prefix groups and client timeouts survive the scale (only the lengths change)."""
    import numpy as np

    from simulator.records.workload import Workload
    from simulator.workload.output_scale import scale_outputs

    w = Workload(arrival_s=[0.0, 1.0], prompt_tokens=[64, 64], output_tokens=[100, 200], reasoning_tokens=[50, 0],
                 domain=["math", "math"], prefix_group=[0, 1], prefix_tokens=[32, 48], outer_group=[-1, 0],
                 outer_tokens=[0, 32], timeout_s=[5.0, np.inf], name="w", seed=3)
    scaled = scale_outputs(w, 1.5)
    assert list(scaled.output_tokens) == [150, 300]
    for name in ("prefix_group", "prefix_tokens", "outer_group", "outer_tokens", "timeout_s", "arrival_s"):
        assert list(getattr(scaled, name)) == list(getattr(w, name)), name
    assert (scaled.name, scaled.seed) == ("w", 3)
