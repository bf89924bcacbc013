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

#: steps computed ahead per attempt (grows for long quiet stretches)
INITIAL_HORIZON = 256
MAX_HORIZON = 1 << 16


@dataclass
class DecodeRun:
    """k pure-decode steps planned from the current state."""

    k: int
    step_times: np.ndarray  # d_1..d_k (async: of S_{j+1}..S_{j+k})
    crossings: list[tuple[int, int]]  # (step i, running index) of each new block, in order


def _crossing_steps(c: np.ndarray, held: np.ndarray, block_size: int, k: int) -> list[tuple[int, int]]:
    """(step, running index) of every new block the requests need in steps 1..k, in vLLM's order.

    At step i a request with c computed tokens before the run allocates slots
    for c + i tokens; it needs a new block when that passes its held blocks.
    """
    first = held * block_size - c + 1  # first step needing a new block (>= 1)
    events: list[tuple[int, int]] = []
    for idx in np.nonzero(first <= k)[0].tolist():
        events.extend((i, idx) for i in range(int(first[idx]), k + 1, block_size))
    events.sort()
    return events


def plan(
    sched: NativeScheduler,
    decode_times,
    schedule_times_from,
    next_arrival_s: float,
    horizon: int,
    in_flight_steps: int,
) -> DecodeRun | None:
    """Plan up to ``horizon`` pure-decode steps, or None if the next step is not one.

    ``schedule_times_from(step_times)`` gives, for each planned step, the time
    at which it would be scheduled (sync and async scheduling differ).
    ``in_flight_steps`` is 0 under sync scheduling and 1 under async.
    """
    cfg = sched.config
    running = sched.running
    n = len(running)
    if n == 0 or n > cfg.max_num_batched_tokens or cfg.speculative.enabled:
        return None
    lag = in_flight_steps
    remaining = []
    for r in running:
        if r.placeholders != lag or r.num_computed != r.num_tokens - 1 + lag or r.stale_tokens:
            return None
        remaining.append(r.max_tokens - r.num_output - lag)
    # the step delivering a request's last token goes through the ordinary path
    k_max = min(remaining) - (1 - lag)
    c = np.fromiter((r.num_computed for r in running), dtype=np.int64, count=n)
    k_max = min(k_max, int(cfg.max_model_len - 1 - c.max()), horizon)
    if k_max < 1:
        return None
    waiting = sched.waiting
    if waiting and not _head_blocked(sched, waiting[0]):
        return None
    held = np.fromiter((len(sched.kv.req_blocks[r.rid]) for r in running), dtype=np.int64, count=n)
    total = c.sum() + n * np.arange(1, k_max + 1, dtype=np.int64)
    times = decode_times(n, total.astype(np.float64))
    k = k_max
    if not waiting and next_arrival_s != float("inf"):
        sched_at = schedule_times_from(times)
        k = min(k, int(np.searchsorted(sched_at, next_arrival_s, side="left")))
    if k < 1:
        return None
    crossings = _crossing_steps(c, held, sched.block_size, k)
    free = sched.kv.num_free_blocks
    if len(crossings) > free:
        k = crossings[free][0] - 1  # that step would preempt
        crossings = crossings[:free]
        crossings = [e for e in crossings if e[0] <= k]
        if k < 1:
            return None
    return DecodeRun(k=k, step_times=times[:k], crossings=crossings)


def _head_blocked(sched: NativeScheduler, head: SimRequest) -> bool:
    """True if the head of the queue cannot be admitted until something finishes."""
    if len(sched.running) >= sched.config.max_num_seqs:
        return True
    if head.stale_tokens:
        return False
    kv = sched.kv
    hits = kv.computed_blocks(head.block_hash, head.num_tokens) if head.num_computed == 0 else []
    full = min(head.num_tokens, sched.max_model_len)
    return kv.blocks_needed(head.rid, full, hits) > kv.num_free_blocks


def take_blocks(sched: NativeScheduler, run: DecodeRun, sched_at: np.ndarray) -> np.ndarray:
    """Hand out the run's new blocks in order; return blocks used after each step.

    Blocks leave the free queue in the step-by-step order (step, then running
    order), so eviction from the prefix cache is the same; each request's
    block-seconds are integrated over its crossings as the KV manager would.
    """
    kv = sched.kv
    running = sched.running
    take = kv._take_free_block
    times = sched_at.tolist()
    new_per_step = np.zeros(run.k, dtype=np.int64)
    crossed: dict[int, list[float]] = {}
    for step, idx in run.crossings:
        rid = running[idx].rid
        kv.req_blocks[rid].append(take())
        crossed.setdefault(rid, []).append(times[step - 1])
        new_per_step[step - 1] += 1
    for rid, clocks in crossed.items():
        held = len(kv.req_blocks[rid]) - len(clocks)
        since = kv._held_since.get(rid)
        total = kv.block_seconds.get(rid, 0.0)
        for clock in clocks:
            if since is not None and held:
                total += held * (clock - since)
            since = clock
            held += 1
        kv.block_seconds[rid] = total
        kv._held_since[rid] = since
    kv.clock = times[-1]
    return np.cumsum(new_per_step)


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
