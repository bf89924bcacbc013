"""The pieces a replay of a real run shares: the run's machine and the signed errors (calibration.replay_errors)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration import catalog
from calibration.live_replay import DEFAULT_RUN
from calibration.replay_errors import QUANTILES, error_rows, run_hardware, run_link_gbps
from calibration.roofline import ALLREDUCE_LATENCY_S, RooflineKernels


def test_the_link_is_the_runs_own_where_it_records_one(tmp_path):
    assert json.loads((DEFAULT_RUN / "config.json").read_text())["link_bw"] == 16
    assert run_link_gbps(DEFAULT_RUN) == 16.0
    (tmp_path / "config.json").write_text(json.dumps({"link_bw": 50}))
    assert run_link_gbps(tmp_path) == 50.0
    # no config.json: the card as conf/hardware describes it
    bare = run_hardware(tmp_path / "elsewhere", "rtxpro6000")
    assert bare.interconnect_gbps == catalog.load_hardware("rtxpro6000").interconnect_gbps


def test_the_recorded_link_is_what_a_collective_gets_not_a_peak_to_derate():
    """LLMServingSim's link_bw is ASTRA-Sim's link (bytes / link_bw, no efficiency): an all-reduce of
    the replayed card moves its bytes at exactly 16 GB/s, where conf/hardware's peaks are derated."""
    card = run_hardware(DEFAULT_RUN, "rtxpro6000")
    elements = 2048 * 5120
    got = float(RooflineKernels(card).allreduce_ms(2, elements))
    assert got == pytest.approx(1e3 * (ALLREDUCE_LATENCY_S + elements * 2 / 16e9))


def test_errors_are_signed_and_the_client_view_adds_the_front_end():
    live = {("engine", "e2e"): np.full(10, 2.0), ("client", "e2e"): np.full(10, 2.5)}
    rows = error_rows(live, {"e2e": np.full(10, 1.5)}, frontend_s=0.5)
    by = {(r["view"], r["quantile"]): r for r in rows}
    assert len(rows) == 2 * len(QUANTILES)
    assert by["engine", 50]["error"] == pytest.approx(-0.25)  # simulated 1.5 s against live 2.0 s: short
    assert by["client", 99]["sim_s"] == pytest.approx(2.0) and by["client", 99]["error"] == pytest.approx(-0.2)


def test_the_client_view_reads_the_replay_from_the_api_servers_arrivals():
    live = {("engine", "ttft"): np.full(10, 1.0), ("client", "ttft"): np.full(10, 1.2)}
    rows = error_rows(live, {"ttft": np.full(10, 1.0)}, frontend_s=0.05, sim_client={"ttft": np.full(10, 1.15)})
    by = {(r["view"], r["quantile"]): r for r in rows}
    assert by["engine", 50]["sim_s"] == pytest.approx(1.0)
    assert by["client", 50]["sim_s"] == pytest.approx(1.2) and by["client", 50]["error"] == pytest.approx(0.0)
