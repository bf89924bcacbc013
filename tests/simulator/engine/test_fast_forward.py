"""The fast path gives the step-by-step path's results (the differential test)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.engine.kv_cache import KVCacheManager
from simulator.engine.loop import simulate
from simulator.engine.run_plan import crossing_steps
from simulator.records.engine_config import EngineConfig
from tests.simulator.conftest import VectorLinearModel, make_workload


def assert_same(slow, fast):
    assert slow.summary["steps"] == fast.summary["steps"]
    for table in ("requests", "timeline"):
        a, b = getattr(slow, table), getattr(fast, table)
        for key in a:
            x, y = a[key], b[key]
            if x.dtype.kind == "f" and key != "kv_block_seconds":  # (block-seconds: exact tick sums)
                np.testing.assert_allclose(y, x, rtol=1e-9, atol=1e-9, err_msg=f"{table}.{key}")
            else:
                np.testing.assert_array_equal(y, x, err_msg=f"{table}.{key}")


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("blocks", [None, 300])
def test_fast_path_matches_step_by_step_on_reasoning_lengths(async_scheduling, blocks):
    w = make_workload(n=60, seed=3, rate=2, output=(1, 3000))
    cfg = EngineConfig(num_gpu_blocks_override=blocks, max_model_len=8192)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    assert_same(slow, fast)
    if blocks:
        assert slow.summary["preemptions"] > 0  # the case covers preemption


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    seed=st.integers(0, 1000),
    rate=st.floats(0.2, 30),
    blocks=st.sampled_from([None, 60, 150, 400]),
    max_num_seqs=st.sampled_from([2, 8, 256]),
    budget=st.sampled_from([32, 512, 8192]),
    prefix=st.booleans(),
    groups=st.sampled_from([0, 3]),
    async_scheduling=st.booleans(),
    threshold=st.sampled_from([0, 0, 64]),
)
def test_fast_path_matches_on_varied_workloads(n, seed, rate, blocks, max_num_seqs, budget, prefix,
                                                groups, async_scheduling, threshold):
    w = make_workload(n=n, seed=seed, rate=rate, prompt=(1, 700), output=(1, 900),
                      prefix_groups=groups, prefix_tokens=48 if groups else 0)
    cfg = EngineConfig(num_gpu_blocks_override=blocks, max_model_len=2048, max_num_seqs=min(max_num_seqs, budget),
                       max_num_batched_tokens=budget, enable_prefix_caching=prefix,
                       long_prefill_token_threshold=threshold)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    assert_same(slow, fast)


class KVSpy:
    """Counts what the KV cache did in a run: prefix hits of a request on its own freed
    blocks (after a preemption) and evictions of shared prefix blocks."""

    def __init__(self, monkeypatch):
        self.own_hits = 0
        self.shared_evictions = 0
        private_hits, evict_shared = KVCacheManager._private_hits, KVCacheManager._evict_shared

        def counting_private_hits(kv, *args):
            hits = private_hits(kv, *args)
            self.own_hits += len(hits)
            return hits

        def counting_evict_shared(kv, block):
            self.shared_evictions += 1
            evict_shared(kv, block)

        monkeypatch.setattr(KVCacheManager, "_private_hits", counting_private_hits)
        monkeypatch.setattr(KVCacheManager, "_evict_shared", counting_evict_shared)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_fast_path_matches_under_prefix_cache_eviction_and_recompute(async_scheduling, monkeypatch):
    # shared prefixes in three groups, a KV cache far too small for the long decodes:
    # preempted requests come back and hit their own freed blocks, prefix blocks are
    # evicted and computed again
    w = make_workload(n=50, seed=11, rate=4, prompt=(100, 600), output=(200, 2000),
                      prefix_groups=3, prefix_tokens=96)
    cfg = EngineConfig(num_gpu_blocks_override=200, max_model_len=4096, max_num_seqs=16)
    spy = KVSpy(monkeypatch)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    assert slow.summary["preemptions"] > 0
    assert slow.summary["prefix_cache"]["hit_tokens"] > 0
    assert spy.own_hits > 0 and spy.shared_evictions > 0
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    assert_same(slow, fast)
    assert np.array_equal(slow.requests["preemptions"], fast.requests["preemptions"])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 3), st.integers(1, 30), st.integers(0, 80)),
                min_size=1, max_size=8),
       st.sampled_from([1, 4, 16]), st.integers(1, 70))
def test_crossing_steps_follow_the_step_by_step_allocation_order(requests, block_size, k):
    # each member, with c computed tokens before its first decode step f, holds just enough
    # blocks (plus some spare) and decodes in steps f..last
    c = np.array([tokens for tokens, *_ in requests])
    held = np.array([-(-tokens // block_size) + spare for tokens, spare, *_ in requests])
    first = np.array([f for *_, f, _ in requests])
    last = np.array([f + length for *_, f, length in requests])
    expected, blocks = [], held.copy()
    for step in range(1, k + 1):  # as the scheduler allocates: step by step, in running order
        for idx in range(len(requests)):
            if first[idx] <= step <= last[idx] and c[idx] + step - first[idx] + 1 > blocks[idx] * block_size:
                expected.append((step, idx))
                blocks[idx] += 1
    steps, owners = crossing_steps(c, held, block_size, np.minimum(last, k), first)
    assert list(zip(steps.tolist(), owners.tolist(), strict=True)) == expected


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 30), st.integers(0, 600)), min_size=2, max_size=40),
       st.integers(1, 600))
def test_crossing_steps_keep_their_order_past_16_bit_steps(requests, k):
    # the order (by step, then member) does not depend on where the steps lie: the same
    # members decoding 70,000 steps later (past a 16-bit step) take their blocks in the same order
    c = np.array([tokens for tokens, *_ in requests])
    held = -(-c // 16)
    first = np.array([f for _, f, _ in requests])
    last = np.minimum(first + np.array([length for *_, length in requests]), k)
    steps, owners = crossing_steps(c, held, 16, last, first)
    shift = 70_000
    later, later_owners = crossing_steps(c, held, 16, last + shift, first + shift)
    assert later.min(initial=shift) >= shift and np.array_equal(later - shift, steps)
    assert np.array_equal(later_owners, owners)


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("prefix", [False, True])
def test_requests_finish_inside_decode_runs_as_step_by_step(async_scheduling, prefix, monkeypatch):
    # a burst of requests of different lengths and no queue: the runs go on through
    # completions, whose freed blocks the others take inside the same run (a tight KV cache)
    from simulator.engine import fast_forward

    w = make_workload(n=12, seed=4, rate=50, prompt=(40, 300), output=(100, 1500),
                      prefix_groups=2 if prefix else 0, prefix_tokens=32 if prefix else 0)
    cfg = EngineConfig(num_gpu_blocks_override=400, max_model_len=2048, enable_prefix_caching=prefix)
    inside = []
    apply_run = fast_forward.apply_run

    def counting(*args, **kwargs):
        applied = apply_run(*args, **kwargs)
        inside.extend(applied.finished)
        return applied

    monkeypatch.setattr(fast_forward, "apply_run", counting)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    assert len(inside) >= 5  # most completions happened inside runs
    assert_same(slow, fast)


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize(("prefix", "threshold", "blocks"), [(False, 0, None), (True, 0, 700), (True, 200, None)])
def test_arrivals_are_admitted_inside_decode_runs_as_step_by_step(async_scheduling, prefix, threshold, blocks,
                                                                  monkeypatch):
    # light load: long decodes, arrivals a few seconds apart, some with a shared prefix (a
    # prefix-cache lookup ends a run), prompts above the chunking threshold (so do they), and
    # a KV cache that runs short: most arrivals join a run, the others end one
    from simulator.engine import fast_forward

    w = make_workload(n=40, seed=8, rate=0.6, prompt=(20, 400), output=(200, 3000),
                      prefix_groups=2 if prefix else 0, prefix_tokens=32 if prefix else 0)
    if prefix:
        w.prefix_group[::2] = -1  # half the requests share no prefix
    cfg = EngineConfig(num_gpu_blocks_override=blocks, max_model_len=4096, enable_prefix_caching=prefix,
                       long_prefill_token_threshold=threshold)
    admitted = []
    apply_run = fast_forward.apply_run

    def counting(sched, run, *args, **kwargs):
        admitted.extend(a.rid for a in run.admissions)
        return apply_run(sched, run, *args, **kwargs)

    monkeypatch.setattr(fast_forward, "apply_run", counting)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    assert_same(slow, fast)
    assert len(admitted) >= 5  # arrivals joined runs
    if prefix:  # those with a shared prefix (or a prompt to chunk) ended runs instead
        assert len(admitted) <= 0.6 * len(w)
    if blocks:
        assert slow.summary["kv_usage"]["peak"] > 0.8  # the KV cache did run short


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_one_token_prompts_admitted_inside_runs_are_decodes(async_scheduling):
    # vLLM's batch counts a one-token prompt as a decode (its step time and the timeline say so)
    w = make_workload(n=30, seed=2, rate=1.0, prompt=(1, 3), output=(100, 600))
    cfg = EngineConfig(max_model_len=2048)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    assert (w.prompt_tokens == 1).sum() >= 5
    assert_same(slow, fast)


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("budget", [512, 8192])
def test_bursts_admitted_together_inside_runs_as_step_by_step(async_scheduling, budget, monkeypatch):
    # arrivals in bursts of three within a millisecond, while long decodes run: one step admits
    # them together (within the token budget; the rest of a burst ends the run), one-token
    # prompts among them
    from simulator.engine import fast_forward
    from simulator.records.workload import Workload

    rng = np.random.default_rng(5)
    bursts = np.arange(1, 21) * 0.7
    arrival = np.concatenate(([0.0], np.repeat(bursts, 3) + np.tile([0.0, 0.0002, 0.0004], len(bursts))))
    n = len(arrival)
    prompt = rng.integers(40, 300, n)
    prompt[rng.random(n) < 0.25] = 1
    output = rng.integers(300, 1500, n)
    w = Workload(arrival_s=arrival, prompt_tokens=prompt, output_tokens=output,
                 reasoning_tokens=output // 2, domain=np.full(n, "math", object))
    cfg = EngineConfig(max_model_len=4096, max_num_batched_tokens=budget, max_num_seqs=min(256, budget))
    shared = []
    apply_run = fast_forward.apply_run

    def counting(sched, run, *args, **kwargs):
        steps = [a.step for a in run.admissions]
        shared.extend(s for s in set(steps) if steps.count(s) > 1)
        return apply_run(sched, run, *args, **kwargs)

    monkeypatch.setattr(fast_forward, "apply_run", counting)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    assert_same(slow, fast)
    assert len(shared) >= 5  # steps that admitted two or three arrivals of a burst


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 500), st.integers(0, 40)), min_size=1, max_size=12),
       st.integers(1, 20), st.integers(0, 40))
def test_step_times_of_few_members_equal_the_numpy_segments(members, first, width):
    # two ways to the same step times: segment by segment in Python (a few members) and with
    # numpy (many); members decode from step f, with c tokens computed, until f + length
    from simulator.engine.run_plan import Members

    perf = VectorLinearModel()  # step times distinct per count and context
    last = first + width
    group = Members(np.array([c for _, c, _ in members]), [f + n for f, _, n in members], [0] * len(members))
    group.first = [f for f, _, _ in members]
    active = [(f, c, f + n) for f, c, n in members]
    if any(not any(f <= t <= end for f, _, end in active) for t in range(first, last + 1)):
        return  # a step without members is not a run's
    few = group._few_step_times(perf, first, last)
    extra = Members.FEW + 1 - len(members)  # more than a few: the numpy path (the extra members never decode)
    big = Members.from_arrays(np.array(group.first + [10**6] * extra), np.array(group.computed + [0] * extra),
                              np.array(group.last + [0] * extra), np.zeros(len(members) + extra, dtype=np.int64))
    many = big.step_times(perf, first, last)
    np.testing.assert_array_equal(many, few)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 500), st.integers(0, 40), st.integers(0, 3)),
                min_size=1, max_size=70),
       st.integers(1, 60), st.sampled_from([1, 16]))
def test_members_retired_before_a_step_answer_as_all_of_them(members, floor, block_size):
    # a walk retires the members done before the steps it still asks about: every question
    # about a step from there on (``running_after`` from the step before) has the same answer
    from simulator.engine.run_plan import Members

    perf = VectorLinearModel()

    def group() -> Members:
        g = Members(np.array([c for _, c, _, _ in members[:1]]), [f + n for f, _, n, _ in members[:1]],
                    [h for *_, h in members[:1]])
        g.first = [members[0][0]]
        for f, c, n, h in members[1:]:
            g.add(f, c, f + n, h)
        return g

    every, retired = group(), group()
    retired.retire_before(floor, block_size)
    assert len(retired._live) < len(members) or all(f + n >= floor for f, _, n, _ in members)
    for step in range(floor, floor + 45):
        assert retired.decoding(step) == every.decoding(step)
        assert retired.running_after(step - 1) == every.running_after(step - 1)
        assert retired.new_blocks_through(step, block_size) == every.new_blocks_through(step, block_size)
        assert retired.prefill_step_time(perf, step, [7]) == every.prefill_step_time(perf, step, [7])
    for width in (0, 3, 30):
        if all(any(f <= t <= f + n for f, _, n, _ in members) for t in range(floor, floor + width + 1)):
            np.testing.assert_array_equal(retired.step_times(perf, floor, floor + width),
                                          every.step_times(perf, floor, floor + width))


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("prefix_groups", [0, 2])
def test_runs_preempt_under_overload_as_step_by_step(async_scheduling, caching, prefix_groups, monkeypatch):
    # far more requests than the KV cache holds, arriving at once: the queue never empties, and
    # decodes short of a block preempt the last running request, inside runs of steps
    from simulator.engine import waiting_runs

    w = make_workload(n=80, seed=5, rate=50, prompt=(20, 300), output=(300, 2500),
                      prefix_groups=prefix_groups, prefix_tokens=64)
    cfg = EngineConfig(num_gpu_blocks_override=400, max_model_len=4096, max_num_seqs=32,
                       enable_prefix_caching=caching)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    assert slow.summary["preemptions"] > 20
    preempting_runs, finished_in_runs = [], []
    original = waiting_runs.apply_waiting_run

    def counted(sched, run, *args):
        preempting_runs.append(len(run.preemptions))
        finished = original(sched, run, *args)
        finished_in_runs.append(len(finished))
        return finished

    monkeypatch.setattr(waiting_runs, "apply_waiting_run", counted)
    from simulator.engine.native import NativeScheduler

    filled = []  # admissions into a step a run left in flight
    admit_into = NativeScheduler._admit_into

    def admitting(sched, out):
        before = len(out.num_scheduled)
        admit_into(sched, out)
        filled.append(len(out.num_scheduled) - before)

    monkeypatch.setattr(NativeScheduler, "_admit_into", admitting)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    assert_same(slow, fast)
    assert np.array_equal(slow.requests["preemptions"], fast.requests["preemptions"])
    if prefix_groups and caching:  # victims holding shared prefix blocks: the ordinary path preempts
        assert sum(preempting_runs) == 0
    else:  # the runs did the preempting, not only the ordinary steps
        assert sum(preempting_runs) > 0
    if not prefix_groups:  # and requests finished inside runs while others waited
        assert sum(finished_in_runs) > 0
    if async_scheduling and not prefix_groups:  # and the step a run left in flight admitted some
        assert sum(filled) > 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_runs_preempt_as_step_by_step_when_some_requests_share_a_prefix(async_scheduling, monkeypatch):
    # overload where some requests share a prefix and others do not: a finishing member frees
    # only the blocks it holds alone (a shared block goes with its last holder), and a step that
    # needs a second victim the run cannot take (one holding a shared prefix, or one whose last
    # token is in flight) is left whole to the ordinary path, its first preemption undone
    import dataclasses

    from simulator.engine import waiting_runs

    rng = np.random.default_rng(17)
    w = make_workload(n=60, seed=17, rate=5000, prompt=(40, 40), output=(20, 300), prefix_groups=2, prefix_tokens=32)
    group = w.prefix_group.copy()
    group[rng.uniform(size=len(group)) < 0.6] = -1
    w = dataclasses.replace(w, prefix_group=group)
    cfg = EngineConfig(num_gpu_blocks_override=60, block_size=16, max_model_len=2048, max_num_seqs=64,
                       enable_prefix_caching=True)
    seen = {"undone": 0, "held_together": 0}
    restore, hold = waiting_runs._WaitingRun._restore, waiting_runs._WaitingRun._hold_together

    def undone(plan, saved):
        seen["undone"] += 1
        return restore(plan, saved)

    def held_together(plan):
        hold(plan)
        seen["held_together"] += bool(plan.together)

    monkeypatch.setattr(waiting_runs._WaitingRun, "_restore", undone)
    monkeypatch.setattr(waiting_runs._WaitingRun, "_hold_together", held_together)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    assert_same(slow, fast)
    assert np.array_equal(slow.requests["preemptions"], fast.requests["preemptions"])
    assert seen["undone"] > 0 and seen["held_together"] > 0, seen


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_waiting_runs_time_their_steps_after_the_walk(async_scheduling, monkeypatch):
    # while requests wait, a run's step times are computed once, after its walk, from the members
    # as the walk left them: a victim decodes up to the step before its preemption only, so the
    # steps from then on have one member fewer (and a member's finish as planned)
    from simulator.engine import waiting_runs

    w = make_workload(n=80, seed=5, rate=50, prompt=(20, 300), output=(300, 2500))
    cfg = EngineConfig(num_gpu_blocks_override=400, max_model_len=4096, max_num_seqs=32)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    timed_after = []  # per run timed after its walk: steps after its first preemption
    original = waiting_runs.plan_waiting_run

    def planned(sched, members, times, k, decode_times, lag, **kwargs):
        run = original(sched, members, times, k, decode_times, lag, **kwargs)
        if times is None and run is not None:
            first = min([p.step for p in run.preemptions], default=run.k + 1)
            timed_after.append(run.k - first + 1)
        return run

    monkeypatch.setattr(waiting_runs, "plan_waiting_run", planned)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    assert_same(slow, fast)
    assert np.array_equal(slow.requests["preemptions"], fast.requests["preemptions"])
    assert sum(1 for steps in timed_after if steps > 0) > 5, timed_after


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("window", [1, 7])
def test_waiting_runs_find_a_block_short_past_the_first_window(async_scheduling, window, monkeypatch):
    # the walk looks for the next block short of a free one in a first window of blocks, then in
    # the rest: with a window of a few blocks the rest is searched nearly every time, and the
    # runs' preemptions and results stay the step-by-step path's
    from simulator.engine import waiting_runs

    w = make_workload(n=80, seed=5, rate=50, prompt=(20, 300), output=(300, 2500))
    cfg = EngineConfig(num_gpu_blocks_override=400, max_model_len=4096, max_num_seqs=32)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    past = []  # blocks past the window's end where the block short was found
    original = waiting_runs._WaitingRun._first_short

    def searched(plan, pos, end, before_pos, freed):
        found = original(plan, pos, end, before_pos, freed)
        if pos + window <= found < end:
            past.append(found - pos - window)
        return found

    monkeypatch.setattr(waiting_runs, "_WINDOW", window)
    monkeypatch.setattr(waiting_runs._WaitingRun, "_first_short", searched)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    assert_same(slow, fast)
    assert np.array_equal(slow.requests["preemptions"], fast.requests["preemptions"])
    assert len(past) > 5 and max(past) > 0, past


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("blocks", [None, 700])
def test_a_walk_gone_on_through_later_arrivals_plans_the_run_planned_with_them(async_scheduling, blocks,
                                                                               monkeypatch):
    # a run's walk through the arrivals, kept and given more arrivals later (``ArrivalWalk.extend``:
    # a cluster's replica learns its requests as they are routed), plans the run that the walk
    # through them all plans: the same steps, times, members, admissions and blocks (worked out
    # when the run is applied: ``with_blocks``), the KV cache short or not
    from dataclasses import replace

    from simulator.engine import fast_forward

    w = make_workload(n=60, seed=4, rate=1.5, prompt=(20, 400), output=(200, 3000))
    cfg = EngineConfig(num_gpu_blocks_override=blocks, max_model_len=4096)
    plan = fast_forward.plan
    compared = []

    def checked(sched, perf, now, base, arrivals, next_arrival, horizon, lag, walks=None, resume=False, cut=False):
        run = plan(sched, perf, now, base, arrivals, next_arrival, horizon, lag, walks, resume=resume, cut=cut)
        if run is None or not run.admissions or walks is not None:
            return run
        rids = [a.rid for a in run.admissions]
        for cut in sorted({rids[0], rids[len(rids) // 2], rids[-1]}):  # known up to the first admitted, ...
            early = replace(arrivals, **{name: getattr(arrivals, name)[:cut]
                                         for name in ("time_s", "queued", "prompt", "max_tokens", "private")})
            kept = []
            plan(sched, perf, now, base, early, next_arrival, horizon, lag, kept)
            assert kept and kept[0].open
            again = kept[0].extend(arrivals)
            assert again is not None
            held = list(kept[0].members.held)
            again = fast_forward.with_blocks(sched, again, held)
            assert again.k == run.k and again.admissions == run.admissions
            for name in ("step_times", "first_steps", "computed", "last_steps", "block_steps", "block_owners"):
                np.testing.assert_array_equal(getattr(again, name), getattr(run, name), err_msg=name)
            compared.append(len(run.admissions))
        return run

    monkeypatch.setattr(fast_forward, "plan", checked)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    assert_same(slow, fast)
    assert len(compared) >= 3 and max(compared) >= 3, compared
    if blocks:
        assert slow.summary["kv_usage"]["peak"] > 0.8  # the KV cache did run short


def _columns_equal(a, b):
    assert a.summary["steps"] == b.summary["steps"]
    for table in ("requests", "timeline"):
        x, y = getattr(a, table), getattr(b, table)
        for key in x:
            np.testing.assert_array_equal(y[key], x[key], err_msg=f"{table}.{key}")


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("caching", [True, False])
def test_runs_admit_waiting_requests_inside_as_step_by_step(async_scheduling, caching, monkeypatch):
    # overload: victims come back inside the run that preempted them (their prefix-cache hits,
    # with caching, predicted from the free queue's counts), some are preempted again and come
    # back again in the same run; the step log equals the step-by-step path's, and bit for bit
    # the runs' that end at every admission
    from simulator.engine import waiting_runs

    w = make_workload(n=80, seed=11, rate=20, prompt=(10, 100), output=(100, 800))
    cfg = EngineConfig(num_gpu_blocks_override=200, max_model_len=4096, max_num_seqs=256,
                       enable_prefix_caching=caching)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    seen = {"runs": 0, "admitted": 0, "hits": 0, "victims": 0, "again": 0}
    original = waiting_runs.apply_waiting_run

    def applied(sched, run, *args):
        n = len(sched.running)
        seen["runs"] += 1
        seen["admitted"] += len(run.resumptions)
        seen["hits"] += sum(1 for r in run.resumptions if r.hits)
        victims = {sched.running[p.victim].rid for p in run.preemptions if p.victim < n}
        seen["victims"] += sum(1 for r in run.resumptions if r.rid in victims)
        seen["again"] += len(run.resumptions) - len({r.rid for r in run.resumptions})
        return original(sched, run, *args)

    monkeypatch.setattr(waiting_runs, "apply_waiting_run", applied)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    inside = dict(seen)
    assert_same(slow, fast)
    assert np.array_equal(slow.requests["preemptions"], fast.requests["preemptions"])
    assert inside["admitted"] > 50 and inside["victims"] > 10 and inside["again"] > 10, inside
    if caching:
        assert inside["hits"] > 10, inside
    seen.update(runs=0, admitted=0)
    monkeypatch.setattr(waiting_runs._WaitingRun, "_resume", lambda *args: False)
    ending = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    _columns_equal(ending, fast)
    assert seen["admitted"] == 0 and seen["runs"] > 2 * inside["runs"], (seen, inside)


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("caching", [True, False])
def test_runs_admit_requests_whose_prefill_the_budget_cuts_as_step_by_step(async_scheduling, caching,
                                                                           monkeypatch):
    # a small token budget: the last request a step inside a run admits is often cut, its rest
    # prefilled in the next step after that step's decodes (and more admitted after it); the
    # results equal the step-by-step path's, and the runs' that end at every cut admission
    # (``Runs.cut_prefills`` off)
    from simulator.engine import fast_forward, waiting_runs

    w = make_workload(n=80, seed=11, rate=20, prompt=(10, 300), output=(100, 800))
    cfg = EngineConfig(num_gpu_blocks_override=200, max_model_len=4096, max_num_seqs=256,
                       max_num_batched_tokens=256, enable_prefix_caching=caching)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    seen = {"runs": 0, "cut": 0, "after_cut": 0}
    original = waiting_runs.apply_waiting_run

    def applied(sched, run, *args):
        seen["runs"] += 1
        seen["cut"] += sum(1 for r in run.resumptions if r.rest)
        rests = {r.step + 1 for r in run.resumptions if r.rest}
        seen["after_cut"] += sum(1 for r in run.resumptions if r.step in rests)
        return original(sched, run, *args)

    monkeypatch.setattr(waiting_runs, "apply_waiting_run", applied)
    monkeypatch.setattr(fast_forward.Runs, "cut_prefills", True)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    inside = dict(seen)
    assert_same(slow, fast)
    assert inside["cut"] > 30 and inside["after_cut"] > 10, inside
    seen.update(runs=0, cut=0)
    monkeypatch.setattr(fast_forward.Runs, "cut_prefills", False)
    ending = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    _columns_equal(ending, fast)
    assert seen["cut"] == 0 and seen["runs"] > inside["runs"], (seen, inside)


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("reach", [1, 40])
def test_waiting_runs_make_their_blocks_a_few_steps_ahead_as_step_by_step(async_scheduling, reach, monkeypatch):
    # a walk makes the run's blocks a few steps ahead of it (``_REACH``) and an admission drops
    # those made past its step, made again with its members' (``RunBlocks.add``): with one step
    # made at a time (or a few blocks) the walk goes through stretches with no block short and
    # admissions drop blocks made ahead, and the results stay the step-by-step path's
    from simulator.engine import fast_forward, run_blocks, waiting_runs

    w = make_workload(n=80, seed=11, rate=20, prompt=(10, 300), output=(100, 800))
    cfg = EngineConfig(num_gpu_blocks_override=200, max_model_len=4096, max_num_seqs=256,
                       max_num_batched_tokens=256, enable_prefix_caching=True)
    slow = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=False)
    seen = {"dropped": 0, "made": 0}
    add, extend = run_blocks.RunBlocks.add, run_blocks.RunBlocks.extend

    def added(blocks, t, *args):
        seen["dropped"] += blocks.upto > t
        add(blocks, t, *args)

    def extended(blocks, upto):
        seen["made"] += upto > blocks.upto
        extend(blocks, upto)

    monkeypatch.setattr(run_blocks.RunBlocks, "add", added)
    monkeypatch.setattr(run_blocks.RunBlocks, "extend", extended)
    monkeypatch.setattr(waiting_runs, "_REACH", reach)
    monkeypatch.setattr(waiting_runs, "_REACH_STEPS", 1)
    monkeypatch.setattr(fast_forward.Runs, "cut_prefills", True)
    fast = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
    assert_same(slow, fast)
    assert np.array_equal(slow.requests["preemptions"], fast.requests["preemptions"])
    assert seen["dropped"] > 10 and seen["made"] > 100, seen


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_run_whose_admissions_the_scheduler_would_not_make_is_an_error(async_scheduling, monkeypatch):
    # apply_waiting_run lets the scheduler's own admission admit what the run planned and checks
    # it: one prefix-cache hit too many in the plan is caught
    from simulator.engine import waiting_runs

    w = make_workload(n=80, seed=11, rate=20, prompt=(10, 100), output=(100, 800))
    cfg = EngineConfig(num_gpu_blocks_override=200, max_model_len=4096, max_num_seqs=256)
    hits = waiting_runs._WaitingRun._hits

    def one_more(plan, *args):
        got = hits(plan, *args)
        return got if got is None or got[0] == 0 else (got[0] + 1, got[1])

    monkeypatch.setattr(waiting_runs._WaitingRun, "_hits", one_more)
    with pytest.raises(RuntimeError, match="planned the admissions"):
        simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling, fast=True)
