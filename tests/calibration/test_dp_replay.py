"""The real data-parallel, expert-parallel Qwen3-30B-A3B vLLM run, replayed (calibration.dp_replay)."""

from __future__ import annotations

from calibration.dp_replay import replay


def test_qwen3_30b_a3b_dp2_ep_run_is_replayed_within_bounds():
    out = replay()
    err = {(r["metric"], r["quantile"]): r["error"] for r in out["rows"]}
    # uncalibrated for this card (roofline kernels, the H100 MoE fit scaled), the engines in
    # lock-step: E2E within 6%, TTFT within 50% (p50 0.14 s; p90/p99 seconds of queueing)
    assert all(abs(err[("e2e", q)]) < 0.06 for q in (50, 90, 99)), err
    assert all(abs(err[("ttft", q)]) < 0.5 for q in (50, 90, 99)), err
    sources = out["describe"]["step_time_sources"]
    assert "2 data-parallel engines" in sources["expert_parallel"]


def test_lock_step_is_what_lifts_the_short_ttft_tail_and_e2e():
    # each engine stepping alone: its decode steps are never stretched to the other's prefill
    # steps, so E2E runs 7-10% short and the TTFT tail (queueing) 26-53% short (docs/accuracy.md)
    apart = {(r["metric"], r["quantile"]): r["error"] for r in replay(lockstep=False)["rows"]}
    locked = {(r["metric"], r["quantile"]): r["error"] for r in replay()["rows"]}
    assert apart[("ttft", 90)] < -0.4 and all(apart[("e2e", q)] < -0.05 for q in (50, 90, 99)), apart
    assert abs(locked[("ttft", 90)]) < abs(apart[("ttft", 90)]), locked
    assert all(abs(locked[("e2e", q)]) < abs(apart[("e2e", q)]) for q in (50, 90, 99)), locked
