"""The native model of vLLM V1's scheduler (vllm/v1/core/sched/scheduler.py, 0.32).

Each step first serves the running requests in order, then admits waiting
ones first-come-first-served, within the token budget (max_num_batched_tokens)
and max_num_seqs. Long prompts are prefilled in chunks. When a running request
cannot get a KV block, the last admitted running request is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed.
Under async scheduling (vLLM's default) the next step is scheduled while the
current one runs, with placeholders for the tokens it will sample.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable

from simulator.engine.interface import SchedulerOutput, StepScheduler
from simulator.engine.kv_cache import KVCacheManager
from simulator.engine.request import SimRequest, Status
from simulator.engine.rules import (
    deliver_tokens,
    fits_whole,
    has_seat,
    running_tokens,
    slots_needed,
)
from simulator.records.engine_config import EngineConfig
from simulator.records.performance import StepBatch

__all__ = ["NativeScheduler", "SchedulerOutput"]


class NativeScheduler(StepScheduler):
    """vLLM V1's scheduling policy over SimRequest objects and a KVCacheManager."""

    def __init__(self, config: EngineConfig, num_blocks: int, async_scheduling: bool = True):
        self.config = config
        self.block_size = config.block_size
        self.max_model_len = config.max_model_len
        self.async_scheduling = async_scheduling
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.running: list[SimRequest] = []
        self.waiting: deque[SimRequest] = deque()
        self.requests: dict[int, SimRequest] = {}
        self.step = 0
        # speculation only: requests whose last scheduled step left them prefilling
        # (vLLM's Request.is_prefill_chunk)
        self._prefilling: set[int] = set()
        #: KV slots reserved past each request's scheduled tokens for the drafter (vLLM's
        #: num_lookahead_tokens; 0 without speculation and for n-gram)
        self._lookahead = config.speculative.lookahead

    # --- queue --------------------------------------------------------------
    def add_request(self, request: SimRequest) -> None:
        self.requests[request.rid] = request
        self.waiting.append(request)

    def has_requests(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # --- scheduling -----------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Decide the next step's batch (vLLM's Scheduler.schedule)."""
        self.step += 1
        cfg = self.config
        out = SchedulerOutput(step=self.step)
        budget = cfg.max_num_batched_tokens
        threshold = cfg.long_prefill_token_threshold
        if len(self.running) + len(self.waiting) <= 1:
            threshold = 0  # nobody to starve: let a lone prefill use the whole budget
        budget, prefill_scheduled = self._schedule_running(out, budget, threshold)
        if not out.preempted:  # no admissions in a step that preempted
            self._schedule_waiting(out, budget, threshold, prefill_scheduled)
        self._after_schedule(out)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, threshold: int) -> tuple[int, bool]:
        """Serve the running requests in admission order, preempting from the back when a KV
        block is short; return the budget left and whether a prefill chunk was scheduled
        (speculation only)."""
        running = self.running
        schedule_one = self._schedule_one
        num_spec_tokens = self.config.speculative.num_speculative_tokens
        prefill_scheduled = False
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = schedule_one(req, out, budget, threshold)
            if n < 0:
                break
            i += 1
            if n:
                budget -= n
                if num_spec_tokens and req.rid in self._prefilling:
                    prefill_scheduled = True
        return budget, prefill_scheduled

    def _schedule_one(self, req: SimRequest, out: SchedulerOutput, budget: int, threshold: int, n: int = -1) -> int:
        """Schedule one running request within ``budget``: the tokens scheduled (0: none), or
        -1 if it was itself preempted to make room (``n``: its ``running_tokens`` if known).
        Runs once per request per step, the simulator's hottest code."""
        if n < 0:
            n = running_tokens(req, threshold, self.max_model_len)
        if n > budget:
            n = budget
        if n <= 0:
            return 0
        computed, rid = req.num_computed, req.rid
        slots = slots_needed(computed, n, self._lookahead, self.max_model_len)
        allocate = self.kv.allocate
        if not allocate(rid, slots) and not self._make_room(req, out, lambda: allocate(rid, slots)):
            return -1
        num_tokens = req.num_prompt + req.num_output
        self.kv.cache_full_blocks(req, computed + n if computed + n < num_tokens else num_tokens)
        out.num_scheduled[rid] = n
        if req.spec_tokens:
            num_spec = n + computed - num_tokens - req.placeholders
            if num_spec > 0:
                out.spec_tokens[rid] = min(num_spec, req.spec_tokens)
            req.spec_tokens = 0
        return n

    def _make_room(self, req: SimRequest, out: SchedulerOutput, allocate: Callable[[], bool]) -> bool:
        """Call ``allocate()`` (KV blocks for ``req``) until it succeeds, preempting from the
        back of the running requests meanwhile; False if ``req`` itself was preempted."""
        running = self.running
        while not allocate():
            victim = running.pop()
            self._preempt(victim)
            out.preempted.append(victim.rid)
            if victim is req:
                return False
        return True

    def head_blocked(self) -> bool:
        """Whether the head of the queue cannot be admitted until something finishes."""
        if not has_seat(len(self.running), self.config.max_num_seqs):
            return True
        head = self.waiting[0]
        if head.stale_tokens:
            return False
        return not fits_whole(self._blocks_to_admit(head), self.kv.num_free_blocks)

    def _blocks_to_admit(self, req: SimRequest) -> int:
        """Free KV blocks admitting waiting ``req`` takes for its whole sequence."""
        num_tokens = min(req.num_tokens, self.max_model_len)
        if req.num_computed:  # (it looks no prefix up)
            return self.kv.blocks_needed(req.rid, num_tokens)
        return self.kv.admission_blocks(req, num_tokens)

    def _prefix_hits(self, req: SimRequest) -> list[int]:
        """The prefix-cache blocks a waiting request finds (none if it computed some already)."""
        return self.kv.computed_blocks(req, req.num_tokens) if req.num_computed == 0 else []

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, threshold: int,
                          prefill_scheduled: bool) -> None:
        """Admit waiting requests first come first served, within the budget, max_num_seqs and
        the free KV blocks."""
        cfg = self.config
        kv = self.kv
        scheduled = out.num_scheduled
        running = self.running
        num_spec_tokens = cfg.speculative.num_speculative_tokens
        running_scheduled = bool(scheduled) or out.num_steady > 0
        skipped: list[SimRequest] = []
        waiting = self.waiting
        while budget > 0 and waiting:
            if not has_seat(len(running), cfg.max_num_seqs):
                break
            req = waiting[0]
            if req.stale_tokens:
                skipped.append(waiting.popleft())  # output of a preempted step still in flight
                continue
            if not fits_whole(self._blocks_to_admit(req), kv.num_free_blocks):
                break
            hits = self._prefix_hits(req)
            num_computed = len(hits) * self.block_size
            n = req.num_tokens - num_computed
            padded = (
                num_spec_tokens
                and n == 1
                and not prefill_scheduled
                and (running_scheduled or num_computed > 0)
                and num_computed + 2 + num_spec_tokens <= self.max_model_len
            )
            if padded:
                # vLLM pads a one-token decode to the uniform speculative size
                # (for CUDA graphs), with draft slots that are never accepted; the
                # long-prefill threshold does not cut the padding
                if 1 + num_spec_tokens > budget:
                    break
                n = 1 + num_spec_tokens
            elif 0 < threshold < n:
                n = threshold
            if not cfg.enable_chunked_prefill and n > budget:
                break
            n = min(n, budget)
            if not kv.allocate(req.rid, slots_needed(num_computed, n, self._lookahead, self.max_model_len),
                               hits):
                break
            if req.num_preemptions == 0 or req.num_cached_tokens < 0:
                kv.record_prefix_lookup(req.num_tokens, num_computed)
            waiting.popleft()
            running.append(req)
            self._on_admit(req)
            if req.first_scheduled_s < 0:
                req.first_scheduled_s = kv.clock
            (out.new if req.status == Status.WAITING else out.resumed).append(req.rid)
            scheduled[req.rid] = n
            if padded:
                out.spec_tokens[req.rid] = num_spec_tokens
                out.spec_padding.add(req.rid)
            budget -= n
            req.status = Status.RUNNING
            req.num_computed = num_computed
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_computed
            kv.cache_full_blocks(req, min(num_computed + n, req.num_tokens))
        if skipped:
            waiting.extendleft(reversed(skipped))

    # --- runs of steps (simulator.engine.fast_forward) ------------------------------------
    def admit_whole(self, req: SimRequest, scheduled_s: float) -> None:
        """Admit an arrival as a run of steps does: its whole prompt in one step, no prefix hit
        (the run looked none up and gave it its blocks)."""
        self.requests[req.rid] = req
        req.status = Status.RUNNING
        req.first_scheduled_s = scheduled_s
        req.num_cached_tokens = 0

    def replace_running(self, running: list[SimRequest]) -> None:
        """The running requests after a run of steps (some finished)."""
        self.running = running

    def join_running(self, req: SimRequest) -> None:
        """``req``, admitted by a run of steps, runs after the others."""
        self.running.append(req)
        self._on_admit(req)

    def count_steps(self, k: int) -> None:
        """``k`` steps were scheduled by a run of steps."""
        self.step += k

    def decode_step(self, preempted: list[int] | None = None, admit: bool = False) -> SchedulerOutput:
        """The latest step, as one decode step over the running requests (the step a run of
        steps leaves in flight), which preempted ``preempted``; ``admit``: the step also admits
        waiting requests, as ``schedule()`` does after the running ones."""
        rids = [r.rid for r in self.running]
        out = SchedulerOutput(step=self.step, num_scheduled=dict.fromkeys(rids, 1), sampling=set(rids),
                              preempted=list(preempted or ()),
                              batch=StepBatch(decode_context=[r.num_computed for r in self.running]))
        if admit and self.waiting:
            self._admit_into(out)
        return out

    def admit_in_run(self, running: list[SimRequest], budget: int) -> SchedulerOutput:
        """The waiting half of ``schedule()`` for a step inside a run of steps (simulator.engine.
        waiting_runs), ``running`` the requests running then and ``budget`` the tokens their
        decodes leave: the admissions, without their part of ``_after_schedule`` (the run
        gives the admitted requests what they compute)."""
        threshold = self.config.long_prefill_token_threshold
        if len(running) + len(self.waiting) <= 1:
            threshold = 0
        out = SchedulerOutput(step=self.step)
        kept, self.running = self.running, running
        try:
            self._schedule_waiting(out, budget, threshold, False)
        finally:
            self.running = kept
        return out

    def _admit_into(self, out: SchedulerOutput) -> None:
        """The waiting half of ``schedule()`` for a decode step built by a run: admissions within
        the budget its decodes leave, then their part of ``_after_schedule``."""
        cfg = self.config
        threshold = cfg.long_prefill_token_threshold
        if len(self.running) + len(self.waiting) <= 1:
            threshold = 0
        admitted = SchedulerOutput(step=out.step)
        self._schedule_waiting(admitted, cfg.max_num_batched_tokens - len(out.num_scheduled), threshold, False)
        if not admitted.num_scheduled:
            return
        self._after_schedule(admitted)
        out.num_scheduled.update(admitted.num_scheduled)
        out.sampling |= admitted.sampling
        out.new += admitted.new
        out.resumed += admitted.resumed
        batch, more = out.batch, admitted.batch
        batch.prefill_tokens += more.prefill_tokens
        batch.prefill_context += more.prefill_context
        batch.decode_context += more.decode_context  # (one-token prompts: decodes in vLLM's batch)
        batch.decode_spec_tokens = [0] * len(batch.decode_context)  # (runs have no speculation)

    def _on_admit(self, req: SimRequest) -> None:
        """Hook: ``req`` was just appended to the running requests."""

    def _after_schedule(self, out: SchedulerOutput) -> None:
        """Advance computed tokens and describe the batch (vLLM's _update_after_schedule)."""
        batch = out.batch
        requests = self.requests
        track_prefill = self.config.speculative.enabled
        async_scheduling = self.async_scheduling
        spec_tokens = out.spec_tokens
        decode_context, decode_spec = batch.decode_context.append, batch.decode_spec_tokens.append
        prefill_tokens, prefill_context = batch.prefill_tokens.append, batch.prefill_context.append
        sampling = out.sampling.add
        for rid, n in out.num_scheduled.items():
            req = requests[rid]
            before = req.num_computed
            num_spec = spec_tokens.get(rid, 0) if spec_tokens else 0
            num_tokens = req.num_prompt + req.num_output
            placeholders = req.placeholders
            if before >= num_tokens - 1 + placeholders and n - num_spec <= 1:
                decode_context(before + 1)
                decode_spec(num_spec)
            else:
                prefill_tokens(n)
                prefill_context(before)
            req.num_computed = before + n
            req.in_flight_tokens += n
            if before + n >= num_tokens + placeholders:
                sampling(rid)
                if async_scheduling:
                    req.placeholders = placeholders + 1 + num_spec
                if track_prefill:
                    self._prefilling.discard(rid)
            elif track_prefill:
                self._prefilling.add(rid)

    def _preempt(self, req: SimRequest) -> None:
        """Free a running request's blocks and put it at the front of the queue."""
        self.kv.free(req.rid)
        req.status = Status.PREEMPTED
        req.num_computed = 0
        req.spec_tokens = 0
        req.stale_tokens = req.in_flight_tokens
        req.placeholders = 0
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    # --- results --------------------------------------------------------------
    def update_from_output(
        self, out: SchedulerOutput, sampled: dict[int, int], now: float
    ) -> list[SimRequest]:
        """Apply a finished step: deliver ``sampled[rid]`` tokens per sampling request.

        Returns the requests that finished in this step.
        """
        finished: list[SimRequest] = []
        requests = self.requests
        spec_tokens, spec_padding = out.spec_tokens, out.spec_padding
        async_scheduling = self.async_scheduling
        cache_full_blocks = self.kv.cache_full_blocks
        max_model_len = self.max_model_len
        finished_status, running_status = Status.FINISHED, Status.RUNNING
        at_now = (now,) * (1 + self.config.speculative.num_speculative_tokens)  # token i's time
        for rid, n in out.num_scheduled.items():
            req = requests[rid]
            req.in_flight_tokens -= n
            stale = req.stale_tokens > 0
            if stale:
                req.stale_tokens -= n
            if req.status >= finished_status:
                continue
            generated = sampled.get(rid, 0)
            if not generated:
                continue
            num_spec = 0
            if spec_tokens:
                if rid in spec_padding:
                    generated = 1
                num_spec = spec_tokens.get(rid, 0)
            if num_spec:
                rejected = num_spec - (generated - 1)
                if not stale:
                    if req.num_computed > 0:
                        req.num_computed -= rejected
                    if req.placeholders > 0:
                        req.placeholders -= rejected
            # deliver the tokens one by one until a stop condition (vLLM's check_stop)
            num_output = req.num_output
            num_tokens = req.num_prompt + num_output
            room = req.max_tokens - num_output
            if max_model_len - num_tokens < room:
                room = max_model_len - num_tokens
            delivered = generated if generated < room else room
            if delivered > 0:
                deliver_tokens(req, delivered, at_now)
                stopped = num_output + delivered >= req.max_tokens or num_tokens + delivered >= max_model_len
            else:
                delivered, stopped = 0, True
            if not stale:
                placeholders = req.placeholders - delivered
                req.placeholders = placeholders if placeholders > 0 else 0
            if async_scheduling and req.status == running_status:
                # As vLLM: only the AsyncScheduler caches blocks when output arrives
                # (the sync one waits for the next allocation, which matters for
                # blocks filled by accepted drafts), and it does so before a
                # finishing request is freed, so that block goes to the back of
                # the free queue.
                cache_full_blocks(req, req.num_computed - req.placeholders)
            if stopped:
                self.finish(req, now)
                finished.append(req)
        if finished:
            running = self.running
            if len(finished) <= 4:
                for r in finished:
                    with contextlib.suppress(ValueError):  # a preempted one finishes from the queue
                        running.remove(r)
            else:
                done = {r.rid for r in finished}
                self.running = [r for r in running if r.rid not in done]
        return finished

    def finish_requests(self, rids: Iterable[int], now: float) -> list[SimRequest]:
        done = [self.requests[rid] for rid in rids if self.requests[rid].status < Status.FINISHED]
        for req in done:
            if req.status == Status.WAITING:
                self.waiting.remove(req)
            self.finish(req, now)
        if done:
            self.running = [r for r in self.running if r.status == Status.RUNNING]
        return done

    def finish(self, req: SimRequest, now: float) -> None:
        """A request's last token arrived at ``now``: it is done and its blocks are freed."""
        if req.status == Status.PREEMPTED:
            with contextlib.suppress(ValueError):
                self.waiting.remove(req)
        req.status = Status.FINISHED
        req.finish_s = now
        self.kv.free(req.rid, finished=True)
