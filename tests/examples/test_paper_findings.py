"""examples/paper_findings.py: the directions the study's mechanisms must produce, each on a
small case against the real simulator and the shipped H100 calibration, and the report's
quick mode end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from examples import paper_findings as pf
from simulator.records.workload import Workload

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def study() -> dict:
    return pf.load_study()


def test_reasoning_twin_holds_over_twice_the_kv_at_equal_load(study):
    """Same arrivals and prompts; only the twin's long reasoning outputs differ."""
    spec = pf.model_spec("r1-distill-qwen-14b", 4)
    kv = {}
    for twin in ("rllm", "llm"):
        batch = pf.make_batch(study, ["MATH-500"], 40, pf.bursty, 3, ordinary=twin == "llm")
        kv[twin] = pf.run_metrics(pf.simulate(spec, batch.workload, 3))["kv_mean"]
    assert kv["llm"] > 0
    assert kv["rllm"] > 2 * kv["llm"]


@pytest.mark.parametrize("fp8", ["fp8_kv", "fp8_kv_e5m2"])
def test_fp8_kv_doubles_the_kv_blocks(fp8):
    engine = pf.model_spec("r1-distill-qwen-7b", 2).engine
    blocks = {}
    for opt in ("none", fp8):
        perf = pf.model_spec("r1-distill-qwen-7b", 2, opt).perf
        blocks[opt] = perf.kv_capacity(engine.block_size, engine.gpu_memory_utilization, None).num_blocks
    assert blocks[fp8] == pytest.approx(2 * blocks["none"], rel=0.001)


def shared_prefix_workload(n: int = 24, prompt: int = 1200, shared: int = 1024) -> Workload:
    rng = np.random.default_rng(0)
    return Workload(arrival_s=np.cumsum(rng.exponential(1.0, n)), prompt_tokens=np.full(n, prompt),
                    output_tokens=rng.integers(50, 200, n), reasoning_tokens=np.zeros(n, int),
                    domain=np.full(n, "chat", object), prefix_group=np.zeros(n, int),
                    prefix_tokens=np.full(n, shared))


def test_prefix_caching_cuts_prefill_tokens_on_a_shared_prefix():
    workload = shared_prefix_workload()
    on = pf.run_metrics(pf.simulate(pf.model_spec("r1-distill-qwen-7b", 1, "none"), workload, 0))
    off = pf.run_metrics(pf.simulate(pf.model_spec("r1-distill-qwen-7b", 1, "prefix_off"), workload, 0))
    assert on["prefix_hit_rate"] > 0 and off["prefix_hit_rate"] == 0
    assert on["prefill_tokens"] < off["prefill_tokens"]


def test_int4_weights_free_memory_for_more_kv_blocks():
    blocks = {opt: pf.model_spec("r1-distill-qwen-7b", 2, opt).perf.kv_capacity(16, 0.9).num_blocks
              for opt in ("none", "gptq_int4", "awq_int4")}
    assert blocks["gptq_int4"] > blocks["none"] and blocks["awq_int4"] > blocks["none"]


def test_speculative_decoding_lowers_e2e_at_light_load(study):
    batch = pf.make_batch(study, ["GSM8K"], 8, pf.poisson(0.05), 1, ordinary=False)
    e2e = {opt: pf.run_metrics(pf.simulate(pf.model_spec("r1-distill-qwen-7b", 2, opt), batch.workload, 1))
           ["e2e_mean_s"] for opt in ("none", "spec_ngram")}
    assert e2e["spec_ngram"] < e2e["none"]


def test_quick_report_end_to_end_and_same_seed_same_findings(tmp_path):
    """Module form in-process, script form in a subprocess: same findings.json bytes."""
    first, second = tmp_path / "a", tmp_path / "b"
    assert pf.main(["quick=true", f"out={first}", "seed=5"]) == 0
    names = {"report.md", "findings.json", "pilot_kv.png", "pilot_running.png", "gamma.png",
             "difficulty.png", "optimizations.png", "spec_pressure.png", "budgets.png"}
    assert names <= {p.name for p in first.iterdir()}
    for png in first.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    findings = json.loads((first / "findings.json").read_text())
    assert {"pilot", "gamma", "difficulty", "optimizations", "budgets", "run", "output_length",
            "spec_acceptance", "spec_under_kv_pressure"} <= set(findings)
    # longer thinking costs int4 its time gain; higher acceptance shortens speculative runs
    times = [r["time_change"] for r in findings["output_length"]["gptq_int4"]]
    assert times == sorted(times) and times[0] < times[-1]
    spec = [r["time_change"] for r in findings["spec_acceptance"]["rows"]]
    assert spec == sorted(spec, reverse=True)
    assert findings["optimizations"]["spec_ngram"]["speculative_rates"]["source"] == "placeholder"
    assert "not measured" in findings["optimizations"]["gptq_int4"]["performance_model"]
    assert findings["run"]["seed"] == 5
    report = (first / "report.md").read_text()
    for png in names - {"report.md", "findings.json"}:
        assert f"]({png})" in report
    done = subprocess.run([sys.executable, "examples/paper_findings.py", "--quick", f"out={second}",
                           "seed=5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (second / "findings.json").read_bytes() == (first / "findings.json").read_bytes()


@pytest.mark.parametrize("arg, field", [("seed=x", "seed"), ("model=nope", "model"),
                                        ("colour=red", "colour"), ("quick=maybe", "quick"),
                                        ("workload.rate=-1", "workload.rate")])
def test_bad_input_is_one_line_naming_the_field(arg, field, tmp_path, capsys):
    assert pf.main(["quick=true", f"out={tmp_path}", arg]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {field}: ")


def test_user_deployment_reruns_sections_2_4_5(tmp_path):
    out = tmp_path / "user"
    assert pf.main(["quick=true", f"out={out}", "model=r1-distill-qwen-1.5b", "workload=gamma",
                    "workload.num_requests=40", "workload.rate=4"]) == 0
    findings = json.loads((out / "findings.json").read_text())
    assert findings["deployment"]["model"] == "r1-distill-qwen-1.5b"
    assert findings["deployment"]["requests"] == 40
    assert {"gamma", "optimizations", "budgets"} <= set(findings) and "pilot" not in findings
    assert len(findings["budgets"]["rows"]) == len(pf.BUDGETS)
    # removing the hidden reasoning can only shorten the run's KV footprint
    assert findings["gamma"]["without_reasoning"]["kv_mean"] < findings["gamma"]["rllm"]["kv_mean"]
