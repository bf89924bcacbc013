"""Speculative decoding on the command line: unmodelled methods refused, placeholder rates labelled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.records.engine_config import EngineConfig, SpeculativeConfig
from simulator.records.errors import ConfigError
from simulator.speculation import speculative_rates

REPO = Path(__file__).resolve().parents[2]
LIGHT = ("plots=false", "progress=false", "workload.num_requests=20")


def simulator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulator", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize(("args", "field"), [
    (("optimization=spec_ngram", "optimization.speculative.method=eagle"), "optimization.speculative.method"),
    (("engine.speculative.method=eagle",), "engine.speculative.method"),
    (("optimization=spec_ngram", "optimization.speculative.method=draft_model"), "optimization.speculative.method"),
])
def test_an_unmodelled_method_is_one_line_naming_the_field(tmp_path, args, field):
    proc = simulator(*args, *LIGHT, f"hydra.run.dir={tmp_path}/r")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    method = args[-1].split("=")[1]
    assert lines[0] == f"error: {field}: {method!r} is not modelled; allowed: ngram"
    assert not (tmp_path / "r" / "summary.json").exists()


def test_the_config_refuses_an_unmodelled_method_directly():
    with pytest.raises(ConfigError, match=r"^engine\.speculative\.method: 'mtp' is not modelled"):
        SpeculativeConfig(method="mtp", num_speculative_tokens=2, acceptance_rate=(0.5,))


def test_placeholder_rates_are_labelled_on_screen_and_in_the_summary(tmp_path):
    proc = simulator("optimization=spec_ngram", *LIGHT, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if "placeholders" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert "python -m profiler optimization=spec_ngram" in warnings[0]
    rates = json.loads((tmp_path / "summary.json").read_text())["metadata"]["speculative_rates"]
    assert rates["source"] == "placeholder" and rates["method"] == "ngram"
    assert rates["acceptance_rate"] == [0.6, 0.5, 0.4, 0.3] and "profiler" in rates["warning"]


def test_rates_given_on_the_command_line_are_not_placeholders(tmp_path):
    proc = simulator("optimization=spec_ngram", "optimization.speculative.acceptance_rate=[0.9]",
                     "optimization.speculative.proposal_rate=0.4", *LIGHT, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "placeholders" not in proc.stderr
    rates = json.loads((tmp_path / "summary.json").read_text())["metadata"]["speculative_rates"]
    assert rates == {"source": "command line", "method": "ngram", "acceptance_rate": [0.9], "proposal_rate": 0.4}


def test_the_source_of_the_rates():
    spec = EngineConfig(speculative=SpeculativeConfig(num_speculative_tokens=4, acceptance_rate=(0.5,)))
    labelled = {"name": "spec_ngram", "speculative_rates": "placeholder", "speculative": {"method": "ngram"}}
    one_rate = ["optimization.speculative.proposal_rate=0.2"]
    assert speculative_rates(EngineConfig(), labelled, []) is None  # no speculation, no label
    assert speculative_rates(spec, labelled, one_rate)["source"] == "placeholder"  # one rate still a placeholder
    assert speculative_rates(spec, {"speculative": None}, [])["source"] == "engine"
    assert "warning" not in speculative_rates(spec, {**labelled, "speculative_rates": None}, [])
