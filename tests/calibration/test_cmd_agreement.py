"""`python -m calibration agreement`: the agreement report for a user's workload."""

from __future__ import annotations

import json

import pytest

from calibration.__main__ import main as calibration_main
from simulator.engine.vllm_oracle import require_vllm
from simulator.records.errors import ConfigError

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


@pytest.mark.parametrize("argv, expected", [
    (["--requests", "0"], "error: --requests: a positive integer, got '0'"),
    (["--seed", "abc"], "error: --seed: an integer >= 0, got 'abc'"),
    (["--show", "-1"], "error: --show: an integer >= 0, got '-1'"),
    (["--min-rate", "1.5"], "error: --min-rate: a number in [0, 1], got '1.5'"),
    (["--workload", "/nonexistent.parquet"], "error: --workload: an existing file, got '/nonexistent.parquet'"),
    (["--json", "/dev/null/a.json"], "error: --json: a path that can be written, got '/dev/null/a.json'"),
    (["--scheduling", "later"], "error: --scheduling: invalid choice: 'later'"),
])
def test_bad_arguments_are_one_line_errors_naming_the_option(argv, expected):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "calibration", "agreement", "--scenario", "light", *argv],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(expected) and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize("overrides, expected", [
    (["workload=mooncake", "workload.rate=6"],
     "error: workload.rate: not a setting of workload (workload=mooncake); closest: rate_scale"),
    (["workload.rte=2"], "error: workload.rte: not a setting of workload (its default); closest: rate"),
    (["engine.max_num_seq=5"], "error: engine.max_num_seq: not a setting of engine (its default); "
                               "closest: max_num_seqs"),
    (["workload.rate=["], "error: workload.rate: cannot be read: "),
])
def test_configuration_errors_are_one_line_naming_the_setting(overrides, expected):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "calibration", "agreement", *overrides],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(expected) and proc.stderr.count("\n") == 1, proc.stderr
