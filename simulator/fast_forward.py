"""The fast path: many identical decode steps advanced at once, exactly.

Reasoning requests spend most of their life decoding. Between events that
change the batch (an arrival that can be admitted, a request's last token, a
KV block that cannot be had), every engine step schedules the same running
requests one token each, so the steps can be computed in closed form: step
times come vectorised from ``PerformanceModel.decode_times``, new KV blocks are
taken in the order the step-by-step scheduler would take them, and the
timeline gets one row per step. The results equal the step-by-step path's
(tests/simulator/test_fast_forward.py checks it); the event that ends a run
of decode steps is left to the ordinary path.
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


def _crossing_steps(c: np.ndarray, held: np.ndarray, block_size: int, k: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(steps, running indices) of every new block the requests need in steps 1..k, in vLLM's order.

    At step i a request with c computed tokens before the run allocates slots
    for c + i tokens; it needs a new block when that passes its held blocks.
    Within a step, blocks go to the running requests in order.
    """
    first = held * block_size - c + 1  # first step needing a new block (>= 1)
    needing = np.flatnonzero(first <= k)
    if not len(needing):
        return needing, needing
    counts = (k - first[needing]) // block_size + 1
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
    # the step delivering a request's last token goes through the ordinary path
    k_max = min(remaining) - (1 - lag)
    if k_max < 1:
        return None
    c = np.fromiter((r.num_computed for r in running), dtype=np.int64, count=n)
    k_max = min(k_max, int(cfg.max_model_len - 1 - c.max()), MAX_HORIZON)
    if k_max < 1:
        return None
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
    steps, owners = _crossing_steps(c, held, sched.block_size, k)
    free = sched.kv.num_free_blocks
    if len(steps) > free:
        k = int(steps[free]) - 1  # that step would preempt
        if k < 1:
            return None
        kept = int(np.searchsorted(steps, k, side="right"))
        steps, owners = steps[:kept], owners[:kept]
    return DecodeRun(k=k, step_times=times[:k], computed=c, block_steps=steps, block_owners=owners)


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


def take_blocks(sched: NativeScheduler, run: DecodeRun, sched_at: np.ndarray) -> np.ndarray:
    """Hand out the run's new blocks in order; return blocks used after each step.

    Blocks leave the free queue in the step-by-step order (step, then running
    order), so eviction from the prefix cache is the same; each block counts
    toward block-seconds from the time its step is scheduled.
    """
    kv = sched.kv
    steps, owners = run.block_steps, run.block_owners
    if len(steps):
        blocks = kv.take_free_blocks(len(steps))
        n = len(sched.running)
        counts = np.bincount(owners, minlength=n)
        acquired_s = np.bincount(owners, weights=sched_at[steps - 1], minlength=n).tolist()
        by_request = blocks[np.argsort(owners, kind="stable")].tolist()  # each in step order
        start = 0
        for idx, count in enumerate(counts.tolist()):
            if count:
                end = start + count
                kv.add_taken_blocks(sched.running[idx].rid, by_request[start:end], acquired_s[idx])
                start = end
    kv.clock = float(sched_at[-1])
    return np.cumsum(np.bincount(steps - 1, minlength=run.k))


def deliver(running: list[SimRequest], k: int, token_times: np.ndarray) -> None:
    """Each running request gets one token at each of ``token_times`` (k of them)."""
    last = float(token_times[-1])
    for r in running:
        if r.num_output == 0:
            r.first_token_s = float(token_times[0])
        if r.first_visible_s < 0:
            i = r.reasoning_tokens - r.num_output  # 0-based index of the first visible token
            if 0 <= i < k:
                r.first_visible_s = float(token_times[i])
        r.num_output += k
        r.num_computed += k
        r.last_token_s = last


def synthesize_step(sched: NativeScheduler) -> SchedulerOutput:
    """The SchedulerOutput of a pure-decode step over the current running requests."""
    sched.step += 1
    out = SchedulerOutput(step=sched.step)
    for r in sched.running:
        out.num_scheduled[r.rid] = 1
        out.sampling.add(r.rid)
        out.batch.decode_context.append(r.num_computed)
    return out
