"""`python -m calibration agreement`: the agreement report for a user's workload."""

from __future__ import annotations

import json

import pytest

from calibration.__main__ import main as calibration_main
from simulator.errors import ConfigError
from simulator.vllm_scheduler import require_vllm

try:
    require_vllm()
    HAVE_VLLM = True
except ConfigError:
    HAVE_VLLM = False


@pytest.mark.engine
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not importable here")
def test_agreement_report_on_a_live_validation_scenario(tmp_path, capsys):
    out = tmp_path / "agreement.json"
    code = calibration_main(["agreement", "--scenario", "ci-reasoning", "--requests", "40",
                             "--scheduling", "both", "--free-running", "--min-rate", "0.99",
                             "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "== ci-reasoning (40 requests), sync" in text and "== ci-reasoning (40 requests), async" in text
    assert "lockstep:" in text and "free-running:" in text
    report = json.loads(out.read_text())
    assert report["vllm"].startswith("vllm")
    assert [r["scheduling"] for r in report["results"]] == ["sync", "async"]
    for result in report["results"]:
        assert result["engine"]["num_gpu_blocks_override"] == 64  # the scenario's KV cache
        assert result["lockstep"]["steps"] > 100
        assert result["lockstep"]["rate"] >= 0.99
        assert result["lockstep"]["preemptions"]["vllm"] > 0


@pytest.mark.engine
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not importable here")
def test_bad_engine_settings_are_one_line_errors(capsys):
    code = calibration_main(["agreement", "--scenario", "light", "-e", "max_num_batched_tokens=64"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # refused before vLLM is asked, as vLLM would refuse it: a token budget below max_num_seqs
    assert err[-1].startswith("error: engine.max_num_batched_tokens: must be >= max_num_seqs=128")


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message shown without vLLM")
def test_without_vllm_the_command_says_how_to_get_it(capsys):
    assert calibration_main(["agreement", "--scenario", "light"]) == 2
    err = capsys.readouterr().err
    assert "engine.scheduler: needs vLLM installed: run scripts/setup_vllm_cpu.sh" in err
