"""`python -m simulator cluster.replicas=...`: one replica stays the plain run, byte for byte;
a cluster writes the tables with a replica column and its figure; a bad router is one line."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.simulator.conftest import interrupt_simulator
from tests.simulator.test_cli import SMALL, run_cli


def test_one_replica_writes_the_plain_run_byte_for_byte(tmp_path):
    plain, one = tmp_path / "plain", tmp_path / "one"
    run_cli(plain, *SMALL, "plots=false")
    run_cli(one, *SMALL, "plots=false", "cluster.replicas=1", "cluster.router=least_kv")
    for name in ("requests.parquet", "timeline.parquet", "workload.parquet"):
        assert (plain / name).read_bytes() == (one / name).read_bytes(), name
    a, b = (json.loads((d / "summary.json").read_text()) for d in (plain, one))
    for s in (a, b):
        s["metadata"].pop("simulation_wall_s")
    assert a == b


def test_a_cluster_run_writes_replica_columns_and_its_figure(tmp_path):
    proc = run_cli(tmp_path, *SMALL, "cluster.replicas=3", "cluster.router=power_of_two")
    requests = pd.read_parquet(tmp_path / "requests.parquet")
    timeline = pd.read_parquet(tmp_path / "timeline.parquet")
    assert sorted(requests["request_id"]) == list(range(120))
    assert set(requests["replica"]) <= {0, 1, 2} and set(timeline["replica"]) == {0, 1, 2}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cluster"]["router"] == "power_of_two"
    assert [r["replica"] for r in summary["replicas"]] == [0, 1, 2]
    assert sum(r["requests"] for r in summary["replicas"]) == 120
    for name in ("kv_usage_replicas.png", "latency_cdf.png", "resolved_config.yaml", "workload.parquet"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "router power_of_two" in proc.stdout


def test_unknown_router_is_one_line_and_exit_2(tmp_path):
    proc = run_cli(tmp_path, "cluster.replicas=2", "cluster.router=fastest", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cluster.router: unknown router 'fastest'; allowed: ")
    assert "least_outstanding" in lines[0]


def test_one_replica_with_client_timeouts_is_the_plain_run_byte_for_byte(tmp_path):
    plain, one = tmp_path / "plain", tmp_path / "one"
    timeouts = ("workload.timeout_s=20", "workload.rate=6")
    run_cli(plain, *SMALL, *timeouts, "plots=false")
    run_cli(one, *SMALL, *timeouts, "plots=false", "cluster.replicas=1", "cluster.router=least_outstanding")
    assert json.loads((plain / "summary.json").read_text())["aborted"] > 0
    for name in ("requests.parquet", "timeline.parquet"):
        assert (plain / name).read_bytes() == (one / name).read_bytes(), name


def test_a_cluster_run_aborts_timed_out_requests_and_reports_the_client_view(tmp_path):
    run_cli(tmp_path, *SMALL, "workload.timeout_s=20", "workload.rate=6", "plots=false", "cluster.replicas=2",
            "cluster.router=least_outstanding", "frontend_s=0.25")
    s = json.loads((tmp_path / "summary.json").read_text())
    requests = pd.read_parquet(tmp_path / "requests.parquet")
    assert s["aborted"] == (requests["status"] == "aborted").sum() > 0
    client = s["client_observed"]
    assert client["frontend_s"] == 0.25 and client["source"] == "config"
    done = requests[requests["status"] == "completed"]
    assert client["ttft_s"]["p50"] == pytest.approx(done["ttft_s"].median() + 0.25)


def test_ctrl_c_writes_a_clusters_partial_results(tmp_path):
    """SIGINT mid-run: every replica stops at a step boundary, what was simulated is written, exit 130."""
    code, out, err = interrupt_simulator(["progress=true", "plots=false", "workload=gamma", "workload.num_requests=30000",
                                          "workload.rate=8", "cluster.replicas=2", "cluster.router=least_outstanding",
                                          "compiled=false"],  # (the Python cluster: the compiled one is done in 3 s)
                                         tmp_path, after_s=3.0)  # far longer than the test if left alone
    assert code == 130, err[-2000:]
    assert "interrupted at" in err and "partial results" in err
    assert "simulating:" in err  # the progress bar
    s = json.loads((tmp_path / "summary.json").read_text())
    partial = s["partial"]
    assert 0 < s["completed"] < 30000 and partial["interrupted_at_s"] > 0
    requests = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(requests) == 30000 - partial["not_arrived"]
    assert (requests["status"] == "unfinished").sum() == partial["unfinished"] > 0
    assert requests["arrival_s"].max() <= partial["interrupted_at_s"]
    assert set(requests["replica"]) == {0, 1}
    for name in ("timeline.parquet", "resolved_config.yaml", "workload.parquet"):
        assert (tmp_path / name).exists(), name
