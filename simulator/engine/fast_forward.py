"""The fast path: many decode steps advanced at once, exactly.

Reasoning requests spend most of their life decoding. Between events that
change the batch in ways that depend on the queue (a request that must wait, a
KV block that cannot be had), every engine step schedules the running requests
one token each, so the steps can be computed in closed form: step times come
vectorised from ``PerformanceModel.decode_times`` (``decode_times_by_count``), new
KV blocks are taken in the order the step-by-step scheduler would take them, and
the timeline gets one row per step.

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
While requests wait, a run goes on through preemptions, finishes and admissions of waiting
requests instead (simulator.engine.waiting_runs). The results equal the step-by-step path's
(tests/simulator/engine/test_fast_forward.py checks it); the event that ends a run is left to the
ordinary path. What both kinds of run share is in simulator.engine.run_plan.

``Runs`` is the fast path behind the scheduler interface (``advance``): it plans a
run from the scheduler's state, applies it at once and hands the engine what to
log. The clock stays SimPy's: the arrivals a run admits are not made ahead of
time; the run hands out their KV blocks by request id and keeps the rest of what
it did to them (``Joining``) until they come, through the scheduler's
``add_request``, when the engine's clock reaches the end of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from simulator.engine import waiting_runs
from simulator.engine.interface import Advance, InFlight
from simulator.engine.native import NativeScheduler
from simulator.engine.request import SimRequest, Status
from simulator.engine.rules import decodes_one_token, deliver_tokens, fits_whole, has_seat
from simulator.engine.run_plan import (
    Admission,
    DecodeRun,
    Members,
    crossing_steps,
    decode_blocks,
    deliver,
    first_block_step,
    hand_out,
)
from simulator.records.performance import PerformanceModel

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
    #: runs may admit arrivals (False: a run stops before an arrival's prefill, which goes step
    #: by step; for a model whose step times depend on the steps before, ``ShapeCache``)
    admit: bool = True


def plan(
    sched: NativeScheduler,
    perf: PerformanceModel,
    now: float,
    base: float,
    arrivals: Arrivals | None,
    next_arrival: int,
    horizon: int,
    in_flight_steps: int,
    walks: list | None = None,
    resume: bool = False,
    cut: bool = False,
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
    and 1 under async. ``walks``: the walk through the arrivals is appended to it, where the
    run had one (``ArrivalWalk.extend`` plans it again with more arrivals). ``resume``: a run
    planned while requests wait may admit them inside it (``waiting_runs.plan_waiting_run``),
    ``cut``: also one whose prefill the token budget cuts.
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
    members = Members(c, remaining, held)
    admissions: list[Admission] = []
    # with requests waiting, members finish inside the run only if the queue's head admission
    # does not depend on other requests' blocks (no shared prefix to hit)
    finish_inside = not waiting or not (sched.kv.enable_caching and waiting[0].num_shared_blocks)
    k_max = min((max(remaining) if finish_inside else min(remaining)) - (1 - lag), cap)
    if k_max < 1:
        return None
    if waiting and (arrivals is None or arrivals.known_until_s == math.inf):
        # the walk needs no step times: they are computed once, for the steps it keeps
        k = min(k_max, horizon)
        return waiting_runs.plan_waiting_run(sched, members, None, k, perf, lag,
                                             resume=resume and arrivals is not None and arrivals.admit, cut=cut)
    times = members.step_times(perf, 1, min(k_max, horizon))
    if not waiting and arrivals is not None:
        walk = ArrivalWalk(sched, members, admissions, times, k_max, perf, now, base, horizon, lag)
        times, k_max = walk.go(arrivals, next_arrival), walk.k_max
        if walks is not None:
            walks.append(walk)
            admissions = list(admissions)  # (``_fit_kv`` may drop the last: the walk keeps them)
    k = len(times)
    if arrivals is not None and arrivals.known_until_s < math.inf:
        k = min(k, _rows_before(times, base, lag, arrivals.known_until_s))
    if k < 1:
        return None
    return _fit_kv(sched, members, admissions, times, k, perf, lag)


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


class ArrivalWalk:
    """A run's walk through the arrivals it reaches: each one the step after it admits whole joins
    the run (``members``, ``admissions``); the first other one ends it (see ``_StepClock`` for
    ``now`` and ``base``). Kept, it goes on through more arrivals (``extend``: a cluster's
    replica gets its requests as they are routed) while the scheduler's state is the one it was
    planned from."""

    def __init__(self, sched, members: Members, admissions: list[Admission], times: np.ndarray, k_max: int,
                 perf: PerformanceModel, now: float, base: float, horizon: int, lag: int):
        self.sched, self.members, self.admissions = sched, members, admissions
        self.k_max, self.perf, self.now, self.horizon, self.lag = k_max, perf, now, horizon, lag
        self.clock = _StepClock(times, base, lag)
        self.prompt_blocks = 0  # blocks of the prompts admitted so far
        self.index = 0  # the next arrival to go through
        #: the most steps timed past an admission that no arrival known follows (None: ``horizon``)
        self.tail: int | None = None
        #: every arrival given was admitted (or rejected at arrival): a later one may join too
        self.open = False

    def go(self, arrivals: Arrivals, index: int) -> np.ndarray:
        """Go through the arrivals from ``index`` on; returns the step times (``k_max`` updated)."""
        sched, members, admissions, clock, perf, lag = (self.sched, self.members, self.admissions, self.clock,
                                                        self.perf, self.lag)
        self.open = False
        cfg = sched.config
        caching = sched.kv.enable_caching
        budget, threshold = cfg.max_num_batched_tokens, cfg.long_prefill_token_threshold
        queued, arrival_s = arrivals.queued, arrivals.time_s
        total = len(arrival_s)
        bs, free = sched.block_size, sched.kv.num_free_blocks
        k_max = self.k_max
        try:
            while True:
                while index < total and not queued[index]:
                    index += 1  # rejected at arrival: it never waits
                if index >= total:
                    self.open = True
                    self.index = index
                    return clock.times()
                t = float(arrival_s[index])
                if t <= self.now:
                    return clock.tail[:0]  # it is in the queue before step 1
                step = clock.step_after(t)
                known = len(clock)
                if step > known:
                    if known >= k_max:
                        return clock.times()
                    more = int((t - clock.tail_ends[-1]) / clock.tail[-1] * 1.1) + 16
                    clock.extend(members.step_times(perf, known + 1, min(known + more, k_max)))
                    continue
                members.retire_before(step - lag, bs)  # (later arrivals' steps come no earlier)
                prompt = int(arrivals.prompt[index])
                # the arrivals already admitted in this step (bursts: arrivals within one step's time)
                same_step = []
                for a in reversed(admissions):
                    if a.step != step:
                        break
                    same_step.insert(0, a.prompt)
                blocks = -(-prompt // bs)
                admitted = (
                    arrivals.admit
                    and step >= 2
                    and (arrivals.private[index] or not caching)
                    and prompt + sum(same_step) + members.decoding(step) <= budget  # whole, in this step's budget
                    and not (threshold and prompt > threshold)
                    # the admission gate, on the free blocks left after every block taken so far (none
                    # freed counted: see _fit_kv)
                    and has_seat(members.running_after(step - 1 - lag), cfg.max_num_seqs)
                    and fits_whole(blocks, free - self.prompt_blocks - members.new_blocks_through(step, bs))
                )
                if not admitted:
                    return clock.times(step - 1)
                self.prompt_blocks += blocks
                last = step + int(arrivals.max_tokens[index]) - 1
                prefill = members.prefill_step_time(perf, step, [*same_step, prompt])
                members.add(step + 1, prompt, last, blocks)
                admissions.append(Admission(step, index, prompt))
                k_max = min(max(k_max, last - (1 - lag)), MAX_HORIZON)
                index += 1
                # the steps from this one on change: recompute them up to about the next arrival
                upto = min(k_max, step + (self.horizon if self.tail is None else min(self.horizon, self.tail)))
                if index < total:
                    pace = clock.time_of(step - 1)
                    reach = (float(arrival_s[index]) - clock.scheduled_at(step)) / pace * 1.1
                    upto = min(k_max, step + max(16, int(reach) + 16))
                tail = members.step_times(perf, step + 1, upto) if upto > step else clock.tail[:0]
                clock.replace_from(step, np.concatenate(([prefill], tail)))
        finally:
            self.k_max = k_max

    def go_on(self, steps: int) -> DecodeRun | None:
        """The run planned again with up to ``steps`` more steps timed past the known ones, no
        arrival given since (``open`` only; a later ``extend`` reads the same times): as if the walk
        had timed them at once. None if it was not open or no step is left to time."""
        known = len(self.clock)
        if not self.open or known >= self.k_max:
            return None
        self.clock.extend(self.members.step_times(self.perf, known + 1, min(known + steps, self.k_max)))
        return self._run(self.clock.times())

    def _run(self, times: np.ndarray) -> DecodeRun | None:
        """The run of the walk's members and admissions with ``times`` (its blocks left to
        ``with_blocks`` where the free blocks cover them)."""
        return _fit_kv(self.sched, self.members, list(self.admissions), times, len(times), self.perf, self.lag,
                       blocks=False)

    def extend(self, arrivals: Arrivals) -> DecodeRun | None:
        """The run planned again with ``arrivals`` (those planned with, then more): the walk goes
        on from where it stopped (``open`` only). None if it was not open or no step is left.
        Its blocks may be left to ``with_blocks`` (``_fit_kv``'s ``blocks`` False)."""
        if not self.open:
            return None
        times = self.go(arrivals, self.index)
        return self._run(times) if len(times) else None


def _fit_kv(sched, members: Members, admissions: list[Admission], times: np.ndarray, k: int,
            perf: PerformanceModel, lag: int, blocks: bool = True) -> DecodeRun | None:
    """The run cut before its first step short of a free KV block (blocks freed inside the run
    are not counted: the run may end earlier than it could, never later) and before any
    admission whose prefill would be its last step. With requests waiting, a step short of a
    block preempts instead, as the scheduler does (``plan_waiting_run``). ``blocks`` False:
    where the free blocks cover every block of the run, its blocks are left to ``with_blocks``
    (``block_steps`` and ``block_owners`` None)."""
    if sched.waiting and not admissions:
        return waiting_runs.plan_waiting_run(sched, members, times, k, perf, lag)
    running = sched.running
    n = len(running)
    bs = sched.block_size
    held = np.array(members.held, dtype=np.int64)
    prompt_blocks = held[n:]
    first, computed, last = members.arrays()
    if not blocks and _blocks_needed(computed, held, bs, np.minimum(last, k), first) + int(prompt_blocks.sum()) \
            <= sched.kv.num_free_blocks:
        while admissions and admissions[-1].step >= k:
            k = min(k, admissions.pop().step - 1)
        m = n + len(admissions)
        return DecodeRun(k=k, step_times=times[:k], first_steps=first[:m], computed=computed[:m],
                         last_steps=last[:m], block_steps=None, block_owners=None, admissions=admissions)
    prompts = None
    if admissions:  # an admitted request's prompt blocks, taken in its prefill step
        prompts = (np.repeat([a.step for a in admissions], prompt_blocks),
                   np.repeat(np.arange(n, n + len(admissions)), prompt_blocks))
    steps, owners = crossing_steps(computed, held, bs, np.minimum(last, k), first, prompts)
    free = sched.kv.num_free_blocks
    if len(steps) > free:
        # that step would preempt, or not admit (never later than ``k``: the prompts of
        # admissions past ``k``, a cut before the next routing decision, are counted too, though
        # the admission gate keeps their blocks within the free ones)
        k = min(k, int(steps[free]) - 1)
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


def _blocks_needed(c: np.ndarray, held: np.ndarray, block_size: int, k: np.ndarray, first_steps: np.ndarray) -> int:
    """How many new blocks ``crossing_steps`` gives the members (decodes only), in one sum."""
    return int(decode_blocks(first_block_step(c, held, first_steps, block_size), k, block_size).sum())


def with_blocks(sched: NativeScheduler, run: DecodeRun, held: list[int]) -> DecodeRun:
    """``run`` (planned from ``sched``'s state by ``_fit_kv`` with ``blocks`` False) with its
    blocks: those ``_fit_kv`` gives it. ``held``: the blocks each member held before its first
    decode step (``Members.held``, the run's members first)."""
    if run.block_steps is not None:
        return run
    n, m = len(sched.running), len(run.first_steps)
    held = np.array(held[:m], dtype=np.int64)
    prompts = None
    if run.admissions:  # (as ``_fit_kv``)
        prompts = (np.repeat([a.step for a in run.admissions], held[n:]), np.repeat(np.arange(n, m), held[n:]))
    steps, owners = crossing_steps(run.computed, held, sched.block_size, np.minimum(run.last_steps, run.k),
                                   run.first_steps, prompts)
    return replace(run, block_steps=steps, block_owners=owners)


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
        finished = waiting_runs.apply_waiting_run(sched, run, sched_at, token_times, lag, taken_at)
    elif not len(finishing) and not admissions:
        hand_out(kv, running, admitted, steps, owners, sched_at)
        deliver(running, k, token_times)
        kv.cache_many(running, (computed + k - lag).tolist())
    else:
        taken = 0
        finishing = finishing[np.argsort(last[finishing], kind="stable")]  # by last step, then order
        for i in finishing.tolist():
            row = int(last[i]) + lag - 1  # the row bringing its last token
            cut = int(np.searchsorted(steps, row + 1, side="right"))  # steps scheduled before it
            if cut > taken:
                hand_out(kv, running, admitted, steps[taken:cut], owners[taken:cut], sched_at)
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
        hand_out(kv, running, admitted, steps[taken:], owners[taken:], sched_at)
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
    def prefilled(row: int, tokens: int) -> None:
        change(row + 1)  # its prefill (or this chunk of it) is over
        if tokens > 1:
            entry = prefills.setdefault(row, [0, 0])
            entry[0] += tokens
            entry[1] += 1

    def admitted(step: int, prefill: int, rest: int = 0) -> None:
        change(step - 1, running=1)
        change(step - 1 + lag, batch=1)
        prefilled(step - 1 + lag, prefill)
        if rest:  # the budget cut its prefill: the rest in the next step
            prefilled(step + lag, rest)

    for a in run.admissions:
        admitted(a.step, a.prompt)
    for r in run.resumptions:  # a waiting request admitted inside the run, as an arrival is
        admitted(r.step, r.prefill, r.rest)
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


class Runs:
    """The fast path of one scheduler: runs of steps planned from its state and applied at once.

    ``advance`` plans a run and applies it; the arrivals the run admits come later (when the
    engine's clock reaches the run's end), through ``join``.
    """

    #: runs planned while requests wait admit them inside (off for a cluster's replicas, whose
    #: runs are cut at routing decisions: simulator.cluster.replica)
    resume_waiting = True
    #: ... and admit a request whose prefill the token budget cuts (its rest in the next step):
    #: under overload its runs are ~3x as long, ~5-8% less CPU (docs/benchmarks.md)
    cut_prefills = True

    def __init__(self, sched: NativeScheduler, perf: PerformanceModel, arrivals: Arrivals, async_scheduling: bool):
        self.sched = sched
        self._perf = perf  # its ``decode_times`` supported
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
            token_times, end_s = e[1:], float(e[-1])
        else:
            sched_at = np.concatenate(([now], e[: k - 1]))
            starts = np.concatenate(([in_flight.start_s], e[: k - 1]))
            token_times, end_s = e[:k], float(e[k - 1])
        waiting = self._waiting_changes(next_arrival, token_times, run.admissions, [r.step for r in run.resumptions])
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
                left_preempted.append((sched.running + run.joined)[p.victim].rid)
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
        return Advance(k, end_s, starts, token_times, applied.kv_blocks_used, applied.segments,
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
        run = plan(self.sched, self._perf, now, base, self.arrivals, next_arrival,
                   horizon, self._lag, resume=self.resume_waiting, cut=self.cut_prefills)
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

    def _waiting_changes(self, next_arrival: int, times: np.ndarray, admissions: list[Admission],
                         resumed: list[int] | tuple[int, ...] = ()) -> dict[int, int]:
        """How the queue changes over a run's rows (row times ``times``): +1 at the first row
        at or after each arrival that joins it (not rejected), -1 at the row an admitted one
        leaves it (the output before its prefill is scheduled; ``resumed``: the steps that admit
        waiting requests inside the run, one entry each)."""
        i = next_arrival
        arrival = self.arrivals.time_s
        changes: dict[int, int] = {}
        if i >= len(arrival) or arrival[i] > times[-1]:
            for step in resumed:
                changes[step - 1] = changes.get(step - 1, 0) - 1
            return changes
        j = int(np.searchsorted(arrival, times[-1], side="right"))
        joining = arrival[i:j][self.arrivals.queued[i:j]]
        for row in np.searchsorted(times, joining, side="left").tolist():
            changes[row] = changes.get(row, 0) + 1
        for step in [*(a.step for a in admissions), *resumed]:
            changes[step - 1] = changes.get(step - 1, 0) - 1
        return changes
