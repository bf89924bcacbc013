"""``python -m calibration accuracy`` on one small shipped real GPU run (300 requests, seconds)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibration import accuracy, cmd_accuracy, dp_replay
from calibration.live_replay import load_live_run

REPO = Path(__file__).resolve().parents[2]
RUN = "RTXPRO6000/Llama-3.1-8B"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    assert cmd_accuracy.main(["--runs", RUN, "--out", str(out), "--frontend-s", "0.006"]) == 0
    with (out / "accuracy.csv").open() as fh:
        return out, list(csv.DictReader(fh))


def test_every_view_metric_and_quantile_is_written(written):
    out, rows = written
    keys = {(r["view"], r["metric"], r["quantile"]) for r in rows}
    assert keys == {(v, m, str(q)) for v in accuracy.VIEWS for m in accuracy.METRICS for q in accuracy.QUANTILES}
    for r in rows:
        assert r["run"] == RUN and r["perf_model"].startswith("llmservingsim:") and r["calibrated"] == "True"
        live, sim = float(r["live_s"]), float(r["sim_s"])
        assert float(r["error"]) == pytest.approx(sim / live - 1, abs=1e-5)  # signed
    table = (out / "accuracy.md").read_text()
    assert RUN in table and "client (+6.0 ms)" in table and "engine" in table


def test_live_side_is_the_runs_own_percentiles(written):
    _, rows = written
    run = load_live_run(accuracy.RUNS_ROOT / "llmservingsim" / RUN)
    row = {(r["view"], r["metric"], r["quantile"]): r for r in rows}
    assert float(row["engine", "ttft", "90"]["live_s"]) == pytest.approx(np.percentile(run.ttft_s, 90), rel=1e-6)
    assert float(row["engine", "e2e", "50"]["live_s"]) == pytest.approx(np.percentile(run.e2e_s, 50), rel=1e-6)
    # the client view starts at the API server's arrival, never after the engine's
    assert (run.api_arrival_s <= run.arrival_s + 1e-9).all()


def test_client_view_is_the_replay_from_the_api_servers_arrivals_plus_the_front_end(written):
    """A request reaching the API server during a step waits for it (the engine core takes new
    requests between steps): the client view replays the API server's arrivals, then adds the front end."""
    from calibration.live_replay import live_engine_config, live_workload
    from calibration.registry import build_performance_model
    from calibration.replay_errors import run_hardware
    from simulator.engine.loop import simulate

    _, rows = written
    run_dir = accuracy.RUNS_ROOT / "llmservingsim" / RUN
    run = load_live_run(run_dir)
    config = live_engine_config(run)
    perf = build_performance_model(run_hardware(run_dir, "rtxpro6000"), "llama-3.1-8b", "none", 1,
                                   {"source": "auto"}, engine=config)
    client = simulate(live_workload(run, at_api_server=True), config, perf).requests
    row = {(r["view"], r["metric"], r["quantile"]): float(r["sim_s"]) for r in rows}
    for m in accuracy.METRICS:
        for q in accuracy.QUANTILES:
            expected = float(np.percentile(np.asarray(client[f"{m}_s"], dtype=float), q)) + 0.006
            assert row["client", m, str(q)] == pytest.approx(expected, abs=2e-6)  # the CSV keeps 6 decimals


def test_the_data_parallel_moe_run_is_replayed_as_dp_replay_does_in_both_views():
    [result] = accuracy.replay_all([dp_replay.RUN], frontend_s=0.004)
    assert not result.skipped and result.dp == 2 and result.expert_parallel and result.model == "qwen3-30b-a3b"
    assert result.calibrated and "(link 16 GB/s)" in result.hardware  # a measured layer profile
    # the engine view is dp_replay's own replay, figure for figure (same code, same machine)
    alone = dp_replay.replay()
    assert result.perf_model == alone["perf_model"]
    for r in alone["rows"]:
        assert result.error("engine", r["metric"], r["quantile"]) == r["error"]
    sim = {(r["view"], r["metric"], r["quantile"]): r["sim_s"] for r in result.rows}
    run = load_live_run(dp_replay.RUN)
    client, _ = dp_replay.simulate_ranks(run, dp_replay.RUN, "qwen3-30b-a3b", "rtxpro6000", at_api_server=True)
    for m in accuracy.METRICS:
        for q in accuracy.QUANTILES:
            assert sim["client", m, q] == pytest.approx(float(np.percentile(client[m], q)) + 0.004, rel=1e-9)
    table = accuracy.markdown([result])
    assert "not replayed" not in table and "| DP 2 x EP 2 | llmservingsim | engine |" in table


def test_a_release_of_a_model_uses_its_base_models_conf():
    assert accuracy._conf_model("Qwen/Qwen3-30B-A3B-Instruct-2507") == "qwen3-30b-a3b"
    assert accuracy._conf_model("Qwen/Qwen3-32B") == "qwen3-32b"
    assert accuracy._conf_model("Qwen/Qwen3-32B-AWQ") is None  # another weight format: not the same model


def test_a_dense_data_parallel_run_is_listed_with_its_reason(tmp_path):
    src = accuracy.RUNS_ROOT / "llmservingsim" / RUN
    run_dir = tmp_path / RUN
    shutil.copytree(src, run_dir)
    meta_path = run_dir / "vllm" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["engine_kwargs"]["data_parallel_size"] = 2
    meta_path.write_text(json.dumps(meta))
    [result] = accuracy.replay_all([run_dir])
    assert "data_parallel_size 2 of a dense model" in result.skipped and not result.rows
    assert "not replayed" in accuracy.markdown([result])


def test_update_docs_replaces_the_marked_section_only(tmp_path, written):
    doc = tmp_path / "accuracy.md"
    doc.write_text(f"before\n{accuracy.DOCS_BEGIN}\nold table\n{accuracy.DOCS_END}\nafter\n")
    result = accuracy.replay_run(accuracy.RUNS_ROOT / "llmservingsim" / RUN)
    accuracy.update_docs(doc, [result])
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old table" not in text
    assert RUN in text and "Measured 20" in text


@pytest.mark.parametrize("args, field", [(["--runs", "nowhere/none"], "--runs"),
                                         (["--frontend-s", "-1"], "--frontend-s"),
                                         (["--seed", "x"], "--seed")])
def test_bad_input_is_one_line_and_exit_2(args, field, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "calibration", "accuracy", "--out", str(tmp_path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {field}:"), proc.stderr
