"""Differential check: the native scheduler against vLLM's own, step for step.

A *decision* is what one engine step does: the requests scheduled, in vLLM's
order, with their token counts, and the requests preempted. Two ways to line
the two schedulers up:

- **lockstep** (the agreement rate we report and test): one driver feeds both
  schedulers the same arrivals at the same steps, on one clock. Each step both
  schedule, the step lasts what the PerformanceModel gives for vLLM's batch,
  and both then get their own outputs (one token per sampling request; draft
  acceptance drawn per request and output position, so equal states draw
  equally). A divergence then costs only the steps it touches instead of
  shifting every later arrival to another step.
- **free-running**: the workload runs through ``simulate`` once per scheduler
  and decisions are compared by step index. Exact as long as they agree; after
  the first divergence the timing differs and later steps rarely line up.

The driver follows Engine's loops (sync, and async with two steps in flight).
Steps where both schedulers decide nothing are not steps; a step where only one
schedules something counts as a divergence. A step that only preempts (a lone
request short of a block preempts itself) is a decision but takes no time.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, replace

from simulator.engine.loop import simulate
from simulator.engine.native import NativeScheduler, SchedulerOutput
from simulator.engine.request import SimRequest, Status
from simulator.engine.rules import admission_error, draft_tokens
from simulator.engine.shape_cache import ShapeCache
from simulator.records.engine_config import EngineConfig
from simulator.records.performance import PerformanceModel
from simulator.records.workload import Workload

SHOW_ENTRIES = 24


@dataclass(frozen=True)
class Decision:
    """One step's decisions: (request, tokens) in order, and preemptions in order."""

    step: int
    time_s: float
    scheduled: tuple[tuple[int, int], ...]
    preempted: tuple[int, ...]

    @classmethod
    def of(cls, out: SchedulerOutput | None, step: int, time_s: float) -> Decision:
        if out is None:
            return cls(step, time_s, (), ())
        return cls(step, time_s, tuple(out.num_scheduled.items()), tuple(out.preempted))

    def same_as(self, other: Decision) -> bool:
        return self.scheduled == other.scheduled and self.preempted == other.preempted

    def describe(self) -> str:
        """``N reqs, T tokens: rid:n ... | preempted: rid ...`` (long batches elided)."""
        items = self.scheduled
        shown = " ".join(f"{r}:{n}" for r, n in items[:SHOW_ENTRIES])
        if len(items) > SHOW_ENTRIES:
            shown += f" ... (+{len(items) - SHOW_ENTRIES})"
        total = sum(n for _, n in items)
        pre = " ".join(map(str, self.preempted)) or "-"
        return f"{len(items)} reqs, {total} tokens: {shown or '-'} | preempted: {pre}"


@dataclass(frozen=True)
class Divergence:
    """A step where the two schedulers decided differently."""

    index: int
    native: Decision
    vllm: Decision
    context: str = ""

    def differences(self) -> str:
        """The requests whose token counts differ, and order or preemption differences."""
        a, b = dict(self.native.scheduled), dict(self.vllm.scheduled)
        parts = []
        for rid in sorted(a.keys() | b.keys()):
            na, nb = a.get(rid), b.get(rid)
            if na != nb:
                parts.append(f"{rid}: native {na if na is not None else '-'}, "
                             f"vllm {nb if nb is not None else '-'}")
        if not parts and self.native.scheduled != self.vllm.scheduled:
            parts.append("same requests and counts, different order")
        if self.native.preempted != self.vllm.preempted:
            parts.append(f"preempted: native {list(self.native.preempted)}, "
                         f"vllm {list(self.vllm.preempted)}")
        return "; ".join(parts)

    def format(self) -> str:
        lines = [
            f"step {self.index} (t={self.vllm.time_s:.4f}s)",
            f"  native: {self.native.describe()}",
            f"  vllm:   {self.vllm.describe()}",
            f"  differs: {self.differences()}",
        ]
        if self.context:
            lines.append(f"  state after scheduling: {self.context}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Agreement:
    """How often the two schedulers made the same decision."""

    mode: str
    steps: int
    agreeing: int
    divergences: tuple[Divergence, ...]
    native_preemptions: int
    vllm_preemptions: int

    @property
    def rate(self) -> float:
        return self.agreeing / self.steps if self.steps else 1.0

    def format(self, max_divergences: int = 3) -> str:
        lines = [
            f"{self.mode}: {self.agreeing}/{self.steps} steps agree ({self.rate:.2%}); "
            f"preemptions native {self.native_preemptions}, vllm {self.vllm_preemptions}"
        ]
        shown = self.divergences[:max_divergences]
        if shown:
            lines.append(f"first {len(shown)} of {self.steps - self.agreeing} divergent steps:")
            lines.extend(d.format() for d in shown)
        return "\n".join(lines)


def _tally(mode: str, pairs, keep: int, contexts=None) -> Agreement:
    agreeing = 0
    divergences: list[Divergence] = []
    pre_a = pre_b = 0
    for index, (a, b) in enumerate(pairs):
        pre_a += len(a.preempted)
        pre_b += len(b.preempted)
        if a.same_as(b):
            agreeing += 1
        elif len(divergences) < keep:
            context = contexts.get(index, "") if contexts else ""
            divergences.append(Divergence(index, a, b, context))
    return Agreement(mode, len(pairs), agreeing, tuple(divergences), pre_a, pre_b)


# --- free-running --------------------------------------------------------------------
def free_running(
    workload: Workload,
    config: EngineConfig,
    perf: PerformanceModel,
    *,
    seed: int = 0,
    async_scheduling: bool | None = None,
    keep: int = 10,
) -> Agreement:
    """Simulate with each scheduler and compare decisions by step index."""
    runs, preemptions = {}, {}
    for name in ("native", "vllm"):
        result = simulate(workload, replace(config, scheduler=name), perf, seed=seed,
                          async_scheduling=async_scheduling, keep_decisions=True)
        ends = result.timeline["time_s"]
        runs[name] = [Decision.of(out, i, float(ends[i])) for i, out in enumerate(result.decisions)]
        # the Engine keeps executed steps only; count preemptions from the requests
        preemptions[name] = int(result.summary.preemptions)
    a, b = runs["native"], runs["vllm"]
    empty = Decision(-1, float("nan"), (), ())
    pairs = [(a[i] if i < len(a) else empty, b[i] if i < len(b) else empty)
             for i in range(max(len(a), len(b)))]
    return replace(_tally("free-running", pairs, keep), native_preemptions=preemptions["native"],
                   vllm_preemptions=preemptions["vllm"])


# --- lockstep ------------------------------------------------------------------------
def _draw(seed: int, rid: int, position: int, salt: int) -> float:
    """A uniform draw that depends only on the request and its output position."""
    return random.Random((seed * 1_000_003 + rid) * 1_000_033 + position * 8 + salt).random()


class _Side:
    """One scheduler under the lockstep driver."""

    def __init__(self, scheduler, config: EngineConfig, seed: int):
        self.scheduler = scheduler
        self.config = config
        self.seed = seed

    def sampled(self, out: SchedulerOutput) -> dict[int, int]:
        """1 + accepted drafts per sampling request (acceptance keyed by position)."""
        spec = self.config.speculative
        if not out.spec_tokens:
            return dict.fromkeys(out.sampling, 1)
        requests = self.scheduler.requests
        sampled = {}
        for rid in out.sampling:
            accepted = 0
            base = requests[rid].num_output
            for pos in range(out.spec_tokens.get(rid, 0)):
                if _draw(self.seed, rid, base + pos, 1) >= spec.rate_at(pos):
                    break
                accepted += 1
            sampled[rid] = 1 + accepted
        return sampled

    def apply(self, out: SchedulerOutput | None, now: float) -> int:
        """Apply a step's output; return how many requests finished."""
        if out is None or not out.num_scheduled:
            return 0
        self.scheduler.kv.clock = now
        finished = len(self.scheduler.update_from_output(out, self.sampled(out), now))
        spec = self.config.speculative
        if not spec.enabled:
            return finished
        requests = self.scheduler.requests
        for rid in sorted(out.sampling):
            req = requests[rid]
            if req.status != Status.RUNNING:
                continue
            req.spec_tokens = draft_tokens(
                req, spec.num_speculative_tokens, self.config.max_model_len,
                lambda rid=rid, req=req: _draw(self.seed, rid, req.num_output, 0) < spec.proposal_rate)
        return finished


def _differing(a: Decision, b: Decision) -> set[int]:
    """Requests scheduled differently (or preempted) in a divergent step."""
    sa, sb = dict(a.scheduled), dict(b.scheduled)
    return {r for r in sa.keys() | sb.keys() if sa.get(r) != sb.get(r)} | set(a.preempted)


class _Lockstep:
    """Both schedulers on one clock: same arrivals, steps paced by vLLM's batches."""

    def __init__(self, workload: Workload, config: EngineConfig, perf: PerformanceModel,
                 seed: int, async_scheduling: bool, keep: int, progress: bool = False):
        from tqdm import tqdm

        from simulator.engine.vllm_oracle import VllmScheduler

        self.workload = workload
        self.config = config
        self.perf = perf
        self.async_scheduling = async_scheduling
        self.keep = keep
        self.kv = perf.kv_capacity(config.block_size, config.gpu_memory_utilization,
                                   config.num_gpu_blocks_override)
        self.native = NativeScheduler(config, self.kv.num_blocks, async_scheduling=async_scheduling)
        self.reference = VllmScheduler(config, self.kv.num_blocks, async_scheduling=async_scheduling)
        self.sides = (_Side(self.native, config, seed), _Side(self.reference, config, seed))
        self.arrival = workload.arrival_s.tolist()
        cost = getattr(perf, "shape_cache", None)  # step times as the engine takes them (Engine._step_time)
        self.shapes = ShapeCache(cost, warm=[config.max_num_batched_tokens]) if cost is not None else None
        self.next_arrival = 0
        self.now = 0.0
        self.pairs: list[tuple[Decision, Decision] | None] = []
        self.contexts: dict[int, str] = {}
        self.bar = tqdm(total=len(workload), unit="req", desc="lockstep", disable=not progress,
                        leave=False, mininterval=0.5)

    # --- the two schedulers together ---------------------------------------------------
    def has_requests(self) -> bool:
        return self.native.has_requests() or self.reference.has_requests()

    def admit_arrivals(self) -> None:
        """Give both schedulers every request that has arrived (Engine's admission check)."""
        w, config = self.workload, self.config
        while self.next_arrival < len(self.arrival) and self.arrival[self.next_arrival] <= self.now:
            rid = self.next_arrival
            self.next_arrival += 1
            prompt, output = int(w.prompt_tokens[rid]), int(w.output_tokens[rid])
            if admission_error(prompt, output, config, self.kv):
                self.bar.update(1)
                continue
            for side in self.sides:
                side.scheduler.add_request(SimRequest.from_workload(w, rid, self.arrival[rid], config.block_size))

    def schedule(self):
        """Both schedule; None when neither decided anything, else (native, vllm, index)."""
        outs = []
        for side in self.sides:
            side.scheduler.kv.clock = self.now
            out = side.scheduler.schedule() if side.scheduler.has_requests() else None
            decided = out is not None and (out.num_scheduled or out.preempted)
            outs.append(out if decided else None)
        a, b = outs
        if a is None and b is None:
            return None
        index = len(self.pairs)
        da, db = Decision.of(a, index, self.now), Decision.of(b, index, self.now)
        if len(self.contexts) < self.keep and not da.same_as(db):
            self.contexts[index] = self._state(_differing(da, db))
        self.pairs.append(None)  # filled in when the step completes
        return a, b, index

    @staticmethod
    def runs_model(entry) -> bool:
        """False for a step that only preempted (no tokens on either side)."""
        a, b, _ = entry
        return any(out is not None and out.num_scheduled for out in (a, b))

    def step_time(self, entry) -> float:
        a, b, _ = entry
        batch = (b if b is not None and b.num_scheduled else a).batch
        return self.perf.step_time(batch) + (self.shapes.charge(batch) if self.shapes is not None else 0.0)

    def complete(self, entry) -> None:
        a, b, index = entry
        self.sides[0].apply(a, self.now)
        self.bar.update(self.sides[1].apply(b, self.now))
        self.pairs[index] = (Decision.of(a, index, self.now), Decision.of(b, index, self.now))

    def wait_for_arrival(self) -> bool:
        """Move the clock to the next arrival; False when none is left."""
        if self.next_arrival >= len(self.arrival):
            if self.has_requests():
                raise RuntimeError(f"lockstep stalled at t={self.now:.3f}s")
            return False
        self.now = max(self.now, self.arrival[self.next_arrival])
        return True

    def _state(self, rids) -> str:
        parts = []
        for rid in sorted(rids)[:4]:
            a, b = self.native.requests.get(rid), self.reference.requests.get(rid)
            if a is None or b is None:
                continue
            parts.append(
                f"{rid}: native computed={a.num_computed} out={a.num_output} {a.status.name} "
                f"preempted={a.num_preemptions}, vllm computed={b.num_computed} out={b.num_output} "
                f"{b.status.name} preempted={b.num_preemptions}"
            )
        return "; ".join(parts)

    # --- Engine's loops ------------------------------------------------------------------
    def run(self) -> Agreement:
        try:
            if self.async_scheduling:
                self._run_async()
            else:
                self._run_sync()
        finally:
            self.bar.close()
        return _tally("lockstep", self.pairs, self.keep, self.contexts)

    def _run_sync(self) -> None:
        while True:
            self.admit_arrivals()
            entry = self.schedule() if self.has_requests() else None
            if entry is None:
                if not self.wait_for_arrival():
                    return
                continue
            if self.runs_model(entry):
                self.now += self.step_time(entry)
            self.complete(entry)  # a step that only preempted takes no time (Engine: same)

    def _run_async(self) -> None:
        """Two steps in flight: the next is scheduled before the last one's output is applied."""
        in_flight: deque = deque()
        while True:
            self.admit_arrivals()
            only_preempted = False
            if self.has_requests():
                entry = self.schedule()
                if entry is not None and self.runs_model(entry):
                    start = in_flight[-1][1] if in_flight else self.now
                    in_flight.append((entry, start + self.step_time(entry)))
                    if len(in_flight) < 2:
                        continue
                elif entry is not None:
                    self.complete(entry)
                    only_preempted = True
            if not in_flight:
                if only_preempted:
                    continue
                if not self.wait_for_arrival():
                    return
                continue
            entry, end = in_flight.popleft()
            self.now = max(self.now, end)
            self.complete(entry)


def lockstep(
    workload: Workload,
    config: EngineConfig,
    perf: PerformanceModel,
    *,
    seed: int = 0,
    async_scheduling: bool | None = None,
    keep: int = 10,
    progress: bool = False,
) -> Agreement:
    """Drive both schedulers on one clock with the same arrivals; compare every step."""
    if async_scheduling is None:
        async_scheduling = config.async_scheduling
    if async_scheduling is None:
        spec = config.speculative
        async_scheduling = not (spec.enabled and spec.method == "ngram")
    return _Lockstep(workload, config, perf, seed, async_scheduling, keep, progress).run()


def compare(
    workload: Workload,
    config: EngineConfig,
    perf: PerformanceModel,
    *,
    seed: int = 0,
    async_scheduling: bool | None = None,
    keep: int = 10,
    free: bool = True,
    progress: bool = False,
) -> list[Agreement]:
    """Lockstep agreement, and free-running agreement when ``free``."""
    out = [lockstep(workload, config, perf, seed=seed, async_scheduling=async_scheduling, keep=keep,
                    progress=progress)]
    if free:
        out.append(free_running(workload, config, perf, seed=seed,
                                async_scheduling=async_scheduling, keep=keep))
    return out
