"""The fast path: many decode steps advanced at once, exactly.

Reasoning requests spend most of their life decoding. Between events that
change the batch in ways that depend on the queue (a request that must wait, a
KV block that cannot be had), every engine step schedules the running requests
one token each, so the steps can be computed in closed form: step times come
vectorised from ``PerformanceModel.decode_times``, new KV blocks are taken in
the order the step-by-step scheduler would take them, and the timeline gets one
row per step.

A run goes on through two events whose outcome is known in advance:
- a request's last token, when nobody waits: the request leaves the batch after
  its last step, its blocks freed between the steps scheduled before and after
  its last output (with requests waiting, the freed blocks might admit the
  head, so the run stops before);
- an arrival that the next step admits whole (no one else waits but arrivals of
  the same burst, admitted with it in order; the prompts fit the token budget,
  their blocks fit, none has a prefix-cache hit to look up): that step prefills
  them alongside the decodes (one ``step_time`` call) and the requests decode
  with the others from the next step on.
The results equal the step-by-step path's (tests/simulator/engine/test_fast_forward.py
checks it); the event that ends a run is left to the ordinary path.

``Runs`` is the fast path behind the scheduler interface (``advance``): it plans a
run from the scheduler's state, applies it at once and hands the engine what to
log. The clock stays SimPy's: the arrivals a run admits are not made ahead of
time; the run hands out their KV blocks by request id and keeps the rest of what
it did to them (``Joining``) until they come, through the scheduler's
``add_request``, when the engine's clock reaches the end of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from simulator.engine.interface import Advance, InFlight
from simulator.engine.native import NativeScheduler
from simulator.engine.request import SimRequest, Status
from simulator.engine.rules import decodes_one_token, deliver_tokens, fits_whole, has_seat
from simulator.records.performance import StepBatch

#: steps computed ahead per attempt (the engine plans up to twice the last run)
INITIAL_HORIZON = 256
MAX_HORIZON = 1 << 16


@dataclass
class Arrivals:
    """The workload's arrivals as the fast path reads them (whole columns, by request id)."""

    time_s: np.ndarray
    queued: np.ndarray  # joins the queue (False: rejected at arrival)
    prompt: np.ndarray
    max_tokens: np.ndarray
    #: no block of the prompt can be a prefix-cache hit for a new request (no shared prefix)
    private: np.ndarray
    #: arrivals from this time on are not known yet (a cluster's router has not routed them):
    #: every output of a run arrives before it
    known_until_s: float = math.inf


@dataclass
class Admission:
    """An arrival the run admits: its prefill is step ``step`` of the run."""

    step: int
    rid: int
    prompt: int


@dataclass
class Preemption:
    """A running request the run preempts: in ``step``, member ``short`` found no free KV block
    and ``victim`` (the last running member) was preempted to make room; the victim's last
    step is ``step - 1``."""

    step: int
    short: int
    victim: int


@dataclass
class DecodeRun:
    """k steps planned from the current state: pure decodes, and prefills of admitted arrivals.

    The run's members are the running requests (in running order), then the admitted
    ones (in admission order). Member i decodes one token in steps first..last of the
    run, with ``computed[i]`` computed tokens before its first one (an admitted request
    is prefilled in the step before its first).
    """

    k: int
    step_times: np.ndarray  # d_1..d_k (async: of S_{j+1}..S_{j+k})
    first_steps: np.ndarray
    computed: np.ndarray
    # each member's last step (it is in steps first..last): a member with last + in-flight
    # steps <= k finishes inside the run
    last_steps: np.ndarray
    # each new KV block of the run, in the order the blocks are taken: its step (1..k)
    # and the member it goes to (an admitted request's prompt blocks included)
    block_steps: np.ndarray
    block_owners: np.ndarray
    admissions: list[Admission] = field(default_factory=list)
    preemptions: list[Preemption] = field(default_factory=list)
    #: planned while requests wait (``_preempting_run``): finishes and preemptions, no admission
    waiting: bool = False
    #: (async) the queue's head is admitted in the run's last step, left in flight: the
    #: scheduler's admission fills that step (``NativeScheduler.decode_step``)
    admits: bool = False

    def truncated(self) -> DecodeRun:
        """The run without its last step."""
        k = self.k - 1
        keep = self.block_steps <= k
        return DecodeRun(k=k, step_times=self.step_times[:k], first_steps=self.first_steps, computed=self.computed,
                         last_steps=self.last_steps, block_steps=self.block_steps[keep],
                         block_owners=self.block_owners[keep], admissions=self.admissions,
                         preemptions=[p for p in self.preemptions if p.step <= k], waiting=self.waiting)


def _crossing_steps(c: np.ndarray, held: np.ndarray, block_size: int, k, first_steps: np.ndarray,
                    extra: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, member indices) of every new block the members need in steps 1..k, in vLLM's order.

    A member decoding from step f with c computed tokens before it allocates, at
    step i >= f, slots for c + (i - f) + 1 tokens; it needs a new block when that
    passes its held blocks. Within a step, blocks go to the members in order.
    ``k`` may be an array: each member's own last step.
    ``extra`` (steps, members) are more blocks to order along (prompt blocks).
    """
    first = held * block_size - c + first_steps  # first step needing one
    needing = np.flatnonzero(first <= k)
    last = k[needing] if isinstance(k, np.ndarray) else k
    counts = (last - first[needing]) // block_size + 1
    owners = np.repeat(needing, counts)
    rank = np.arange(len(owners)) - np.repeat(np.cumsum(counts) - counts, counts)
    steps = first[owners] + block_size * rank
    if extra is not None:
        steps, owners = np.concatenate((steps, extra[0])), np.concatenate((owners, extra[1]))
    order = np.lexsort((owners, steps))
    return steps[order], owners[order]


class _Members:
    """The run's members while it is planned: first decode step, computed tokens before it,
    last step (running requests first). Kept as lists, with numpy copies made when needed."""

    def __init__(self, computed: np.ndarray, last_steps: list[int], held: list[int]):
        self.first = [1] * len(last_steps)
        self.computed = computed.tolist()
        self.last = list(last_steps)
        self.held = held  # KV blocks each holds before its first decode step
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def add(self, first: int, computed: int, last: int, held: int) -> None:
        self.first.append(first)
        self.computed.append(computed)
        self.last.append(last)
        self.held.append(held)
        self._arrays = None

    def new_blocks_through(self, step: int, block_size: int) -> int:
        """KV blocks the members' decodes take in steps 1..``step`` (not the prompts')."""
        total = 0
        for f, c, end, held in zip(self.first, self.computed, self.last, self.held, strict=True):
            if f <= step and f <= end:
                need = -(-(c + min(step, end) - f + 1) // block_size) - held
                if need > 0:
                    total += need
        return total

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first steps, computed tokens, last steps) as numpy arrays."""
        if self._arrays is None:
            self._arrays = tuple(np.array(x, dtype=np.int64) for x in (self.first, self.computed, self.last))
        return self._arrays

    def decoding(self, step: int) -> int:
        """How many members decode in ``step``."""
        return sum(1 for f, end in zip(self.first, self.last, strict=True) if f <= step <= end)

    def running_after(self, step: int) -> int:
        """How many members have steps after ``step`` (those with none left have finished)."""
        return sum(1 for end in self.last if end > step)

    def step_times(self, decode_times, first: int, last: int) -> np.ndarray:
        """Times of the pure-decode steps first..last: step t has the members decoding in it,
        each attending over its computed tokens before t plus the one it computes."""
        if len(self.last) <= 16:  # few members (light load): plain Python is quicker than numpy
            return self._few_step_times(decode_times, first, last)
        f, c, end = self.arrays()
        # the total context of count members in steps a..b-1: base + count * t (exact integers)
        if f.max() <= first and end.min() >= last:  # the same members throughout
            n, base = len(end), int((c - f + 1).sum())
            return decode_times(n, np.arange(base + n * first, base + n * (last + 1), n, dtype=np.float64))
        # segments of steps with the same members: a member decodes in [max(f, first), min(end, last)]
        active = (f <= last) & (end >= first)
        lo = np.maximum(f[active], first)
        hi = np.minimum(end[active], last) + 1
        weight = (c - f + 1)[active]
        points = np.unique(np.concatenate(([first, last + 1], lo, hi)))  # segment starts, then last + 1
        size = len(points)
        at_lo, at_hi = np.searchsorted(points, lo), np.searchsorted(points, hi)
        counts = np.cumsum(np.bincount(at_lo, minlength=size) - np.bincount(at_hi, minlength=size)).tolist()
        bases = np.cumsum(np.bincount(at_lo, weight, size) - np.bincount(at_hi, weight, size)).tolist()
        bounds = points.tolist()
        parts = []
        for j in range(size - 1):
            count, base = counts[j], int(bases[j])
            if count < 1:
                raise RuntimeError("a planned decode run has a step without requests")
            a, b = bounds[j], bounds[j + 1]
            parts.append(decode_times(count, np.arange(base + count * a, base + count * b, count, dtype=np.float64)))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _few_step_times(self, decode_times, first: int, last: int) -> np.ndarray:
        """``step_times`` for a few members, segment by segment in Python."""
        spans = []  # (first step, step after the last, computed + 1 - first decode step) in the window
        points = {first, last + 1}
        for f, c, end in zip(self.first, self.computed, self.last, strict=True):
            lo, hi = max(f, first), min(end, last) + 1
            if lo < hi:
                spans.append((lo, hi, c - f + 1))
                points.update((lo, hi))
        bounds = sorted(points)
        parts = []
        for a, b in pairwise(bounds):
            count = base = 0
            for lo, hi, weight in spans:
                if lo <= a < hi:
                    count += 1
                    base += weight
            if count < 1:
                raise RuntimeError("a planned decode run has a step without requests")
            parts.append(decode_times(count, np.arange(base + count * a, base + count * b, count, dtype=np.float64)))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def prefill_step_time(self, step_time, step: int, prompts: list[int]) -> float:
        """Time of ``step``: the members decoding in it, and whole prompts prefilled (in order)."""
        context = [c + (step - f) + 1 for f, c, end in zip(self.first, self.computed, self.last, strict=True)
                   if f <= step <= end]
        context += [1] * prompts.count(1)  # one token to compute: vLLM's batch counts it as a decode
        long = [p for p in prompts if p > 1]
        return step_time(StepBatch(prefill_tokens=long, prefill_context=[0] * len(long), decode_context=context,
                                   decode_spec_tokens=[0] * len(context)))


def plan(
    sched: NativeScheduler,
    decode_times,
    step_time,
    now: float,
    base: float,
    arrivals: Arrivals | None,
    next_arrival: int,
    horizon: int,
    in_flight_steps: int,
) -> DecodeRun | None:
    """Plan a run of steps from the current state, or None if the next step is not one.

    Step times are computed for ``horizon`` steps first, and for as many more as
    reach the next arrival; an arrival that the step after it admits whole joins
    the run (see the module docstring), else the run ends with the last step
    scheduled before it. ``arrivals`` (None: no more) are read from index
    ``next_arrival`` on. Step 1 is scheduled ``now``; a later step t when the
    step before the steps in flight ends: at ``base`` plus the times of steps
    1..t-1-``in_flight_steps`` (sync scheduling: ``base`` is ``now``; async: the
    end of the step in flight). ``in_flight_steps`` is 0 under sync scheduling
    and 1 under async.
    """
    cfg = sched.config
    running = sched.running
    n = len(running)
    if n == 0 or n > cfg.max_num_batched_tokens or cfg.speculative.enabled:
        return None
    waiting = sched.waiting
    if waiting and not sched.head_blocked():
        return None
    lag = in_flight_steps
    remaining = []
    for r in running:
        if not decodes_one_token(r, lag):
            return None
        remaining.append(r.max_tokens - r.num_output - lag)
    # A request with m tokens to come after the step in flight is in the run's steps 1..m and
    # finishes when the output of step m arrives. With requests waiting, the run stops before
    # the first finish (the blocks it frees may admit the head); else finishes happen inside
    # the run, and only the last request's goes through the ordinary path.
    c = np.fromiter((r.num_computed for r in running), dtype=np.int64, count=n)
    cap = min(int(cfg.max_model_len - 1 - c.max()), MAX_HORIZON)
    held = sched.kv.num_blocks_held(running)
    members = _Members(c, remaining, held)
    admissions: list[Admission] = []
    # with requests waiting, members finish inside the run only if the queue's head admission
    # does not depend on other requests' blocks (no shared prefix to hit)
    finish_inside = not waiting or not (sched.kv.enable_caching and waiting[0].num_shared_blocks)
    k_max = min((max(remaining) if finish_inside else min(remaining)) - (1 - lag), cap)
    if k_max < 1:
        return None
    times = members.step_times(decode_times, 1, min(k_max, horizon))
    if not waiting and arrivals is not None:
        times, k_max = _admit_arrivals(sched, members, admissions, arrivals, next_arrival, times, k_max,
                                       decode_times, step_time, now, base, horizon, lag)
    k = len(times)
    if arrivals is not None and arrivals.known_until_s < math.inf:
        k = min(k, _rows_before(times, base, lag, arrivals.known_until_s))
    if k < 1:
        return None
    return _fit_kv(sched, members, admissions, times, k, decode_times, lag)


def _rows_before(times: np.ndarray, base: float, lag: int, until: float) -> int:
    """The most steps of a run whose outputs all arrive before ``until``: row i of a run
    arrives at e[i + 1 - lag], e = base + the step times summed in order (as ``Runs.advance``)."""
    ends = np.cumsum(np.concatenate(([base], times)))
    return int(np.searchsorted(ends, until, side="left")) - 1 + lag


class _StepClock:
    """A run's step times while it is planned, and when each step is scheduled.

    Step 1 is scheduled ``now``, step t >= 2 at ``ends[t - 1 - lag]``, where ``ends[m]`` is
    ``base`` plus the first m step times, summed in order as the engine sums them. Steps
    before the latest admission no longer change: they are kept as finished chunks, so an
    admission costs work for the steps after it only.
    """

    def __init__(self, times: np.ndarray, base: float, lag: int):
        self.lag = lag
        self.chunks: list[np.ndarray] = []  # steps 1..offset
        self.offset = 0
        self.tail = times  # steps offset+1 .. offset+len(tail)
        self.tail_ends = np.cumsum(np.concatenate(([base], times)))  # ends[offset + i]

    def __len__(self) -> int:
        return self.offset + len(self.tail)

    def step_after(self, t: float) -> int:
        """The first step scheduled at or after time ``t`` (> now); may be beyond the steps known."""
        return self.offset + int(np.searchsorted(self.tail_ends, t, side="left")) + 1 + self.lag

    def time_of(self, step: int) -> float:
        return float(self.tail[step - 1 - self.offset])

    def scheduled_at(self, step: int) -> float:
        return float(self.tail_ends[step - 1 - self.lag - self.offset])

    def extend(self, times: np.ndarray) -> None:
        """Times of the steps after the known ones."""
        self.tail = np.concatenate((self.tail, times))
        self.tail_ends = np.concatenate((self.tail_ends, np.cumsum(np.concatenate(([self.tail_ends[-1]], times)))[1:]))

    def replace_from(self, step: int, times: np.ndarray) -> None:
        """New times for ``step`` on; steps before ``step - 1`` become final."""
        keep = step - 2 - self.offset  # tail entries of steps before step - 1
        self.chunks.append(self.tail[:keep])
        start = self.tail_ends[keep]
        self.tail = np.concatenate((self.tail[keep : keep + 1], times))
        self.tail_ends = np.cumsum(np.concatenate(([start], self.tail)))
        self.offset = step - 2

    def times(self, k: int | None = None) -> np.ndarray:
        """The times of steps 1..k (all known ones by default)."""
        tail = self.tail if k is None else self.tail[: k - self.offset]
        return np.concatenate((*self.chunks, tail)) if self.chunks else tail


def _admit_arrivals(sched, members: _Members, admissions: list[Admission], arrivals: Arrivals, index: int,
                    times: np.ndarray, k_max: int, decode_times, step_time, now: float, base: float,
                    horizon: int, lag: int) -> tuple[np.ndarray, int]:
    """Go through the arrivals the run reaches: each one the step after it admits whole joins
    the run (``members``, ``admissions``); the first other one ends it. Returns the step
    times and the last step the members need (see ``_StepClock`` for ``now`` and ``base``).
    """
    cfg = sched.config
    caching = sched.kv.enable_caching
    budget, threshold = cfg.max_num_batched_tokens, cfg.long_prefill_token_threshold
    queued, arrival_s = arrivals.queued, arrivals.time_s
    total = len(arrival_s)
    clock = _StepClock(times, base, lag)
    bs, free = sched.block_size, sched.kv.num_free_blocks
    prompt_blocks = 0  # blocks of the prompts admitted so far
    while True:
        while index < total and not queued[index]:
            index += 1  # rejected at arrival: it never waits
        if index >= total:
            return clock.times(), k_max
        t = float(arrival_s[index])
        if t <= now:
            return times[:0], k_max  # it is in the queue before step 1
        step = clock.step_after(t)
        known = len(clock)
        if step > known:
            if known >= k_max:
                return clock.times(), k_max
            more = int((t - clock.tail_ends[-1]) / clock.tail[-1] * 1.1) + 16
            clock.extend(members.step_times(decode_times, known + 1, min(known + more, k_max)))
            continue
        prompt = int(arrivals.prompt[index])
        # the arrivals already admitted in this step (bursts: arrivals within one step's time)
        same_step = []
        for a in reversed(admissions):
            if a.step != step:
                break
            same_step.insert(0, a.prompt)
        blocks = -(-prompt // bs)
        admitted = (
            step >= 2
            and (arrivals.private[index] or not caching)
            and prompt + sum(same_step) + members.decoding(step) <= budget  # whole, in this step's budget
            and not (threshold and prompt > threshold)
            # the admission gate, on the free blocks left after every block taken so far (none
            # freed counted: see _fit_kv)
            and has_seat(members.running_after(step - 1 - lag), cfg.max_num_seqs)
            and fits_whole(blocks, free - prompt_blocks - members.new_blocks_through(step, bs))
        )
        if not admitted:
            return clock.times(step - 1), k_max
        prompt_blocks += blocks
        last = step + int(arrivals.max_tokens[index]) - 1
        prefill = members.prefill_step_time(step_time, step, [*same_step, prompt])
        members.add(step + 1, prompt, last, blocks)
        admissions.append(Admission(step, index, prompt))
        k_max = min(max(k_max, last - (1 - lag)), MAX_HORIZON)
        index += 1
        # the steps from this one on change: recompute them up to about the next arrival
        upto = min(k_max, step + horizon)
        if index < total:
            pace = clock.time_of(step - 1)
            reach = (float(arrival_s[index]) - clock.scheduled_at(step)) / pace * 1.1
            upto = min(k_max, step + max(16, int(reach) + 16))
        tail = members.step_times(decode_times, step + 1, upto) if upto > step else times[:0]
        clock.replace_from(step, np.concatenate(([prefill], tail)))


def _fit_kv(sched, members: _Members, admissions: list[Admission], times: np.ndarray, k: int,
            decode_times, lag: int) -> DecodeRun | None:
    """The run cut before its first step short of a free KV block (blocks freed inside the run
    are not counted: the run may end earlier than it could, never later) and before any
    admission whose prefill would be its last step. With requests waiting, a step short of a
    block preempts instead, as the scheduler does (``_preempting_run``)."""
    if sched.waiting and not admissions:
        return _preempting_run(sched, members, times, k, decode_times, lag)
    running = sched.running
    n = len(running)
    bs = sched.block_size
    held = np.array(members.held, dtype=np.int64)
    prompt_blocks = held[n:]
    first, computed, last = members.arrays()
    prompts = None
    if admissions:  # an admitted request's prompt blocks, taken in its prefill step
        prompts = (np.repeat([a.step for a in admissions], prompt_blocks),
                   np.repeat(np.arange(n, n + len(admissions)), prompt_blocks))
    steps, owners = _crossing_steps(computed, held, bs, np.minimum(last, k), first, prompts)
    free = sched.kv.num_free_blocks
    if len(steps) > free:
        # that step would preempt, or not admit
        k = int(steps[free]) - 1
        if k < 1:
            return None
    while admissions and admissions[-1].step >= k:
        k = min(k, admissions.pop().step - 1)
    m = n + len(admissions)
    keep = (steps <= k) & (owners < m)
    if not keep.all():
        steps, owners = steps[keep], owners[keep]
    return DecodeRun(k=k, step_times=times[:k], first_steps=first[:m], computed=computed[:m],
                     last_steps=last[:m], block_steps=steps, block_owners=owners, admissions=admissions)


def _preempting_run(sched, members: _Members, times: np.ndarray, k: int, decode_times, lag: int
                    ) -> DecodeRun | None:
    """A run of decode steps while requests wait (none is admitted). It goes on through steps
    short of a KV block: there, as ``NativeScheduler._make_room``, the last running member is
    preempted and its blocks serve the step's remaining blocks; and through members' last
    tokens, their blocks freed when their last output comes. It stops before a step in which
    the queue's head (the latest victim, or the head it started with) would be admitted, and
    before a step whose victim would be a member that cannot be handled here (one with a shared
    prefix, whose admission would depend on other requests' blocks; one whose last token is in
    flight; the last one decoding). Blocks, finishes and preemptions are taken in time order,
    each admission checked after the event that could allow it (``_WaitingRun``)."""
    plan = _WaitingRun(sched, members, k, lag)
    k = plan.walk()
    if k < 1:
        return None
    keep = plan.alive & (plan.steps <= k)
    last = plan.last
    changed = min([p.step for p in plan.preemptions], default=k + 1)
    if changed <= k:
        fixed = _Members(plan.computed, last.tolist(), list(members.held))
        times = np.concatenate((times[: changed - 1], fixed.step_times(decode_times, changed, k)))
    return DecodeRun(k=k, step_times=times[:k], first_steps=plan.first, computed=plan.computed, last_steps=last,
                     block_steps=plan.steps[keep], block_owners=plan.owners[keep], preemptions=plan.preemptions,
                     waiting=True, admits=plan.admits)


class _WaitingRun:
    """The events of a run planned while requests wait, walked in time order (see
    ``_preempting_run``): ``walk`` returns the run's length and leaves its blocks (``steps``,
    ``owners`` where ``alive``), members' last steps and preemptions."""

    def __init__(self, sched, members: _Members, k: int, lag: int):
        self.sched, self.lag = sched, lag
        self.kv = sched.kv
        n = self.n = len(sched.running)
        self.held = np.array(members.held, dtype=np.int64)
        self.first, self.computed, last = members.arrays()
        self.last = last.copy()
        self.k = min(k, int(self.last.max()) - (1 - lag))
        self.steps, self.owners = _crossing_steps(self.computed, self.held, sched.block_size,
                                                  np.minimum(self.last, max(self.k, 0)), self.first)
        self.alive = np.ones(len(self.steps), dtype=bool)
        #: blocks each member frees when it finishes (those it holds and those the run gives it)
        self.blocks = self.held + np.bincount(self.owners, minlength=n)
        self.gone = np.zeros(n, dtype=bool)  # preempted
        self.free = self.kv.num_free_blocks  # before the run, plus the victims' blocks so far
        self.free0 = self.free
        self.preemptions: list[Preemption] = []
        self.head_need = sched._blocks_to_admit(sched.waiting[0])
        self.admits = False  # the run's last step admits the queue's head (left in flight)

    def walk(self) -> int:
        lag, steps, owners = self.lag, self.steps, self.owners
        caching = self.kv.enable_caching
        running = self.sched.running
        checked = 0  # admissions are checked for the steps up to this one
        pos, before_pos = 0, 0  # the first block not known to be served; live blocks before it
        while self.k >= 1:
            k = self.k
            release = self.last + lag + 1  # the first step scheduled after a member's last output
            freed = self._finish_frees(release, k)
            live = self.alive[pos:] & (steps[pos:] <= k)
            rank = before_pos + np.cumsum(live) - 1  # each live block's place among live blocks
            short = np.flatnonzero(live & (rank >= self.free + freed[np.minimum(steps[pos:], k + 1)]))
            s = int(steps[pos + short[0]]) if len(short) else k + 1
            t = self._first_admission(checked + 1, s - 1, release, freed)
            if t is not None:
                # under async scheduling the run may cover step t, left in flight: the scheduler's
                # own admission then fills it, unless a member's last output comes after t is
                # scheduled (it still holds its seat and blocks then; the run would have freed them)
                self.admits = lag == 1 and t >= 2 and not np.any(~self.gone & (self.last == t - 1))
                self.k = t if self.admits else t - 1
                break
            if not len(short):
                break
            e = pos + int(short[0])
            listed = np.flatnonzero(~self.gone & (release > s))  # the running list at s
            v = int(listed[-1])
            others = self.last[~self.gone]
            others = others[np.flatnonzero(~self.gone) != v]
            if (self.last[v] < s or not len(others) or int(others.max()) < s + 1 - lag
                    or (caching and running[v].num_shared_blocks)):
                self.k = s - 1  # the ordinary path takes that step
                break
            mine = owners == v
            self.free += int(self.held[v]) + int(np.count_nonzero(mine[:e] & self.alive[:e]))
            self.alive &= ~(mine & (steps >= s))
            self.last[v] = s - 1
            self.gone[v] = True
            self.preemptions.append(Preemption(s, int(owners[e]), v))
            self.k = min(k, int(self.last.max()) - (1 - lag))
            before_pos += int(np.count_nonzero(self.alive[pos:e]))
            pos = e
            checked = s  # (a step that preempts admits nobody)
        return self.k

    def _finish_frees(self, release: np.ndarray, k: int) -> np.ndarray:
        """By step t (0..k+1): the blocks of the members whose last output came before t."""
        ending = np.flatnonzero(~self.gone & (release <= k))
        freed = np.zeros(k + 2, dtype=np.int64)
        np.add.at(freed, release[ending], self.blocks[ending])
        return np.cumsum(freed)

    def _first_admission(self, lo: int, hi: int, release: np.ndarray, freed: np.ndarray) -> int | None:
        """The first step in lo..hi after an event (a preemption, a member's last output) in
        which the queue's head would be admitted: a seat, and the blocks of its whole sequence
        free once the step's running requests have theirs. Between events the free blocks only
        shrink, so the steps right after events are the only ones to check."""
        if lo > hi:
            return None
        checks = {p.step + 1 for p in self.preemptions}
        checks.update(release[~self.gone].tolist())
        sched = self.sched
        if self.preemptions:  # the head is the latest victim: its tokens once its last output is in
            p = self.preemptions[-1]
            v = p.victim
            tokens = int(self.computed[v] + (p.step - 1) - self.first[v] + 2)
            need = -(-min(tokens, sched.max_model_len) // sched.block_size)
        else:
            need = self.head_need
        for t in sorted(c for c in checks if lo <= c <= hi):
            listed = int(np.count_nonzero(~self.gone & (release > t)))
            if listed >= sched.config.max_num_seqs:
                continue
            served = int(np.count_nonzero(self.alive[: int(np.searchsorted(self.steps, t, side="right"))]))
            if need <= self.free + int(freed[min(t, len(freed) - 1)]) - served:
                return t
        return None


@dataclass
class Joining:
    """What a run did to an arrival it admits, for when the arrival comes (``join``)."""

    admission: Admission
    scheduled_s: float  # when its prefill step is scheduled
    last: int  # its last step
    k: int  # the run's steps
    lag: int
    token_times: np.ndarray  # the run's
    finish_s: float = -1.0  # when it finished inside the run (-1: it runs on)


@dataclass
class AppliedRun:
    """What a run did, row by row (a row is a step whose output arrives in the run)."""

    kv_blocks_used: np.ndarray  # after each row's output
    #: from row 0 on, each row where one of these changes: (row, requests in its step,
    #: requests running after its output, prompt tokens prefilled in its step, requests prefilling)
    segments: list[tuple[int, int, int, int, int]]
    finished: list[int]  # the ids of the requests that finished inside the run
    joining: dict[int, Joining]  # by request id, the arrivals it admits


def apply_run(sched: NativeScheduler, run: DecodeRun, sched_at: np.ndarray, token_times: np.ndarray,
              in_flight_steps: int) -> AppliedRun:
    """Carry out a planned run: admissions, new KV blocks, tokens, and the requests finishing inside it.

    Row i's output arrives at ``token_times[i]``; step t of the run is scheduled at
    ``sched_at[t - 1]``. Blocks leave the free queue in the step-by-step order (step, then
    running order); a request finishing inside the run frees its blocks after the blocks of
    the steps scheduled before its last output and before the later ones', as the engine's
    loop does. The arrivals the run admits have not come yet: their blocks are handed out
    now, by request id, and the rest waits in ``AppliedRun.joining`` for their arrival.
    """
    kv = sched.kv
    running = sched.running
    n, k, lag = len(running), run.k, in_flight_steps
    admissions = run.admissions
    admitted = [a.rid for a in admissions]
    first, computed, last = run.first_steps, run.computed, run.last_steps
    steps, owners = run.block_steps, run.block_owners
    used_before = kv.num_used_blocks
    taken_at = np.bincount(steps - 1, minlength=k)  # blocks taken by each row's time, less those freed
    joining = {}
    for j, a in enumerate(admissions):
        kv.open_table(a.rid)
        kv.record_prefix_lookup(a.prompt, 0)
        joining[a.rid] = Joining(a, float(sched_at[a.step - 1]), int(last[n + j]), k, lag, token_times)
    finishing = np.flatnonzero(last + lag <= k)
    finished: list[int] = []
    if run.waiting:
        finished = _apply_waiting_run(sched, run, sched_at, token_times, lag, taken_at)
    elif not len(finishing) and not admissions:
        _hand_out(kv, running, admitted, steps, owners, sched_at)
        deliver(running, k, token_times)
        kv.cache_many(running, (computed + k - lag).tolist())
    else:
        taken = 0
        finishing = finishing[np.argsort(last[finishing], kind="stable")]  # by last step, then order
        for i in finishing.tolist():
            row = int(last[i]) + lag - 1  # the row bringing its last token
            cut = int(np.searchsorted(steps, row + 1, side="right"))  # steps scheduled before it
            if cut > taken:
                _hand_out(kv, running, admitted, steps[taken:cut], owners[taken:cut], sched_at)
                taken = cut
            now = kv.clock = float(token_times[row])
            before = kv.num_used_blocks
            tokens = int(computed[i] + last[i] - first[i] + 1)
            if i < n:
                req = running[i]
                kv.cache_full_blocks(req, tokens)
                sched.finish(req, now)
                req.placeholders = req.in_flight_tokens = 0  # as its last output leaves them
                finished.append(req.rid)
            else:
                rid = admitted[i - n]
                kv.cache_private_blocks(rid, tokens)
                kv.free(rid, finished=True)
                joining[rid].finish_s = now
                finished.append(rid)
            taken_at[row] -= before - kv.num_used_blocks
        _hand_out(kv, running, admitted, steps[taken:], owners[taken:], sched_at)
        counts = np.minimum(last[:n] + lag, k)
        deliver(running, k, token_times, counts.tolist(), np.minimum(last[:n], k).tolist())
        done = set(finishing.tolist())
        going_on = [i for i in range(n) if i not in done]
        sched.replace_running([running[i] for i in going_on])
        kv.cache_many(sched.running, (computed[going_on] + (k + 1 - lag) - first[going_on]).tolist())
        for i, rid in enumerate(admitted, n):
            if i not in done:
                kv.cache_private_blocks(rid, int(computed[i] + (k + 1 - lag) - first[i]))
    kv.clock = float(sched_at[-1])
    used = np.cumsum(taken_at)
    used += used_before
    return AppliedRun(used, _row_segments(run, n, lag), finished, joining)


def _apply_waiting_run(sched: NativeScheduler, run: DecodeRun, sched_at: np.ndarray, token_times: np.ndarray,
                       lag: int, taken_at: np.ndarray) -> list[int]:
    """Carry out a run planned while requests wait (``_preempting_run``) and return the ids of
    the requests that finished in it. Its events, in time order: a preemption when its step is
    scheduled (the victim's full blocks registered as its last scheduling left them, then
    ``NativeScheduler._preempt``), a finish when its last output comes (``NativeScheduler.finish``);
    the blocks taken before each event are handed out first. Victims get their tokens through
    their last step; the others that do not finish go on running."""
    kv = sched.kv
    running = sched.running
    n, k = len(running), run.k
    first, computed, last = run.first_steps, run.computed, run.last_steps
    steps, owners = run.block_steps, run.block_owners
    order = steps * (n + 1) + owners  # the blocks' order: by step, then member
    victims = {p.victim for p in run.preemptions}
    # (time key, blocks handed out before it, member, preemption?): a preemption in step s comes
    # at 2s, a last output between the scheduling of steps last + lag and last + lag + 1
    events = [(2 * p.step, int(np.searchsorted(order, p.step * (n + 1) + p.short, side="left")), p.victim, True)
              for p in run.preemptions]
    for i in np.flatnonzero(last + lag <= k).tolist():
        if i not in victims:
            end = int(last[i]) + lag
            events.append((2 * end + 1, int(np.searchsorted(steps, end, side="right")), i, False))
    events.sort()
    finished = []
    taken = 0
    # blocks leave the free queue in order, each event's after those before it; a member gets
    # its blocks when it is freed, the others all at once at the end
    block_of = np.empty(len(steps), dtype=np.int64)
    acquired = sched_at[steps - 1]
    for _, cut, i, preempting in events:
        if cut > taken:
            block_of[taken:cut] = kv.take_free_blocks(cut - taken)
            taken = cut
        mine = np.flatnonzero(owners[:taken] == i)
        if len(mine):
            kv.add_taken_blocks(running[i].rid, block_of[mine].tolist(), float(acquired[mine].sum()))
        req = running[i]
        before = kv.num_used_blocks
        if preempting:
            step = int(last[i]) + 1
            kv.clock = float(sched_at[step - 1])
            # the full blocks as its last scheduling (sync) or last output before now (async) left them
            kv.cache_full_blocks(req, int(computed[i] + last[i] - first[i] + 1) - lag)
            sched._preempt(req)
            taken_at[step - 1] -= before - kv.num_used_blocks
        else:
            row = int(last[i]) + lag - 1  # the row bringing its last token
            now = kv.clock = float(token_times[row])
            kv.cache_full_blocks(req, int(computed[i] + last[i] - first[i] + 1))
            sched.finish(req, now)
            req.placeholders = req.in_flight_tokens = 0  # as its last output leaves them
            finished.append(req.rid)
            taken_at[row] -= before - kv.num_used_blocks
    if taken < len(steps):
        block_of[taken:] = kv.take_free_blocks(len(steps) - taken)
    done = {r for _, _, r, _ in events}
    rest = np.flatnonzero(~np.isin(owners, list(done))) if done else np.arange(len(owners))
    _give(kv, running, owners[rest], block_of[rest], acquired[rest])
    deliver(running, k, token_times, np.minimum(last + lag, k).tolist(), np.minimum(last, k).tolist())
    for v in victims:  # their last output (already stale when it came) is in
        req = running[v]
        req.num_computed = req.in_flight_tokens = req.stale_tokens = 0
    going_on = [i for i in range(n) if i not in done]
    sched.replace_running([running[i] for i in going_on])
    kv.cache_many(sched.running, (computed[going_on] + (k + 1 - lag) - first[going_on]).tolist())
    return finished


def join(sched: NativeScheduler, req: SimRequest, joining: Joining) -> None:
    """An arrival that a run admitted comes: it gets what the run did to it."""
    sched.admit_whole(req, joining.scheduled_s)
    _deliver_admitted(req, joining.admission, joining.last, joining.k, joining.lag, joining.token_times)
    if joining.finish_s >= 0:
        req.status = Status.FINISHED
        req.finish_s = joining.finish_s
        req.placeholders = req.in_flight_tokens = 0  # as its last output leaves them
    else:
        sched.join_running(req)


def _row_segments(run: DecodeRun, n: int, lag: int) -> list[tuple[int, int, int, int, int]]:
    """Where the run's rows change, as (row, batch, running after it, prompt tokens prefilled,
    requests prefilling), from row 0 on. Row r applies the output of step r + 1 - lag; the
    ``n`` running requests are in the step in flight too. A member leaves the batch after its
    last step and the running requests with its last output; an admitted request is running
    from the output before its prefill is scheduled, and in the batch from its prefill on (a
    one-token prompt is a decode there, as vLLM's batch counts it)."""
    k = run.k
    last = run.last_steps
    changes: dict[int, list[int]] = {}  # row -> [batch change, running change]
    prefills: dict[int, list[int]] = {}  # row -> [prompt tokens, requests]: the row's prefills

    def change(row: int, batch: int = 0, running: int = 0) -> None:
        if row < k:
            entry = changes.setdefault(row, [0, 0])
            entry[0] += batch
            entry[1] += running

    victims = {p.victim for p in run.preemptions}
    for i in np.flatnonzero(last + lag - 1 < k).tolist():
        end = int(last[i])
        if i in victims:  # preempted when step end + 1 is scheduled: out of that step
            change(end, running=-1)
            change(end + lag, batch=-1)
        else:
            change(end - 1 + lag, running=-1)
            change(end + lag, batch=-1)
    for a in run.admissions:
        change(a.step - 1, running=1)
        change(a.step - 1 + lag, batch=1)
        change(a.step + lag)  # its prefill is over
        if a.prompt > 1:
            entry = prefills.setdefault(a.step - 1 + lag, [0, 0])
            entry[0] += a.prompt
            entry[1] += 1
    segments = []
    batch, running = n, n
    if 0 not in changes:
        segments.append((0, batch, running, 0, 0))
    for row in sorted(changes):
        d_batch, d_running = changes[row]
        batch += d_batch
        running += d_running
        segments.append((row, batch, running, *prefills.get(row, (0, 0))))
    return segments


def _deliver_admitted(req: SimRequest, admission: Admission, last: int, k: int, lag: int,
                      token_times: np.ndarray) -> None:
    """An admitted request's tokens: its first from its prefill step, then one a step."""
    step = admission.step
    row = step - 1 + lag  # the row bringing its first token
    d = min(last, k - lag) - step + 1  # its tokens whose output arrives in the run
    deliver_tokens(req, d, token_times, start=row)
    req.num_computed = admission.prompt + min(last, k) - step
    req.placeholders = req.in_flight_tokens = lag  # the step in flight (if still running)


def _hand_out(kv, running: list[SimRequest], admitted: list[int], steps: np.ndarray, owners: np.ndarray,
              sched_at: np.ndarray) -> None:
    """Take ``len(steps)`` blocks from the free queue and give each to its owner (a member's
    index: the running requests, then the ids of the ``admitted`` arrivals); each counts
    toward block-seconds from the time its step is scheduled."""
    if not len(steps):
        return
    blocks = kv.take_free_blocks(len(steps))
    n = len(running)
    counts = np.bincount(owners, minlength=n + len(admitted))
    present = np.flatnonzero(counts)  # the members that get blocks
    acquired_s = np.bincount(owners, weights=sched_at[steps - 1], minlength=n)[present].tolist()
    by_request = blocks[np.argsort(owners, kind="stable")].tolist()  # each in step order
    start = 0
    for idx, end, acquired in zip(present.tolist(), np.cumsum(counts[present]).tolist(), acquired_s, strict=True):
        kv.add_taken_blocks(running[idx].rid if idx < n else admitted[idx - n], by_request[start:end], acquired)
        start = end


def _give(kv, running: list[SimRequest], owners: np.ndarray, blocks: np.ndarray, acquired_s: np.ndarray) -> None:
    """Give blocks already taken from the free queue to their owners (members' indices), each
    owner its own in order; ``acquired_s``: when each was taken."""
    if not len(owners):
        return
    order = np.argsort(owners, kind="stable")
    owners, blocks, acquired_s = owners[order], blocks[order].tolist(), acquired_s[order]
    starts = np.flatnonzero(np.concatenate(([True], owners[1:] != owners[:-1])))
    sums = np.add.reduceat(acquired_s, starts).tolist()
    ends = [*starts[1:].tolist(), len(owners)]
    for start, end, total in zip(starts.tolist(), ends, sums, strict=True):
        kv.add_taken_blocks(running[int(owners[start])].rid, blocks[start:end], total)


def deliver(running: list[SimRequest], k: int, token_times: np.ndarray, tokens: list[int] | None = None,
            scheduled: list[int] | None = None) -> None:
    """Each running request gets one token at each of ``token_times`` (k of them), or, per
    request, its first ``tokens[i]`` of them after ``scheduled[i]`` steps of compute."""
    for i, r in enumerate(running):
        deliver_tokens(r, k if tokens is None else tokens[i], token_times)
        r.num_computed += k if scheduled is None else scheduled[i]


class Runs:
    """The fast path of one scheduler: runs of steps planned from its state and applied at once.

    ``advance`` plans a run and applies it; the arrivals the run admits come later (when the
    engine's clock reaches the run's end), through ``join``.
    """

    def __init__(self, sched: NativeScheduler, decode_times, step_time, arrivals: Arrivals,
                 async_scheduling: bool):
        self.sched = sched
        self._decode_times = decode_times
        self._step_time = step_time
        self.arrivals = arrivals
        self._lag = 1 if async_scheduling else 0  # steps in flight when a step is scheduled
        self._horizon = INITIAL_HORIZON
        self._joining: dict[int, Joining] = {}

    def join(self, req: SimRequest) -> bool:
        """If a run admitted ``req`` (just arrived), give it what the run did to it; True if so."""
        joining = self._joining.pop(req.rid, None)
        if joining is None:
            return False
        join(self.sched, req, joining)
        return True

    def advance(self, now: float, pace: float, next_arrival: int, in_flight: InFlight | None) -> Advance | None:
        """Apply a run of steps from ``now``, or None if the next step is not one. ``pace`` is the
        latest step's time; arrivals from ``next_arrival`` on are not queued yet; under async
        scheduling ``in_flight`` is the step in flight (it must be one token per running request)."""
        sched = self.sched
        base = self.base(now, in_flight)
        if base is None:
            return None
        run = self._plan(now, base, pace, next_arrival)
        if run is None:
            return None
        # (a cluster's replica logs a run when it starts, for its router: not the admissions of
        # a step filled after the run)
        if run.admits and (self.arrivals.known_until_s < math.inf
                           or not self._queue_settled(next_arrival, now if run.k < 2 else None, base, run)):
            run = run.truncated()
            if run.k < 1:
                return None
        k, lag = run.k, self._lag
        e = np.cumsum(np.concatenate(([base], run.step_times)))  # e[i]: end of the run's step i
        if in_flight is None:
            starts = sched_at = e[:-1]
            token_times, wait_s = e[1:], float(e[-1]) - now
        else:
            sched_at = np.concatenate(([now], e[: k - 1]))
            starts = np.concatenate(([in_flight.start_s], e[: k - 1]))
            token_times, wait_s = e[:k], float(e[k - 1]) - now
        waiting = self._waiting_changes(next_arrival, token_times, run.admissions)
        preempted: dict[int, int] = {}
        if in_flight is not None and in_flight.out.preempted:
            preempted[0] = len(in_flight.out.preempted)
        left_preempted = []
        for p in run.preemptions:
            waiting[p.step - 1] = waiting.get(p.step - 1, 0) + 1  # it waits from then on
            row = p.step - 1 + lag  # the row of its step's output
            if row < k:
                preempted[row] = preempted.get(row, 0) + 1
            else:
                left_preempted.append(sched.running[p.victim].rid)
        queued = len(sched.waiting)
        prefill = in_flight.out.batch.prefill_tokens if in_flight is not None else []
        if prefill:  # the step in flight completes prefills: one token each in flight, as decodes
            requests = sched.requests
            for rid, n in in_flight.out.num_scheduled.items():
                if n > 1:
                    requests[rid].in_flight_tokens = lag
        applied = apply_run(sched, run, sched_at, token_times, lag)
        if prefill:  # row 0 is the step in flight's output
            segments = applied.segments
            row, batch, running, tokens, prefilling = segments[0]
            segments[0] = (row, batch, running, tokens + sum(prefill), prefilling + len(prefill))
            if k > 1 and (len(segments) == 1 or segments[1][0] != 1):
                segments.insert(1, (1, batch, running, tokens, prefilling))
        self._joining.update(applied.joining)
        sched.count_steps(k)
        left = (float(e[k - 1]), float(e[k])) if in_flight is not None else None
        last = run.admissions[-1].rid + 1 if run.admissions else next_arrival
        return Advance(k, wait_s, starts, token_times, applied.kv_blocks_used, applied.segments,
                       applied.finished, queued, waiting, preempted, left, left_preempted, last,
                       float(run.step_times[-1]), run.admits)

    def base(self, now: float, in_flight: InFlight | None) -> float | None:
        """When a run from ``now`` could begin its steps: now, or the end of the step in flight
        (None: that step does not give every running request one token, so no run follows it).
        The step in flight may prefill: a prefill that ends in it samples a token as a decode does."""
        if in_flight is None:
            return now
        running = self.sched.running
        out = in_flight.out
        scheduled = out.num_scheduled
        if (len(scheduled) != len(running) or out.spec_tokens or len(out.sampling) != len(scheduled)
                or scheduled.keys() != {r.rid for r in running}):
            return None
        return in_flight.end_s

    def _plan(self, now: float, base: float, pace: float, next_arrival: int) -> DecodeRun | None:
        horizon = self._horizon
        arrival_s = self.arrivals.time_s
        next_s = float(arrival_s[next_arrival]) if next_arrival < len(arrival_s) else float("inf")
        next_s = min(next_s, self.arrivals.known_until_s)
        if pace > 0 and next_s != float("inf") and not self.sched.waiting:
            # nobody waits, so the next arrival is likely what ends the run: as many steps as
            # reach it at the last step's pace (one vectorised call rather than two)
            reach = (next_s - now) / pace * 1.05 + 8
            horizon = int(min(max(reach, INITIAL_HORIZON // 4), MAX_HORIZON))
        run = plan(self.sched, self._decode_times, self._step_time, now, base, self.arrivals, next_arrival,
                   horizon, self._lag)
        # plan next time up to twice as many steps as this run had: step times
        # computed beyond the event that ends a run are wasted
        k = run.k if run is not None else 0
        self._horizon = min(max(2 * k, INITIAL_HORIZON), MAX_HORIZON)
        return run

    def _queue_settled(self, next_arrival: int, now: float | None, base: float, run: DecodeRun) -> bool:
        """Whether the queue the run's last step admits from is the one the engine will have when
        it fills that step: no arrival from the step's scheduling to the run's end (async: the
        last step is scheduled at the end of the run's step k - 2 and the run ends with step k - 1)."""
        k = run.k
        ends = np.cumsum(np.concatenate(([base], run.step_times)))
        scheduled_s = float(ends[k - 2]) if k >= 2 else now
        arrival_s = self.arrivals.time_s
        i = int(np.searchsorted(arrival_s, scheduled_s, side="left"))
        return not (max(i, next_arrival) < len(arrival_s) and arrival_s[max(i, next_arrival)] <= ends[k - 1])

    def _waiting_changes(self, next_arrival: int, times: np.ndarray, admissions: list[Admission]) -> dict[int, int]:
        """How the queue changes over a run's rows (row times ``times``): +1 at the first row
        at or after each arrival that joins it (not rejected), -1 at the row an admitted one
        leaves it (the output before its prefill is scheduled)."""
        i = next_arrival
        arrival = self.arrivals.time_s
        changes: dict[int, int] = {}
        if i >= len(arrival) or arrival[i] > times[-1]:
            return changes
        j = int(np.searchsorted(arrival, times[-1], side="right"))
        joining = arrival[i:j][self.arrivals.queued[i:j]]
        for row in np.searchsorted(times, joining, side="left").tolist():
            changes[row] = changes.get(row, 0) + 1
        for a in admissions:
            changes[a.step - 1] = changes.get(a.step - 1, 0) - 1
        return changes
