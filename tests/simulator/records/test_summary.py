"""The typed Summary writes summary.json as the dictionary did: same keys, same order."""

from __future__ import annotations

import json

from simulator.engine.loop import simulate
from simulator.records.engine_config import EngineConfig
from simulator.records.run_result import RunResult
from simulator.records.summary import CORE_FIELDS, Summary
from tests.simulator.conftest import LinearModel, make_workload


def test_summary_json_round_trips_byte_for_byte(tmp_path):
    result = simulate(make_workload(30, rate=5.0, seed=1), EngineConfig(), LinearModel(), seed=1)
    summary = result.summary
    assert isinstance(summary, Summary)
    assert summary.completed == summary["completed"] == 30
    assert list(summary.to_dict())[:len(CORE_FIELDS)] == list(CORE_FIELDS)
    assert list(summary.sections) == ["kv_cache", "prefix_cache", "async_scheduling", "scheduler"]
    result.write(tmp_path / "a")
    again = RunResult.read(tmp_path / "a")
    assert again.summary == summary
    again.write(tmp_path / "b")
    assert (tmp_path / "b/summary.json").read_bytes() == (tmp_path / "a/summary.json").read_bytes()


def test_a_summary_read_from_disk_keeps_its_keys_and_their_order():
    data = {"completed": 3, "live": {"x": 1}, "kv_usage": {"mean": None}}
    summary = Summary.from_dict(data)
    assert json.dumps(summary.to_dict()) == json.dumps(data)  # same keys, same order
    assert "requests" not in summary and summary.get("requests") is None
    summary["requests"] = 5
    assert summary.requests == 5 and "requests" in summary
