"""Data-parallel lock-step: the DP ranks of a mixture-of-experts model step together.

vLLM runs them in ``DPEngineCoreProc`` (vllm/v1/engine/core.py, ``run_busy_loop``): every MoE
layer exchanges all ranks' tokens, so every rank runs a forward pass each step, a rank with
nothing scheduled a dummy batch (``execute_dummy_batch``: one decode token), and a step ends when
every rank's forward pass has: the slowest rank's step while the ranks pad to one size, else the
slowest rank's step without its experts plus the experts for all ranks' tokens (below). The ranks
stop stepping only when all are idle (a wave ends); a request reaching an idle group starts the
next wave at once.

``LockstepGroup`` drives its ranks (cluster replicas run step by step: no fast-path runs) in
rounds. At a round's start each rank schedules its step as its own engine loop would (under
async scheduling one round ahead, as the loop keeps two steps in flight); the round lasts as the
tokens that meet in the MoE layers make it (below; an idle rank's step is the dummy batch); each
rank applies its step at the round's end, so its logged step spans the whole round.

How long a round lasts depends on the tokens that meet in the MoE layers (vLLM's
``coordinate_batch_across_dp``, vllm/v1/worker/dp_utils.py): while every rank's step fits a
captured CUDA graph, all ranks pad to the largest rank's token count, so each rank's step model
(its experts priced for that many equally loaded ranks) holds and the round is the slowest rank's
step; once one rank's step is too large for a graph, none pads, the experts see the sum of the
ranks' tokens, and the round is the slowest rank's step without its experts plus the experts
priced once for that sum (``PerformanceModel.experts_time``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import simpy

from simulator.cluster.replica import ReplicaEngine
from simulator.engine.interface import SchedulerOutput
from simulator.records.performance import StepBatch

#: what a rank with nothing scheduled computes (vLLM's ``execute_dummy_batch``)
DUMMY_BATCH = StepBatch(decode_context=[1], decode_spec_tokens=[0])


def cudagraph_token_limit(max_num_seqs: int, num_speculative_tokens: int, max_num_batched_tokens: int) -> int:
    """The most tokens a step runs as a captured CUDA graph: vLLM's default largest capture size,
    ``min(max_num_seqs x (1 + drafts) x 2, 512)``, at most the token budget (``VllmConfig.
    _set_cudagraph_sizes``, vllm/config/vllm.py)."""
    return min(max_num_seqs * (1 + num_speculative_tokens) * 2, 512, max_num_batched_tokens)


@dataclass
class Round:
    """One lock-step: when it starts and ends, and each rank's step in it (None: a dummy batch)."""

    start_s: float
    end_s: float
    steps: list[SchedulerOutput | None]


class LockstepGroup:
    """Ranks stepping together on one clock."""

    def __init__(self, ranks: list[ReplicaEngine]):
        self.ranks = ranks
        self.env = ranks[0].env
        #: rounds scheduled ahead of the oldest one's end (the engine loop's steps in flight)
        self.depth = 2 if ranks[0].async_scheduling else 1
        self.dummy_s = [rank.perf.step_time(DUMMY_BATCH) for rank in ranks]
        config = ranks[0].config
        #: the largest step the ranks pad to each other's token count (a CUDA graph's)
        self.padded_limit = cudagraph_token_limit(config.max_num_seqs, config.speculative.num_speculative_tokens,
                                                  config.max_num_batched_tokens)
        self.dummy_steps = [0] * len(ranks)  # dummy batches each rank ran

    def start(self) -> simpy.Process:
        """Start the group's loop; it is every rank's loop (each notes when it ends)."""
        loop = self.env.process(self._run())
        for rank in self.ranks:
            rank.loop = loop
            loop.callbacks.append(lambda _event, rank=rank: setattr(rank, "end_s", self.env.now))
        return loop

    def _schedule(self, rank: ReplicaEngine, in_flight: bool) -> SchedulerOutput | None:
        """The rank's next step, as its own engine loop schedules it (None: nothing to run)."""
        sched = rank.scheduler
        while sched.has_requests():
            rank._before_schedule()
            out = sched.schedule()
            if out.has_work:
                return out
            if not out.preempted:
                return None
            # a step that only preempted: schedule again at once, as the engine loop does
            # (under async scheduling only with none of its steps in flight)
            rank._unlogged_preemptions += len(out.preempted)
            if in_flight and self.depth > 1:
                return None
        return None

    def _next_round(self, rounds: deque[Round]) -> Round | None:
        """Every rank's step for the round after those in flight; None if no rank has one."""
        start = rounds[-1].end_s if rounds else self.env.now
        steps = [self._schedule(rank, any(r.steps[i] is not None for r in rounds))
                 for i, rank in enumerate(self.ranks)]
        if all(out is None for out in steps):
            return None
        for i, out in enumerate(steps):
            if out is None:
                self.dummy_steps[i] += 1
        return Round(start, start + self._round_s(steps), steps)

    def _round_s(self, steps: list[SchedulerOutput | None]) -> float:
        """How long a round of these steps lasts (see the module's docstring)."""
        times = [rank._step_time(out) if out is not None else dummy
                 for rank, out, dummy in zip(self.ranks, steps, self.dummy_s, strict=True)]
        tokens = [(out.batch if out is not None else DUMMY_BATCH).num_tokens for out in steps]
        if max(tokens) <= self.padded_limit:
            return max(times)
        ranks = len(self.ranks)
        own = [t - rank.perf.experts_time(ranks * m) for rank, t, m in zip(self.ranks, times, tokens, strict=True)]
        return max(own) + self.ranks[0].perf.experts_time(sum(tokens))

    def _run(self):
        env = self.env
        rounds: deque[Round] = deque()
        while not any(rank._stop_requested for rank in self.ranks):
            if len(rounds) < self.depth:
                new = self._next_round(rounds)
                if new is not None:
                    rounds.append(new)
                    if len(rounds) < self.depth:
                        continue
            if not rounds:  # every rank idle: the wave ends until a request arrives
                wakes = [rank._wake for rank in self.ranks if rank._idle()]
                stalled = [rank for rank in self.ranks if rank.scheduler.has_requests()]
                if not wakes:
                    if stalled:
                        raise RuntimeError(f"replica {stalled[0].index}: scheduler stalled at t={env.now:.3f}s: "
                                           f"{stalled[0]._state()}")
                    return
                yield simpy.AnyOf(env, wakes)
                continue
            done = rounds.popleft()
            if done.end_s > env.now:
                yield self.env.timeout_at(done.end_s)
            for rank, out in zip(self.ranks, done.steps, strict=True):
                if out is not None:
                    rank._apply(out, done.start_s)
