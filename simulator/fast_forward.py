"""The fast path: many decode steps advanced at once, exactly.

Reasoning requests spend most of their life decoding. Between events that
change the batch (an arrival that can be admitted, a KV block that cannot be
had), every engine step schedules the running requests one token each, so the
steps can be computed in closed form: step times come vectorised from
``PerformanceModel.decode_times``, new KV blocks are taken in the order the
step-by-step scheduler would take them, and the timeline gets one row per step.
A request's last token does not end a run when nobody waits: the run goes on
with one request fewer, its blocks freed between the steps scheduled before and
after its last output (with requests waiting, the freed blocks might admit the
head, so the run stops before). The results equal the step-by-step path's
(tests/simulator/test_fast_forward.py checks it); the event that ends a run is
left to the ordinary path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.request import SimRequest
from simulator.scheduler import NativeScheduler, SchedulerOutput

#: steps computed ahead per attempt (the engine plans up to twice the last run)
INITIAL_HORIZON = 256
MAX_HORIZON = 1 << 16


@dataclass
class DecodeRun:
    """k pure-decode steps planned from the current state."""

    k: int
    step_times: np.ndarray  # d_1..d_k (async: of S_{j+1}..S_{j+k})
    computed: np.ndarray  # each running request's computed tokens before the run
    # each new KV block of the run, in the order the blocks are taken: its step
    # (1..k) and the running index of the request it goes to
    block_steps: np.ndarray
    block_owners: np.ndarray
    # each running request's last step (it is in steps 1..last): its tokens after the step in
    # flight; a request with last + in-flight steps <= k finishes inside the run
    last_steps: np.ndarray


def _crossing_steps(c: np.ndarray, held: np.ndarray, block_size: int, k
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(steps, running indices) of every new block the requests need in steps 1..k, in vLLM's order.

    At step i a request with c computed tokens before the run allocates slots
    for c + i tokens; it needs a new block when that passes its held blocks.
    Within a step, blocks go to the running requests in order. ``k`` may be an
    array: each request's own last step.
    """
    first = held * block_size - c + 1  # first step needing a new block (>= 1)
    needing = np.flatnonzero(first <= k)
    if not len(needing):
        return needing, needing
    last = k[needing] if isinstance(k, np.ndarray) else k
    counts = (last - first[needing]) // block_size + 1
    owners = np.repeat(needing, counts)
    rank = np.arange(len(owners)) - np.repeat(np.cumsum(counts) - counts, counts)
    steps = first[owners] + block_size * rank
    order = np.lexsort((owners, steps))
    return steps[order], owners[order]


def plan(
    sched: NativeScheduler,
    decode_times,
    schedule_times_from,
    next_arrival_s: float,
    horizon: int,
    in_flight_steps: int,
) -> DecodeRun | None:
    """Plan a run of pure-decode steps, or None if the next step is not one.

    Step times are computed for ``horizon`` steps first; when the next arrival
    (which ends the run) lies beyond them, for as many more as should reach it.
    ``schedule_times_from(step_times)`` gives, for each planned step, the time
    at which it would be scheduled (sync and async scheduling differ).
    ``in_flight_steps`` is 0 under sync scheduling and 1 under async.
    """
    cfg = sched.config
    running = sched.running
    n = len(running)
    if n == 0 or n > cfg.max_num_batched_tokens or cfg.speculative.enabled:
        return None
    waiting = sched.waiting
    if waiting and not head_blocked(sched, waiting[0]):
        return None
    lag = in_flight_steps
    remaining = []
    for r in running:
        if r.placeholders != lag or r.num_computed != r.num_prompt + r.num_output - 1 + lag or r.stale_tokens:
            return None
        remaining.append(r.max_tokens - r.num_output - lag)
    # A request with m tokens to come after the step in flight is in the run's steps 1..m and
    # finishes when the output of step m arrives. With requests waiting, the run stops before
    # the first finish (the blocks it frees may admit the head); else finishes happen inside
    # the run, and only the last request's goes through the ordinary path.
    through_finishes = not waiting
    k_max = (max(remaining) if through_finishes else min(remaining)) - (1 - lag)
    if k_max < 1:
        return None
    c = np.fromiter((r.num_computed for r in running), dtype=np.int64, count=n)
    k_max = min(k_max, int(cfg.max_model_len - 1 - c.max()), MAX_HORIZON)
    if k_max < 1:
        return None
    last_steps = np.array(remaining, dtype=np.int64)
    if through_finishes and min(remaining) < k_max:
        # the batch shrinks after each request's last step: segments of steps with the same
        # requests, each (first step, its request count, their computed tokens before the run)
        by_last = np.argsort(last_steps, kind="stable")
        ends = last_steps[by_last].tolist()
        sums = np.cumsum(c[by_last][::-1])[::-1].tolist()  # computed tokens of requests i.. in order
        segments = [(1, n, sums[0])]
        for i, end in enumerate(ends[:-1]):
            if end != ends[i + 1]:
                segments.append((end + 1, n - i - 1, sums[i + 1]))

        def step_times(first: int, last: int) -> np.ndarray:
            """Times of steps first..last: each has the requests not finished before it."""
            parts = []
            for j, (start, count, context) in enumerate(segments):
                stop = segments[j + 1][0] - 1 if j + 1 < len(segments) else last
                a, b = max(start, first), min(stop, last)
                if a <= b:
                    parts.append(decode_times(count, context + count * np.arange(a, b + 1, dtype=np.float64)))
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
    else:
        context = int(c.sum())

        def step_times(first: int, last: int) -> np.ndarray:
            """Times of steps first..last (each adds one token per running request)."""
            return decode_times(n, context + n * np.arange(first, last + 1, dtype=np.float64))

    times = step_times(1, min(k_max, horizon))
    k = len(times)
    if not waiting and next_arrival_s != float("inf"):
        # the run ends with the last step scheduled before the next arrival; while
        # that lies beyond the steps computed, compute as many more as should reach it
        while True:
            sched_at = schedule_times_from(times)
            k = int(np.searchsorted(sched_at, next_arrival_s, side="left"))
            if k < len(times) or len(times) == k_max:
                break
            more = int((next_arrival_s - sched_at[-1]) / times[-1] * 1.1) + 16
            times = np.concatenate((times, step_times(len(times) + 1, min(len(times) + more, k_max))))
    if k < 1:
        return None
    held = np.fromiter((len(sched.kv.req_blocks[r.rid]) for r in running), dtype=np.int64, count=n)
    steps, owners = _crossing_steps(c, held, sched.block_size, np.minimum(last_steps, k))
    free = sched.kv.num_free_blocks
    if len(steps) > free:
        # that step would preempt (blocks freed by finishes inside the run are not counted:
        # the run may end earlier than it could, never later)
        k = int(steps[free]) - 1
        if k < 1:
            return None
        kept = int(np.searchsorted(steps, k, side="right"))
        steps, owners = steps[:kept], owners[:kept]
    return DecodeRun(k=k, step_times=times[:k], computed=c, block_steps=steps, block_owners=owners,
                     last_steps=last_steps)


def head_blocked(sched: NativeScheduler, head: SimRequest) -> bool:
    """True if the head of the queue cannot be admitted until something finishes."""
    if len(sched.running) >= sched.config.max_num_seqs:
        return True
    if head.stale_tokens:
        return False
    kv = sched.kv
    hits = kv.computed_blocks(head, head.num_tokens) if head.num_computed == 0 else []
    full = min(head.num_tokens, sched.max_model_len)
    return kv.blocks_needed(head.rid, full, hits) > kv.num_free_blocks


@dataclass
class AppliedRun:
    """What a run did, row by row (a row is a step whose output arrives in the run)."""

    kv_blocks_used: np.ndarray  # after each row's output
    batch: np.ndarray  # requests in each row's step
    running: np.ndarray  # requests still running after each row's output
    finished: list[SimRequest]


def apply_run(sched: NativeScheduler, run: DecodeRun, sched_at: np.ndarray, token_times: np.ndarray,
              in_flight_steps: int) -> AppliedRun:
    """Carry out a planned run: new KV blocks, tokens, and the requests finishing inside it.

    Row i's output arrives at ``token_times[i]``; step t of the run is scheduled at
    ``sched_at[t - 1]``. Blocks leave the free queue in the step-by-step order (step,
    then running order); a request finishing inside the run frees its blocks after the
    blocks of the steps scheduled before its last output and before the later ones', as
    the engine's loop does.
    """
    kv = sched.kv
    running = sched.running
    n, k, lag = len(running), run.k, in_flight_steps
    last = run.last_steps
    steps, owners = run.block_steps, run.block_owners
    row_steps = np.arange(1 - lag, k + 1 - lag)  # the step whose output each row applies
    sorted_last = np.sort(last)
    batch = n - np.searchsorted(sorted_last, row_steps, side="left")
    still = n - np.searchsorted(sorted_last, row_steps, side="right")
    used = kv.num_used_blocks + np.cumsum(np.bincount(steps - 1, minlength=k))
    finishing = np.flatnonzero(last + lag <= k)
    finished: list[SimRequest] = []
    if not len(finishing):
        _hand_out(kv, running, steps, owners, sched_at)
        deliver(running, k, token_times)
        kv.cache_many(running, (run.computed + k - lag).tolist())
    else:
        released = np.zeros(k, dtype=np.int64)
        taken = 0
        finishing = finishing[np.argsort(last[finishing], kind="stable")]  # by last step, then order
        for i in finishing.tolist():
            row = int(last[i]) + lag - 1  # the row bringing its last token
            cut = int(np.searchsorted(steps, row + 1, side="right"))  # steps scheduled before it
            if cut > taken:
                _hand_out(kv, running, steps[taken:cut], owners[taken:cut], sched_at)
                taken = cut
            req = running[i]
            now = kv.clock = float(token_times[row])
            before = kv.num_used_blocks
            kv.cache_full_blocks(req, int(run.computed[i] + last[i]))
            sched.finish(req, now)
            released[row] += before - kv.num_used_blocks
            finished.append(req)
        _hand_out(kv, running, steps[taken:], owners[taken:], sched_at)
        used = used - np.cumsum(released)
        counts = np.minimum(last + lag, k)
        deliver(running, k, token_times, counts.tolist(), np.minimum(last, k).tolist())
        for req in finished:
            req.placeholders = req.in_flight_tokens = 0  # as its last output leaves them
        done = set(finishing.tolist())
        going_on = [i for i in range(n) if i not in done]
        sched.running = [running[i] for i in going_on]
        kv.cache_many(sched.running, (run.computed[going_on] + k - lag).tolist())
    kv.clock = float(sched_at[-1])
    return AppliedRun(used, batch, still, finished)


def _hand_out(kv, running: list[SimRequest], steps: np.ndarray, owners: np.ndarray,
              sched_at: np.ndarray) -> None:
    """Take ``len(steps)`` blocks from the free queue and give each to its owner (a running
    index); each counts toward block-seconds from the time its step is scheduled."""
    if not len(steps):
        return
    blocks = kv.take_free_blocks(len(steps))
    n = len(running)
    counts = np.bincount(owners, minlength=n)
    acquired_s = np.bincount(owners, weights=sched_at[steps - 1], minlength=n).tolist()
    by_request = blocks[np.argsort(owners, kind="stable")].tolist()  # each in step order
    start = 0
    for idx, count in enumerate(counts.tolist()):
        if count:
            end = start + count
            kv.add_taken_blocks(running[idx].rid, by_request[start:end], acquired_s[idx])
            start = end


def deliver(running: list[SimRequest], k: int, token_times: np.ndarray, tokens: list[int] | None = None,
            scheduled: list[int] | None = None) -> None:
    """Each running request gets one token at each of ``token_times`` (k of them), or, per
    request, its first ``tokens[i]`` of them after ``scheduled[i]`` steps of compute."""
    for i, r in enumerate(running):
        d = k if tokens is None else tokens[i]
        if r.num_output == 0:
            r.first_token_s = float(token_times[0])
        if r.first_visible_s < 0:
            j = r.reasoning_tokens - r.num_output  # 0-based index of the first visible token
            if 0 <= j < d:
                r.first_visible_s = float(token_times[j])
        r.num_output += d
        r.num_computed += k if scheduled is None else scheduled[i]
        r.last_token_s = float(token_times[d - 1])


def synthesize_step(sched: NativeScheduler) -> SchedulerOutput:
    """The SchedulerOutput of a pure-decode step over the current running requests."""
    sched.step += 1
    out = SchedulerOutput(step=sched.step)
    for r in sched.running:
        out.num_scheduled[r.rid] = 1
        out.sampling.add(r.rid)
        out.batch.decode_context.append(r.num_computed)
    return out
