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
Steps where both schedulers schedule nothing are not steps; a step where only
one schedules something counts as a divergence.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, replace

from simulator.engine import admission_error, simulate
from simulator.engine_config import EngineConfig
from simulator.performance import PerformanceModel
from simulator.request import SimRequest, Status
from simulator.scheduler import NativeScheduler, SchedulerOutput
from simulator.workload import Workload

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
    runs = {}
    for name in ("native", "vllm"):
        result = simulate(workload, replace(config, scheduler=name), perf, seed=seed,
                          async_scheduling=async_scheduling, keep_decisions=True)
        ends = result.timeline["time_s"]
        runs[name] = [Decision.of(out, i, float(ends[i])) for i, out in enumerate(result.decisions)]
    a, b = runs["native"], runs["vllm"]
    empty = Decision(-1, float("nan"), (), ())
    pairs = [(a[i] if i < len(a) else empty, b[i] if i < len(b) else empty)
             for i in range(max(len(a), len(b)))]
    return _tally("free-running", pairs, keep)


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

    def apply(self, out: SchedulerOutput | None, now: float) -> None:
        if out is None or not out.num_scheduled:
            return
        self.scheduler.kv.clock = now
        self.scheduler.update_from_output(out, self.sampled(out), now)
        spec = self.config.speculative
        if not spec.enabled:
            return
        requests = self.scheduler.requests
        for rid in sorted(out.sampling):
            req = requests[rid]
            if req.status != Status.RUNNING:
                continue
            room = self.config.max_model_len - req.num_tokens - 1
            proposes = _draw(self.seed, rid, req.num_output, 0) < spec.proposal_rate
            req.spec_tokens = min(spec.num_speculative_tokens, room) if room > 0 and proposes else 0


def _state(native: NativeScheduler, vllm_side, rids) -> str:
    parts = []
    for rid in sorted(rids)[:4]:
        a = native.requests.get(rid)
        b = vllm_side.requests.get(rid)
        if a is None or b is None:
            continue
        parts.append(
            f"{rid}: native computed={a.num_computed} out={a.num_output} {a.status.name} "
            f"preempted={a.num_preemptions}, vllm computed={b.num_computed} out={b.num_output} "
            f"{b.status.name} preempted={b.num_preemptions}"
        )
    return "; ".join(parts)


def lockstep(
    workload: Workload,
    config: EngineConfig,
    perf: PerformanceModel,
    *,
    seed: int = 0,
    async_scheduling: bool | None = None,
    keep: int = 10,
) -> Agreement:
    """Drive both schedulers on one clock with the same arrivals; compare every step."""
    from simulator.vllm_scheduler import VllmScheduler

    if async_scheduling is None:
        spec = config.speculative
        async_scheduling = not (spec.enabled and spec.method == "ngram")
    kv = perf.kv_capacity(config.block_size, config.gpu_memory_utilization,
                          config.num_gpu_blocks_override)
    native = NativeScheduler(config, kv.num_blocks, async_scheduling=async_scheduling)
    reference = VllmScheduler(config, kv.num_blocks, async_scheduling=async_scheduling)
    sides = (_Side(native, config, seed), _Side(reference, config, seed))

    arrival = workload.arrival_s.tolist()
    columns = (workload.prompt_tokens.tolist(), workload.output_tokens.tolist(),
               workload.reasoning_tokens.tolist(), workload.prefix_group.tolist(),
               workload.prefix_tokens.tolist())
    next_arrival = 0
    now = 0.0

    def admit_arrivals() -> None:
        nonlocal next_arrival
        while next_arrival < len(arrival) and arrival[next_arrival] <= now:
            rid = next_arrival
            next_arrival += 1
            prompt, output, reasoning, group, prefix = (c[rid] for c in columns)
            if admission_error(prompt, output, config, kv):
                continue
            for side in sides:
                side.scheduler.add_request(SimRequest(rid, arrival[rid], prompt, output, reasoning,
                                                      group, prefix, config.block_size))

    def has_requests() -> bool:
        return native.has_requests() or reference.has_requests()

    pairs: list[tuple[Decision, Decision]] = []
    contexts: dict[int, str] = {}

    def schedule_both():
        for side in sides:
            side.scheduler.kv.clock = now
        a = native.schedule() if native.has_requests() else None
        b = reference.schedule() if reference.has_requests() else None
        a = a if a is not None and a.num_scheduled else None
        b = b if b is not None and b.num_scheduled else None
        if a is None and b is None:
            return None
        if len(contexts) < keep:
            da, db = Decision.of(a, 0, 0.0), Decision.of(b, 0, 0.0)
            if not da.same_as(db):
                rids = dict(da.scheduled).keys() ^ dict(db.scheduled).keys() or {
                    r for r, n in da.scheduled if dict(db.scheduled).get(r) != n}
                contexts[len(pairs)] = _state(native, reference, rids | set(da.preempted))
        pairs.append((None, None))  # placeholder, filled in when the step completes
        return a, b, len(pairs) - 1

    def step_time(a, b) -> float:
        return perf.step_time((b if b is not None else a).batch)

    def complete(entry, start: float) -> None:
        a, b, index = entry
        sides[0].apply(a, now)
        sides[1].apply(b, now)
        pairs[index] = (Decision.of(a, index, now), Decision.of(b, index, now))

    in_flight: deque = deque()
    while True:
        admit_arrivals()
        if async_scheduling:
            if has_requests():
                entry = schedule_both()
                if entry is not None:
                    start = in_flight[-1][2] if in_flight else now
                    in_flight.append((entry, start, start + step_time(entry[0], entry[1])))
                    if len(in_flight) < 2:
                        continue
            if not in_flight:
                if next_arrival >= len(arrival):
                    if has_requests():
                        raise RuntimeError(f"lockstep stalled at t={now:.3f}s")
                    break
                now = max(now, arrival[next_arrival])
                continue
            entry, start, end = in_flight.popleft()
            now = max(now, end)
            complete(entry, start)
        else:
            entry = schedule_both() if has_requests() else None
            if entry is None:
                if next_arrival >= len(arrival):
                    if has_requests():
                        raise RuntimeError(f"lockstep stalled at t={now:.3f}s")
                    break
                now = max(now, arrival[next_arrival])
                continue
            start = now
            now += step_time(entry[0], entry[1])
            complete(entry, start)
    return _tally("lockstep", pairs, keep, contexts)


def compare(
    workload: Workload,
    config: EngineConfig,
    perf: PerformanceModel,
    *,
    seed: int = 0,
    async_scheduling: bool | None = None,
    keep: int = 10,
    free: bool = True,
) -> list[Agreement]:
    """Lockstep agreement, and free-running agreement when ``free``."""
    out = [lockstep(workload, config, perf, seed=seed, async_scheduling=async_scheduling, keep=keep)]
    if free:
        out.append(free_running(workload, config, perf, seed=seed,
                                async_scheduling=async_scheduling, keep=keep))
    return out
