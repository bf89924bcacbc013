"""The real data-parallel, expert-parallel Qwen3-30B-A3B vLLM run, replayed (calibration.dp_replay)."""

from __future__ import annotations

from calibration.dp_replay import replay


def test_qwen3_30b_a3b_dp2_ep_run_is_replayed_within_bounds():
    out = replay()
    err = {(r["metric"], r["quantile"]): r["error"] for r in out["rows"]}
    # uncalibrated for this card (roofline kernels, the H100 MoE fit scaled): E2E within 15%,
    # TTFT p50 (0.14 s) and p99 (seconds of queueing) within 50%. The TTFT tail is short: vLLM's
    # data-parallel engines step in lock-step (each step as long as the slower rank's), which
    # the rank-by-rank replay does not model (docs/accuracy.md); p90 is short, within 60%
    assert all(abs(err[("e2e", q)]) < 0.15 for q in (50, 90, 99)), err
    assert all(abs(err[("ttft", q)]) < 0.5 for q in (50, 99)), err
    assert -0.6 < err[("ttft", 90)] < 0, err
    sources = out["describe"]["step_time_sources"]
    assert "2 data-parallel engines" in sources["expert_parallel"]
