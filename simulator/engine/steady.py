"""Steady decoders: running requests advanced without Python work per step.

Under heavy load hundreds of requests run at once and nearly every step has an
event that changes the batch (an admission, a prefill chunk, a preemption, a
finish), so runs of identical steps (simulator.engine.fast_forward) are short. Yet in
each such step almost every running request just decodes one token.
SteadyScheduler keeps those requests *steady*: from its entry step ``e`` on, a
steady request gets one token of compute in every scheduled step and one token
delivered in every applied step, so its counters are its values at entry plus
the number of steps since. Only its events cost work:

- a KV block boundary: the block is allocated in running order, with the
  preemptions a short block causes, as the step-by-step scheduler would;
- the steps where something else would happen to it (its first visible token,
  its last tokens, max_model_len): there it leaves the steady set, gets its
  current values (``_leave``), and the ordinary code takes over.

A step then costs O(events) instead of O(running requests). The batch handed to
the PerformanceModel lists the steady decoders with their exact count and total
context (the engine uses this scheduler only with models whose step time
depends on nothing else, the ones with ``decode_times``). Results equal
NativeScheduler's, step for step (tests/simulator/engine/test_steady.py).
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from dataclasses import dataclass

from simulator.engine.fast_forward import Advance, InFlight, Runs
from simulator.engine.native import NativeScheduler, SchedulerOutput
from simulator.engine.request import SimRequest, Status
from simulator.engine.rules import decodes_one_token, running_tokens
from simulator.records.engine_config import EngineConfig

#: requests become steady only with this many running and after this many ordinary steps in a
#: row: entering and leaving costs a few ordinary steps' work, lost when a run of identical
#: steps (simulator.engine.fast_forward, cheaper still) follows at once
STEADY_MIN_RUNNING = 16
STEADY_AFTER_STEPS = 4


@dataclass(slots=True)
class _Steady:
    """A steady request's stretch: the step it began, its next KV block step, its last step + 1."""

    req: SimRequest
    start: int
    cross: int
    exit: int
    live: bool = True  # False once the request has left the steady set


class SteadyScheduler(NativeScheduler):
    """NativeScheduler with steady decoders kept lazily (no speculative decoding)."""

    def __init__(self, config: EngineConfig, num_blocks: int, async_scheduling: bool = True):
        if config.speculative.enabled:
            raise ValueError("SteadyScheduler does not model speculative decoding")
        super().__init__(config, num_blocks, async_scheduling=async_scheduling)
        self._lag = 1 if async_scheduling else 0  # steps in flight when a step is scheduled
        self._specials: list[SimRequest] = []  # running, not steady, in running order
        self._order: dict[int, int] = {}  # request id -> admission order among running requests
        self._next_order = 0
        self._steady: dict[int, _Steady] = {}  # request id -> its stretch, while it is steady
        self._events: dict[int, list[_Steady]] = {}  # step -> steady stretches with an event
        self._exits: list[tuple[int, int, _Steady]] = []  # heap: (last step + 1, seq, stretch)
        self._exit_seq = 0
        self._steady_count = 0
        self._steady_base = 0  # sum over steady requests of (computed at entry - entry step + 1)
        self._pending: deque[SchedulerOutput] = deque()  # scheduled, not applied, with steady members
        self._applied_step = 0
        self._applied_s = 0.0
        self._in_schedule = False
        #: request-steps advanced lazily so far (a diagnostic: how much the steady set saved)
        self.steady_request_steps = 0
        self._ordinary_steps = 0
        self._last_scheduled = -1
        self._runs: Runs | None = None

    # --- runs of steps (simulator.engine.fast_forward) ------------------------------------
    def use_runs(self, runs: Runs) -> None:
        """Advance by runs of steps where it can (``advance``)."""
        self._runs = runs

    def add_request(self, request: SimRequest) -> None:
        if self._runs is None or not self._runs.join(request):  # (else a run admitted it)
            super().add_request(request)

    def advance(self, now: float, pace: float = 0.0, next_arrival: int = 0,
                in_flight: InFlight | None = None) -> Advance | None:
        if self._runs is None or not self.ready_for_run():
            return None
        return self._runs.advance(now, pace, next_arrival, in_flight)

    # --- the step ---------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        # count the ordinary steps since the last run of identical steps (which moved self.step)
        self._ordinary_steps = self._ordinary_steps + 1 if self.step == self._last_scheduled else 0
        self._in_schedule = True
        try:
            return super().schedule()
        finally:
            self._in_schedule = False
            self._last_scheduled = self.step

    def _on_admit(self, req: SimRequest) -> None:
        self._order[req.rid] = self._next_order
        self._next_order += 1
        if self._steady_count:  # else the running requests are all ordinary
            self._specials.append(req)

    def _schedule_running(self, out: SchedulerOutput, budget: int, threshold: int) -> tuple[int, bool]:
        s = self.step
        running_status = Status.RUNNING
        steady = self._steady
        if not self._steady_count:
            if len(self.running) < STEADY_MIN_RUNNING or self._ordinary_steps < STEADY_AFTER_STEPS:
                return super()._schedule_running(out, budget, threshold)
            specials = list(self.running)
        else:
            specials = [r for r in self._specials if r.rid not in steady and r.status == running_status]
        self._specials = specials  # requests leaving the steady set in this step join it
        max_model_len = self.max_model_len
        demands = [running_tokens(r, threshold, max_model_len) for r in specials]
        if self._steady_count + sum(demands) > budget:
            # the budget runs out part-way through the running requests: who is served depends
            # on everyone's position, so this step goes the ordinary way
            self.materialize()
            return super()._schedule_running(out, budget, threshold)
        order = self._order
        # order -> (request, its steady stretch or None, its tokens if known, else -1)
        todo = {order[r.rid]: (r, None, n) for r, n in zip(specials, demands, strict=True)}
        for st in self._events.pop(s, ()):
            if st.live and min(st.cross, st.exit) == s:
                todo[order[st.req.rid]] = (st.req, st, -1)
        block_size = self.block_size
        append_block, events = self.kv.append_block, self._events
        for order in sorted(todo):
            req, st, n = todo[order]
            if req.status != running_status:
                continue  # preempted earlier in this step (a steady one left the set then)
            if st is not None:
                exit_step = st.exit
                if exit_step != s:  # a block boundary: one more block, in running order
                    if not append_block(req.rid) and not self._make_room(
                            req, out, lambda req=req: append_block(req.rid)):
                        break
                    # the next event (as _add_event; spelled out: the hottest loop under load)
                    cross = st.cross = st.cross + block_size
                    step = cross if cross < exit_step else exit_step
                    bucket = events.get(step)
                    if bucket is None:
                        events[step] = [st]
                    else:
                        bucket.append(st)
                    continue
                self._leave(req)
            elif self._enter(req, s):
                continue
            n = self._schedule_one(req, out, budget, threshold, n)  # the budget covers everyone (demands above)
            if n < 0:
                break
            budget -= n
        self._specials = [r for r in self._specials if r.rid not in steady and r.status == running_status]
        out.num_steady = self._steady_count
        return budget - self._steady_count, False

    def _after_schedule(self, out: SchedulerOutput) -> None:
        super()._after_schedule(out)
        n = out.num_steady
        if n:
            self.steady_request_steps += n
            # each steady request attends over its computed tokens + 1: at step s that is
            # (computed at entry - entry step + 1) + s, summed here; the count and the sum are
            # exact, the split between requests is not kept
            q, r = divmod(self._steady_base + n * out.step, n)
            batch = out.batch
            batch.decode_context.extend([q + 1] * r)
            batch.decode_context.extend([q] * (n - r))
            batch.decode_spec_tokens.extend([0] * n)
            self._pending.append(out)

    def update_from_output(self, out: SchedulerOutput, sampled: dict[int, int], now: float) -> list[SimRequest]:
        finished = super().update_from_output(out, sampled, now)
        if self._pending and self._pending[0] is out:
            self._pending.popleft()
        self._applied_step = out.step
        self._applied_s = now
        return finished

    def _preempt(self, req: SimRequest) -> None:
        if req.rid in self._steady:
            self._leave(req)
        super()._preempt(req)

    def finish(self, req: SimRequest, now: float) -> None:
        self._order.pop(req.rid, None)
        super().finish(req, now)

    # --- entering and leaving the steady set -------------------------------------------
    def _enter(self, req: SimRequest, s: int) -> bool:
        """Make ``req`` steady from step ``s`` if its next steps are plain one-token decodes."""
        lag = self._lag
        if not decodes_one_token(req, lag) or req.in_flight_tokens != lag or req.num_output + lag < 1:
            return False
        num_output = req.num_output
        num_tokens = req.num_prompt + num_output
        computed = req.num_computed
        # steps s .. s + j_exit - 1 stay plain: no stop, no first visible token, no max_model_len clamp
        j_exit = min(req.max_tokens - num_output - lag - 2, self.max_model_len - num_tokens - lag - 3)
        if req.first_visible_s < 0:
            j_visible = req.reasoning_tokens - num_output - lag
            if 0 <= j_visible < j_exit:
                j_exit = j_visible
        if j_exit < 1:
            return False
        kv = self.kv
        j_cross = kv.num_blocks_of(req.rid) * self.block_size - computed
        if j_cross < 1:
            return False
        if kv.enable_caching:
            kv.cache_full_blocks(req, num_tokens)  # what the ordinary scheduling does in step s
            if kv.num_cached_blocks_of(req.rid) < req.num_shared_blocks:
                return False
        st = self._steady[req.rid] = _Steady(req, s, s + j_cross, s + j_exit)
        self._add_event(st)
        self._exit_seq += 1
        heapq.heappush(self._exits, (st.exit, self._exit_seq, st))
        self._steady_count += 1
        self._steady_base += computed - s + 1
        return True

    def _add_event(self, st: _Steady) -> None:
        step = st.cross if st.cross < st.exit else st.exit
        bucket = self._events.get(step)
        if bucket is None:
            self._events[step] = [st]
        else:
            bucket.append(st)

    def _leave(self, req: SimRequest) -> None:
        """Give a steady request its current values and make it ordinary again."""
        self._settle(req)
        order = self._order
        bisect.insort(self._specials, req, key=lambda r: order[r.rid])

    def _settle(self, req: SimRequest) -> None:
        st = self._steady.pop(req.rid)
        st.live = False
        e = st.start
        computed = req.num_computed
        self._steady_count -= 1
        self._steady_base -= computed - e + 1
        scheduled_through = self.step - 1 if self._in_schedule else self.step
        k_scheduled = scheduled_through - e + 1
        k_applied = max(self._applied_step - e + 1, 0)
        req.num_computed = computed + k_scheduled
        if k_applied:
            req.num_output += k_applied
            req.last_token_s = self._applied_s
        in_flight = k_scheduled - k_applied
        req.in_flight_tokens += in_flight
        if self.async_scheduling:
            req.placeholders += in_flight
        for out in self._pending:  # the steps in flight that counted it as steady now list it
            if out.step >= e:
                out.num_scheduled[req.rid] = 1
                out.sampling.add(req.rid)
                out.num_steady -= 1
        if self.kv.enable_caching:
            # the step-by-step scheduler's latest call registered the blocks full of computed
            # tokens: all of them under sync scheduling, all but the newest under async
            if self.async_scheduling:
                tokens = computed + max(k_scheduled - 1, 0)
            else:
                tokens = computed + max(k_scheduled, 1)
            self.kv.cache_full_blocks(req, tokens)

    def materialize(self) -> None:
        """Give every steady request its current values; none stays steady."""
        if not self._steady_count:
            return
        for r in self.running:
            if r.rid in self._steady:
                self._settle(r)
        self._specials = list(self.running)
        self._events.clear()
        self._exits.clear()
        self._pending.clear()

    # --- runs of identical steps -------------------------------------------------
    def ready_for_run(self) -> bool:
        """Whether a run of pure-decode steps (simulator.engine.fast_forward) is worth planning now;
        if so, every request gets its current values first. A run costs work per running
        request; it is tried only when no known event of the next few steps would cut it short
        (more steps with more requests)."""
        if not self._steady_count:
            return True
        lag = self._lag
        min_steps = max(2, self._steady_count // 24)
        for r in self._specials:
            if r.status != Status.RUNNING or r.rid in self._steady:
                continue
            if not decodes_one_token(r, lag) or r.max_tokens - r.num_output - lag <= min_steps:
                return False
        if self.waiting and not self.head_blocked():
            return False
        exits = self._exits
        while exits and (not exits[0][2].live or exits[0][2].exit != exits[0][0]):
            heapq.heappop(exits)
        if exits and exits[0][0] - self.step <= min_steps + 1:
            return False
        events = self._events
        needed = sum(len(events.get(self.step + i, ())) for i in range(1, min_steps + 2))
        if needed > self.kv.num_free_blocks:
            return False
        self.materialize()
        return True
