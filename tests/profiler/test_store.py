"""Point-by-point storage and resume (no engine)."""

from __future__ import annotations

import pytest

from profiler.store import PointStore
from simulator.records.errors import ConfigError


def rows(point_id: str, first_step: int, n: int) -> list[dict]:
    return [{"point_id": point_id, "phase": "decode", "rep": i, "step": first_step + i, "wall_s": 0.01 * (i + 1),
             "cpu_s": 0.01, "prefill_tokens": [], "prefill_context": [], "prefill_cached": [],
             "decode_context": [130 + i], "decode_spec_tokens": [0], "decode_accepted_tokens": [0],
             "num_prefill_tokens": 0, "num_decode_seqs": 1, "num_spec_tokens": 0, "num_tokens": 1,
             "kv_blocks_used": 2, "kv_usage": 0.1, "num_preempted": 0, "draft_s": 0.0, "rss_bytes": 1,
             "disturbed": False}
            for i in range(n)]


def point(point_id: str) -> dict:
    return {"point_id": point_id, "phase": "decode", "params": {"batch": 1}}


def test_resume_keeps_finished_points(tmp_path):
    store = PointStore(tmp_path, {"grid": "smoke"}, resume=True)
    store.record(point("a"), "ok", rows("a", 0, 3))
    store.record(point("b"), "oom", [], "needs 9 blocks")
    again = PointStore(tmp_path, {"grid": "smoke"}, resume=True)
    assert again.resumed == 2 and again.done("a") and again.done("b")
    assert again.next_step == 3
    assert again.steps()["wall_s"].tolist() == pytest.approx([0.01, 0.02, 0.03])
    assert [p["status"] for p in again.point_records()] == ["ok", "oom"]


def test_a_line_cut_by_a_kill_means_the_point_is_redone(tmp_path):
    store = PointStore(tmp_path, {"x": 1}, resume=True)
    store.record(point("a"), "ok", rows("a", 0, 2))
    with open(store.dir / "points.jsonl", "a") as handle:
        handle.write('{"point_id": "b", "sta')
    again = PointStore(tmp_path, {"x": 1}, resume=True)
    assert again.done("a") and not again.done("b")


def test_other_settings_refuse_to_resume(tmp_path):
    PointStore(tmp_path, {"grid": "smoke", "seed": 0}, resume=True).record(point("a"), "ok", rows("a", 0, 1))
    with pytest.raises(ConfigError, match=r"changed: seed\); rerun with resume=false"):
        PointStore(tmp_path, {"grid": "smoke", "seed": 1}, resume=True)
    fresh = PointStore(tmp_path, {"grid": "smoke", "seed": 1}, resume=False)
    assert fresh.resumed == 0 and not fresh.done("a")
