"""Simulator invariants as a property test over engines, workloads and both engine paths.

Each example draws an engine (block size, max_model_len, budgets, async or sync scheduling,
chunked prefill and its long-prefill threshold, prefix caching, n-gram speculation, KV dtype,
KV capacity down to a few blocks) and a small workload (Poisson, Gamma or bursty arrivals,
shared prefixes, 1-token prompts and outputs, whole-reasoning outputs; tests/simulator/
strategies.py), runs it step by step and on the fast path, and checks:

- requests: every request ends exactly once, completed or rejected, and is rejected exactly
  when it can never fit (prompt + output over max_model_len or the KV cache); a completed
  request delivered exactly the output tokens it asked for; the counts add up in the summary;
- KV: blocks in use lie in [0, capacity] at every step (capacity: all blocks but vLLM's null
  block), are 0 exactly when nothing runs, and all are free at the end; kv_usage is the used
  share of the capacity; timeline and requests count the same preemptions;
- clock: steps have positive durations, each starts no earlier than the previous one ended,
  step end times never decrease, and no request completes after the last step;
- latencies (simulator.engine.tabulate.tabulate, from the arrival): 0 <= queue_s (first scheduled)
  < ttft_s (first output token) <= ttfvt_s (first token after the reasoning tokens) <= e2e_s
  (finish); ttfvt_s is undefined (NaN) exactly when the whole output is reasoning;
- scheduler limits: a step schedules at most max_num_seqs requests and max_num_batched_tokens
  tokens (each decision on the step path; the timeline's counts on both paths);
- determinism: the same case run twice gives identical results, bit for bit; the fast path
  gives the step-by-step path's results: every count, status, step and NaN the same, times
  and block-seconds equal to rounding (a few ulps of the clock: assert_same_to_rounding).
  Both comparisons run on this machine, in this process.

About 200 examples by default; RLLM_SIM_LONG_PROPERTIES=1 runs 1,000 (or set
RLLM_SIM_PROPERTY_EXAMPLES=<n>). The examples are derandomized (the same ones every run, no
example database), and the test prints how many ran and what they covered.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from simulator.engine.loop import simulate
from simulator.records.engine_config import EngineConfig
from simulator.records.metrics import SLO
from simulator.records.workload import Workload
from tests.simulator.conftest import LinearModel, VectorLinearModel, make_workload
from tests.simulator.strategies import Case, TinyGPU, cases


def property_examples() -> int:
    """Examples per property test: 200, 1,000 in long mode, or what the environment says."""
    if os.environ.get("RLLM_SIM_PROPERTY_EXAMPLES"):
        return int(os.environ["RLLM_SIM_PROPERTY_EXAMPLES"])
    return 1000 if os.environ.get("RLLM_SIM_LONG_PROPERTIES", "") not in ("", "0") else 200


EXAMPLES = property_examples()
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def run(case: Case, *, fast: bool, keep_decisions: bool = False):
    return simulate(case.workload, case.engine, case.model(), seed=case.seed, async_scheduling=case.async_scheduling,
                    fast=fast, keep_decisions=keep_decisions)


def assert_identical(a, b, what: str) -> None:
    """Every column and summary entry equal, bit for bit (NaN equals NaN)."""
    for table in ("requests", "timeline"):
        x, y = getattr(a, table), getattr(b, table)
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(y[key], x[key], err_msg=f"{what}: {table}.{key}")
    np.testing.assert_equal(b.summary.to_dict(), a.summary.to_dict(), err_msg=f"{what}: summary")


def assert_same_to_rounding(a, b, what: str) -> None:
    """Integers, text and NaN patterns equal; times and sums of times equal to rounding.

    The fast path adds a run's step times in one numpy cumsum and then moves the SimPy clock
    by ``end - now`` (and sums a run's KV block-seconds at once), so its clock can differ from
    the step-by-step clock in the last bits: the tolerance is a few ulps of the run's clock
    (times it the KV blocks for block-seconds).
    """
    clock = max(float(a.timeline["time_s"][-1]) if len(a.timeline["time_s"]) else 0.0, 1.0)
    atol = 1e-12 * clock * a.summary["kv_cache"]["num_blocks"]

    def same(x, y, where: str) -> None:
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind == "f" or y.dtype.kind == "f":
            np.testing.assert_array_equal(np.isnan(y), np.isnan(x), err_msg=f"{what}: {where} (NaN)")
            np.testing.assert_allclose(y, x, rtol=1e-9, atol=atol, err_msg=f"{what}: {where}")
        else:
            np.testing.assert_array_equal(y, x, err_msg=f"{what}: {where}")

    for table in ("requests", "timeline"):
        x, y = getattr(a, table), getattr(b, table)
        assert x.keys() == y.keys()
        for key in x:
            same(x[key], y[key], f"{table}.{key}")

    def walk(x, y, where: str) -> None:
        if isinstance(x, dict):
            assert isinstance(y, dict) and x.keys() == y.keys(), f"{what}: {where}"
            for key in x:
                walk(x[key], y[key], f"{where}.{key}")
        elif x is None or isinstance(x, bool | str):
            assert x == y, f"{what}: {where}: {x!r} != {y!r}"
        else:
            same(x, y, where)

    walk(a.summary.to_dict(), b.summary.to_dict(), "summary")


def check_invariants(case: Case, result, decisions=None) -> None:
    """The invariants of one finished run (module docstring)."""
    e, w = case.engine, case.workload
    req, tl, summary = result.requests, result.timeline, result.summary
    num_blocks = case.num_blocks()
    capacity = num_blocks - 1  # vLLM's null block is never handed out

    # requests: each exactly once, completed or rejected, rejected exactly when it cannot fit
    n = len(w)
    np.testing.assert_array_equal(np.sort(req["request_id"]), np.arange(n))
    rid = req["request_id"]
    status = req["status"]
    assert set(status) <= {"completed", "rejected"}
    done, rejected = status == "completed", status == "rejected"
    needed = w.prompt_tokens[rid] + w.output_tokens[rid]
    np.testing.assert_array_equal(rejected, needed > min(e.max_model_len, capacity * e.block_size))
    assert all(bool(r) == bool(reason) for r, reason in zip(rejected, req["reject_reason"], strict=True))
    np.testing.assert_array_equal(req["output_tokens"][done], w.output_tokens[rid][done])
    np.testing.assert_array_equal(req["prompt_tokens"], w.prompt_tokens[rid])
    assert (summary["requests"], summary["completed"], summary["rejected"], summary["failed"]) == (
        n, int(done.sum()), int(rejected.sum()), 0)

    # KV: within capacity, empty exactly when nothing runs, all free at the end
    used, running = tl["kv_blocks_used"], tl["running"]
    assert np.all((used >= 0) & (used <= capacity))
    np.testing.assert_array_equal(used == 0, running == 0)
    np.testing.assert_array_equal(tl["kv_usage"], used / max(capacity, 1))
    assert np.all(running <= e.max_num_seqs)
    assert np.all(tl["waiting"] >= 0) and np.all(running + tl["waiting"] <= n)
    if done.any():
        assert len(used) and used[-1] == 0 and running[-1] == 0 and tl["waiting"][-1] == 0
    else:
        assert len(used) == 0  # nothing ran
    assert req["preemptions"].sum() == summary["preemptions"]
    # (should be ==: test_timeline_counts_the_preemptions_of_a_schedule_that_ran_nothing)
    assert tl["preempted"].sum() == req["preemptions"].sum()
    assert np.all(req["kv_block_seconds"] >= 0)
    assert np.all(req["kv_block_seconds"][rejected] == 0)

    # scheduler limits per step
    assert np.all(tl["batch_size"] <= e.max_num_seqs)
    assert np.all(tl["prefill_tokens"] + tl["decode_tokens"] <= e.max_num_batched_tokens)
    for out in decisions or ():
        assert out.total_tokens <= e.max_num_batched_tokens
        assert len(out.num_scheduled) <= e.max_num_seqs

    # clock: positive steps, each after the previous one, none finishing after the run
    end, step = tl["time_s"], tl["step_time_s"]
    assert np.all(step > 0)
    assert np.all(np.diff(end) >= 0)
    start = end - step
    assert np.all(start[1:] >= end[:-1] - 1e-9 * np.maximum(1.0, end[:-1]))
    if len(end):
        assert np.all(req["finish_s"][done] <= end[-1])
    assert np.all(req["finish_s"] >= req["arrival_s"])

    # latencies of completed requests: 0 <= queue < TTFT <= TTFVT <= E2E
    queue, ttft, ttfvt, e2e = (req[k][done] for k in ("queue_s", "ttft_s", "ttfvt_s", "e2e_s"))
    assert np.all(np.isfinite(queue) & np.isfinite(ttft) & np.isfinite(e2e))
    # (should be >= 0: test_no_request_is_scheduled_before_it_arrives)
    assert np.all(queue >= 0)
    assert np.all(ttft > queue)
    all_reasoning = w.reasoning_tokens[rid][done] >= w.output_tokens[rid][done]
    np.testing.assert_array_equal(np.isnan(ttfvt), all_reasoning)
    visible = ~all_reasoning
    assert np.all(ttfvt[visible] >= ttft[visible])
    assert np.all(e2e[visible] >= ttfvt[visible])
    assert np.all(e2e >= ttft)
    tpot = req["tpot_s"][done]
    several = req["output_tokens"][done] > 1
    assert np.all(tpot[several] >= 0) and np.all(np.isnan(tpot[~several]))
    assert np.all(np.isnan(req["ttft_s"][rejected])) and np.all(np.isnan(req["e2e_s"][rejected]))


def describe(case: Case, result) -> list[str]:
    """What an example covered, for the statistics line."""
    e, s = case.engine, result.summary
    tags = [f"arrivals={case.arrivals}",
            "async" if result.summary["async_scheduling"] else "sync",
            "chunked" if e.enable_chunked_prefill else "unchunked"]
    tags += [tag for tag, on in (
        ("long_prefill_threshold", e.long_prefill_token_threshold > 0),
        ("prefix_caching", e.enable_prefix_caching),
        ("prefix_hits", s["prefix_cache"]["hit_tokens"] > 0),
        ("speculative", e.speculative.enabled),
        ("kv_quantized", e.kv_cache_dtype.startswith("fp8")),
        ("blocks_override", e.num_gpu_blocks_override is not None),
        ("preemptions", s["preemptions"] > 0),
        ("rejections", s["rejected"] > 0),
        ("1-token_prompt", bool((case.workload.prompt_tokens == 1).any())),
        ("1-token_output", bool((case.workload.output_tokens == 1).any())),
        ("whole_reasoning_output", bool((case.workload.reasoning_tokens == case.workload.output_tokens).any())),
        ("output_over_half_context", bool((case.workload.output_tokens > e.max_model_len // 2).any())),
    ) if on]
    return tags


def test_invariants_hold_on_both_paths_and_runs_are_deterministic(record_property, capsys):
    seen: Counter[str] = Counter()

    @PROPERTY_SETTINGS
    @given(case=cases())
    def check(case: Case) -> None:
        step = run(case, fast=False, keep_decisions=True)
        check_invariants(case, step, step.decisions)
        fast = run(case, fast=True)
        check_invariants(case, fast)
        assert_same_to_rounding(step, fast, "fast path vs step by step")
        assert_identical(fast, run(case, fast=True), "same seed, second run")
        seen["examples"] += 1
        seen.update(describe(case, step))

    check()
    examples = seen.pop("examples", 0)
    record_property("hypothesis_examples", examples)
    with capsys.disabled():
        print(f"\n[engine invariants] {examples} examples (max_examples={EXAMPLES}), each run step by step, "
              f"fast and fast again; covered: " + ", ".join(f"{k} {v}" for k, v in sorted(seen.items())))
    # the examples ran and reached the cases the invariants are about
    assert examples >= EXAMPLES * 0.9
    for tag in ("async", "sync", "chunked", "unchunked", "prefix_hits", "speculative", "kv_quantized",
                "preemptions", "rejections", "1-token_prompt", "1-token_output", "whole_reasoning_output",
                "arrivals=burst", "arrivals=gamma", "arrivals=poisson"):
        assert seen[tag] > 0, f"no example covered {tag}"


def two_requests(arrival_s, prompt=(1, 1), output=(1, 1)) -> Workload:
    return Workload(arrival_s=np.array(arrival_s), prompt_tokens=np.array(prompt), output_tokens=np.array(output),
                    reasoning_tokens=np.zeros(2, np.int64), domain=np.full(2, "math", object))


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_no_request_is_scheduled_before_it_arrives(async_scheduling, fast):
    w = two_requests([1.9511367522800154, 3.9999999999999996])
    r = simulate(w, EngineConfig(), VectorLinearModel(), async_scheduling=async_scheduling, fast=fast)
    assert np.all(r.requests["queue_s"] >= 0)


@pytest.mark.parametrize("fast", [False, True])
def test_timeline_counts_the_preemptions_of_a_schedule_that_ran_nothing(fast):
    w = two_requests([0.0, 0.0], output=(2, 3))
    config = EngineConfig(block_size=1, max_model_len=16, max_num_seqs=2, max_num_batched_tokens=16,
                          num_gpu_blocks_override=5)
    r = simulate(w, config, VectorLinearModel(), async_scheduling=True, fast=fast)
    assert r.requests["preemptions"].sum() == 1  # the case has its preemption
    assert r.timeline["preempted"].sum() == r.requests["preemptions"].sum()


def test_a_stopped_run_is_the_prefix_of_the_full_run():
    """request_stop ends a run at a step boundary; what finished by then is what the full run says."""
    from simulator.engine.loop import Engine
    from simulator.engine.tabulate import tabulate

    w = make_workload(150, seed=9, rate=20.0, output=(50, 600))
    config = EngineConfig(num_gpu_blocks_override=300, max_num_seqs=32)
    full = simulate(w, config, LinearModel(), seed=1)
    perf = LinearModel()
    kv = perf.kv_capacity(config.block_size, config.gpu_memory_utilization, config.num_gpu_blocks_override)
    finished = []

    def on_progress(n):
        finished.append(n)
        if sum(finished) >= 40:
            engine.request_stop()

    engine = Engine(w, config, perf, kv, seed=1, on_progress=on_progress)
    stopped = engine.run()
    assert engine.interrupted
    partial = tabulate(stopped, w, SLO())
    done = partial.requests["status"] == "completed"
    assert 40 <= done.sum() < 150 and (partial.requests["status"] == "unfinished").any()
    ids = partial.requests["request_id"][done]
    for column in ("ttft_s", "e2e_s", "tpot_s", "preemptions", "output_tokens"):
        np.testing.assert_array_equal(partial.requests[column][done], full.requests[column][ids], column)
    steps = len(partial.timeline["time_s"])
    np.testing.assert_array_equal(partial.timeline["kv_blocks_used"], full.timeline["kv_blocks_used"][:steps])


def test_a_padded_speculative_decode_is_not_cut_by_the_long_prefill_threshold():
    """A one-token remainder admitted with a prefix hit is padded to 1 + k tokens; the threshold
    (1 here) must not cut it to 1 token while its draft slot stays counted (3 tokens in a 2-token
    budget, found by the property test)."""
    prompt = [12, 1, 1, 1, 1, 1, 1, 47, 1, 1, 1, 27, 33, 1, 8, 47, 1, 1, 1, 1, 10, 31, 26, 2, 1, 1, 1, 1,
              1, 1, 1, 1, 1, 1, 1, 4, 1, 43, 1, 1]
    group = [0, -1, 0, -1, 0, -1, 0, 0, 0, -1, 0, 0, 0, -1, 0, 0, -1, -1, 0, -1, 0, 0, 0, 0, -1, -1, -1,
             0, -1, -1, -1, -1, 0, 0, -1, 0, 0, 0, -1, -1]
    n = len(prompt)
    w = Workload(arrival_s=np.zeros(n), prompt_tokens=np.array(prompt), output_tokens=np.ones(n, np.int64),
                 reasoning_tokens=np.zeros(n, np.int64), domain=np.full(n, "math", object),
                 prefix_group=np.array(group), prefix_tokens=(np.array(group) >= 0).astype(np.int64))
    config = EngineConfig(block_size=1, max_num_seqs=2, max_num_batched_tokens=2, max_model_len=16,
                          long_prefill_token_threshold=1, enable_prefix_caching=True,
                          speculative={"method": "ngram", "num_speculative_tokens": 1,
                                       "acceptance_rate": [0.0], "proposal_rate": 1.0})
    r = simulate(w, config, TinyGPU("auto", 3072), keep_decisions=True)
    padded = [out for out in r.decisions if out.spec_padding]
    assert padded, "the case pads a decode"
    for out in r.decisions:
        assert out.total_tokens <= 2
        assert sum(out.batch.prefill_tokens) + len(out.batch.decode_context) + sum(out.batch.decode_spec_tokens) <= 2
    tl = r.timeline
    assert np.all(np.asarray(tl["prefill_tokens"]) + np.asarray(tl["decode_tokens"]) <= 2)
