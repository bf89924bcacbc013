"""One vLLM V1 engine replica as a SimPy process.

Arrivals enter the scheduler's queue at their arrival time. The engine loop
schedules a step, holds the clock for the step time the PerformanceModel gives
for that batch, then applies the step's output. Under async scheduling (vLLM's
default) it keeps two steps in flight, as vLLM's EngineCore batch queue does:
step k+1 is scheduled before step k's output is applied.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import random
import signal
import threading
from collections import deque
from collections.abc import Callable
from operator import attrgetter

import numpy as np
import simpy

from simulator.engine import compiled as compiled_engine
from simulator.engine import fast_forward
from simulator.engine.interface import Advance, InFlight, Scheduler, SchedulerOutput, StepScheduler
from simulator.engine.native import NativeScheduler
from simulator.engine.request import SimRequest, Status
from simulator.engine.rules import admission_error, draft_tokens
from simulator.engine.run_log import EngineRun, StepLog
from simulator.engine.shape_cache import ShapeCache
from simulator.engine.steady import SteadyScheduler
from simulator.engine.tabulate import SimulatedRun, tabulate
from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError
from simulator.records.performance import KVCapacity, PerformanceModel
from simulator.records.workload import Workload


class ExactEnvironment(simpy.Environment):
    """SimPy's environment, with events keyed at a time itself rather than ``now + delay``
    (``timeout_at``, ``call_at``). The one place that reaches into SimPy 4's internals (its event
    queue and ids; pyproject pins simpy<5)."""

    def timeout_at(self, t: float) -> simpy.Timeout:
        """A timeout that brings the clock from ``now`` to exactly ``t`` (``t >= now``):
        ``now + (t - now)`` can round an ulp off ``t`` whatever the delay, and by how much hangs on
        ``now``, so the clock after a wait would depend on when the wait was set (a run cut at
        another step, an arrival routed ahead). (As ``timeout``, but keyed at ``t``.)"""
        if t < self.now:
            raise ValueError(f"a timeout to {t} from {self.now}")
        event = simpy.Timeout.__new__(simpy.Timeout)  # (Timeout.__init__ schedules at now + delay)
        event.env, event.callbacks, event._value, event._delay, event._ok = self, [], None, t - self.now, True
        self._schedule_at(event, simpy.core.NORMAL, t)
        return event

    def call_at(self, t: float, callback: Callable[[simpy.Event], None]) -> None:
        """Call ``callback`` when the clock reaches ``t`` (now if ``t`` has passed), before the
        other events of that time (SimPy's urgent priority)."""
        event = simpy.Event(self)
        event._ok = True  # (as simpy.Timeout does; Timeout itself has no priority)
        event._value = None
        event.callbacks.append(callback)
        self._schedule_at(event, simpy.core.URGENT, max(t, self.now))

    def move_wait(self, process: simpy.Process, timeout: simpy.Timeout, t: float) -> simpy.Timeout:
        """``process``, waiting for ``timeout``, resumes at ``t`` instead (``now <= t``), as if it
        had waited for ``timeout_at(t)``; ``timeout`` still ends, waking nobody. Returns the new
        wait."""
        timeout.callbacks.remove(process._resume)
        event = ExactEnvironment.timeout_at(self, t)
        event.callbacks.append(process._resume)
        process._target = event
        return event

    def _schedule_at(self, event: simpy.Event, priority: int, t: float) -> None:
        """``schedule`` for the time ``t`` itself rather than ``now + delay``."""
        heapq.heappush(self._queue, (t, priority, next(self._eid), event))


def _hybrid(kv: KVCapacity) -> bool:
    """Whether the KV cache has sliding-window groups (simulator.engine.kv_layout)."""
    groups = getattr(kv, "groups", None)
    return groups is not None and groups.hybrid


class Engine:
    """Drives a scheduler through SimPy time with step times from a PerformanceModel."""

    def __init__(
        self,
        workload: Workload,
        config: EngineConfig,
        perf: PerformanceModel,
        kv: KVCapacity,
        *,
        seed: int = 0,
        async_scheduling: bool | None = None,
        scheduler_factory: Callable[..., object] | None = None,
        keep_decisions: bool = False,
        on_progress: Callable[[int], None] | None = None,
        fast: bool = True,
        env: ExactEnvironment | None = None,
        compiled: bool | str = False,
    ):
        self.workload = workload
        self.config = config
        self.perf = perf
        self.kv_capacity = kv
        if async_scheduling is None:
            async_scheduling = config.async_scheduling
        if async_scheduling is None:
            # vLLM turns async scheduling off for n-gram speculative decoding
            async_scheduling = not (config.speculative.enabled and config.speculative.method == "ngram")
        self.async_scheduling = async_scheduling
        probe = perf.decode_times(1, np.ones(1))
        #: the performance model, where it times decode runs in closed form (else None)
        self._decode_model = perf if probe is not None else None
        #: the fast path was asked for (``fast``: where it applies)
        self.fast_requested = bool(fast and not keep_decisions)
        self.fast = bool(fast and self._decode_model is not None and not keep_decisions
                         and scheduler_factory in (None, NativeScheduler)
                         and not getattr(workload, "has_timeouts", False)  # aborts: step by step
                         and not _hybrid(kv))  # sliding-window KV groups: step by step
        factory = scheduler_factory or NativeScheduler
        if self.fast and not config.speculative.enabled:
            factory = SteadyScheduler  # same decisions, with steady decoders kept lazily
        if _hybrid(kv) and not (isinstance(factory, type) and issubclass(factory, NativeScheduler)):
            raise ConfigError("engine.scheduler", "native (sliding-window models: the hybrid KV allocator "
                                                  f"is modelled in the native scheduler only), got {config.scheduler}")
        self.rng = random.Random(seed)
        self.env = env if env is not None else ExactEnvironment()  # a cluster shares one
        self.steps = StepLog()
        self.requests: list[SimRequest] = []
        self.decisions: list[SchedulerOutput] | None = [] if keep_decisions else None
        self.on_progress = on_progress
        cost = getattr(perf, "shape_cache", None)
        #: the token counts the engine's kernels are set up for (vLLM's CPU engine), or None
        self.shapes = ShapeCache(cost, warm=[config.max_num_batched_tokens]) if cost is not None else None
        #: the compiled scheduler was asked for (True, or "auto": where it pays) and, if asked with
        #: True and not taken, why not (simulator.engine.compiled)
        self.compiled = compiled
        self.not_compiled = ""
        if self._compiles(factory):
            self.scheduler: Scheduler = compiled_engine.CompiledScheduler(
                config, kv, workload, perf, async_scheduling=async_scheduling,
                finish_every=max(len(workload) // 100, 1) if on_progress is not None else 0)
            if on_progress is not None:
                compiled_engine.say_if_cold()
        else:
            self.scheduler = factory(config, kv.num_blocks, async_scheduling=async_scheduling)
        if _hybrid(kv):  # full-attention and sliding-window KV groups in one pool
            from simulator.engine.kv_layout import HybridKVCacheManager

            self.scheduler.kv = HybridKVCacheManager(kv.num_blocks, config.block_size,
                                                     config.enable_prefix_caching, kv.groups)
        self._pace = 0.0  # the latest step's duration
        self._next_arrival = 0  # the first arrival neither queued nor admitted by a run
        self._arrival_s = workload.arrival_s.tolist()
        if isinstance(self.scheduler, SteadyScheduler):
            self.scheduler.use_runs(fast_forward.Runs(self.scheduler, self._decode_model,
                                                      self._arrivals_columns(), async_scheduling))
        self._wake: simpy.Event | None = None
        self._arrivals_done = False
        self._finished = 0
        self._stop_requested = False
        # preemptions of schedule() calls that scheduled nothing: no step of theirs is
        # logged, so the next logged step counts them
        self._unlogged_preemptions = 0
        self._deadlines: list[tuple[float, int]] = []  # (arrival + client timeout, rid), a heap
        self.interrupted = False

    def _compiles(self, factory: Callable[..., object]) -> bool:
        """Whether the compiled scheduler takes the run of a scheduler ``factory`` would make
        otherwise: asked for (``compiled``; "auto": where it pays) and able to; if asked with True
        and not able to, ``not_compiled`` says why."""
        if not (self.compiled and compiled_engine.wanted(self, self.compiled)):
            return False
        reason = compiled_engine.why_not(self, factory)
        if reason and self.compiled is True:
            self.not_compiled = reason
        return not reason

    @property
    def took_compiled(self) -> bool:
        """Whether the compiled scheduler runs the steps."""
        return isinstance(self.scheduler, compiled_engine.CompiledScheduler)

    def _arrivals_columns(self) -> fast_forward.Arrivals:
        """The arrivals as the fast path reads them (too_long: rejected at arrival)."""
        w, config, kv = self.workload, self.config, self.kv_capacity
        too_long = w.prompt_tokens + w.output_tokens > min(
            config.max_model_len, (kv.num_blocks - 1) * kv.block_size)
        shared = np.where(w.prefix_group >= 0, w.prefix_tokens, 0) // config.block_size
        return fast_forward.Arrivals(time_s=w.arrival_s, queued=~too_long, prompt=w.prompt_tokens,
                                     max_tokens=w.output_tokens, private=shared == 0,
                                     admit=self.shapes is None)

    def request_stop(self) -> None:
        """Stop at the next step boundary (e.g. on Ctrl-C); ``run`` then returns what was simulated."""
        self._stop_requested = True

    # --- processes --------------------------------------------------------------
    def _arrivals(self):
        arrival = self._arrival_s
        env = self.env
        for rid in range(len(arrival)):
            if rid < self._next_arrival:
                continue  # a run admitted it: it comes through _arrive
            if arrival[rid] > env.now:
                yield env.timeout_at(float(arrival[rid]))
                if rid < self._next_arrival:
                    continue  # admitted by a run planned meanwhile
            self._next_arrival = rid + 1
            req = self._new_request(rid)
            if req.status == Status.REJECTED:
                continue
            self.scheduler.add_request(req)
            if self._wake is not None and not self._wake.triggered:
                self._wake.succeed()
        self._arrivals_done = True
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def _new_request(self, rid: int) -> SimRequest:
        """Request ``rid`` at its arrival: rejected if it can never run, else still to queue."""
        w = self.workload
        req = SimRequest.from_workload(w, rid, self._arrival_s[rid], self.config.block_size)
        self._enter(req, req.arrival_s + float(w.timeout_s[rid]))
        return req

    def _enter(self, req: SimRequest, deadline_s: float) -> bool:
        """A request arrives: rejected (True) if it can never run, else its client's deadline
        kept (``_abort_due``; inf: none)."""
        self.requests.append(req)
        reason = admission_error(req.num_prompt, req.max_tokens, self.config, self.kv_capacity)
        if reason:
            req.status = Status.REJECTED
            req.reject_reason = reason
            req.finish_s = req.arrival_s
            self._count_finished(1)
            return True
        if math.isfinite(deadline_s):
            heapq.heappush(self._deadlines, (deadline_s, req.rid))
        return False

    def _idle(self):
        """Wait for the next arrival; False when none will come."""
        if self._arrivals_done:
            return False
        self._wake = self.env.event()
        return True

    def _run_sync(self):
        env, sched = self.env, self.scheduler
        while not self._stop_requested:
            if not sched.has_requests():
                if not self._idle():
                    return
                yield self._wake
                continue
            if self.fast:
                adv = sched.advance(env.now, self._pace, self._next_arrival)
                if adv is not None:
                    admitted = self._after_run(adv)
                    self._log_run(adv)
                    yield self.env.timeout_at(adv.end_s)
                    self._arrive(admitted)
                    continue
            self._before_schedule()
            out = sched.schedule()
            if not out.has_work:
                if out.preempted:
                    # a step that only preempted (a lone request short of a block preempts
                    # itself): like vLLM's engine, schedule again at once
                    self._unlogged_preemptions += len(out.preempted)
                    continue
                if not sched.has_requests():
                    continue  # the requests left were all aborted (client timeouts): idle or end
                if not self._idle():
                    raise RuntimeError(f"scheduler stalled at t={env.now:.3f}s: {self._state()}")
                yield self._wake
                continue
            start = env.now
            yield env.timeout(self._step_time(out))
            self._apply(out, start)

    def _run_async(self):
        env, sched = self.env, self.scheduler
        in_flight: deque[tuple[SchedulerOutput, float, float]] = deque()
        while not self._stop_requested:
            if self.fast and len(in_flight) == 1 and sched.has_requests():
                adv = sched.advance(env.now, self._pace, self._next_arrival, InFlight(*in_flight[0]))
                if adv is not None:
                    admitted = self._after_run(adv)
                    if not adv.admits:
                        self._log_run(adv)
                    yield self.env.timeout_at(adv.end_s)
                    self._arrive(admitted)
                    # the step left in flight decodes every running request, the run's arrivals
                    # among them, and may admit from the queue (then its time is its own)
                    used = sched.kv.num_used_blocks
                    out = sched.decode_step(adv.in_flight_preempted, admit=adv.admits)
                    joined = len(out.new) + len(out.resumed)
                    if joined:  # their blocks are taken before the run's last row is applied
                        adv.kv_blocks_used[-1] += sched.kv.num_used_blocks - used
                    if adv.admits:  # (logged now: the admissions change its last row)
                        self._log_run(adv, joined)
                    start, end = adv.in_flight_s
                    if joined:
                        end = start + self._step_time(out)
                    in_flight[0] = (out, start, end)
                    continue
            only_preempted = False
            if sched.has_requests():
                self._before_schedule()
                out = sched.schedule()
                if out.has_work:
                    start = in_flight[-1][2] if in_flight else env.now
                    in_flight.append((out, start, start + self._step_time(out)))
                    if len(in_flight) < 2:
                        continue
                only_preempted = bool(out.preempted) and not out.has_work
                if only_preempted:
                    self._unlogged_preemptions += len(out.preempted)
            if not in_flight:
                if only_preempted:
                    continue  # as in the sync loop: vLLM's engine schedules again at once
                if not sched.has_requests() and self._arrivals_done:
                    return
                if not self._idle():
                    raise RuntimeError(f"scheduler stalled at t={env.now:.3f}s: {self._state()}")
                yield self._wake
                continue
            out, start, end = in_flight.popleft()
            if end > env.now:
                yield self.env.timeout_at(end)
            self._apply(out, start)

    def _run_in_runs(self):
        """The loop of a scheduler that covers every step with ``advance`` (the compiled one: it
        takes its arrivals from the workload's columns and keeps its step in flight to itself):
        each run logged, the clock brought to its end, the arrivals it took in made."""
        env, sched = self.env, self.scheduler
        while not self._stop_requested:
            adv = sched.advance(env.now, self._pace, self._next_arrival)
            if adv is None:
                return
            admitted = self._after_run(adv)
            self._log_run(adv)
            yield env.timeout_at(adv.end_s)
            self._arrive(admitted)

    # --- step times and the fast path --------------------------------------------------
    def _step_time(self, out: SchedulerOutput) -> float:
        """The duration of a step about to run (called once per executed step, in order)."""
        self._pace = self.perf.step_time(out.batch)
        if self.shapes is not None:
            self._pace += self.shapes.charge(out.batch)
        return self._pace

    def _after_run(self, adv: Advance) -> range:
        """Count a run's finished requests; return the arrivals it admitted (and those rejected
        among them), which come during the run: they are made when it is over (``_arrive``);
        the arrival process skips them. (The run's steps are logged by ``_log_run``.)"""
        admitted = range(self._next_arrival, max(adv.next_arrival, self._next_arrival))
        self._next_arrival = admitted.stop
        self._pace = adv.last_step_s
        if adv.finished:
            self._count_finished(len(adv.finished))
        return admitted

    def _log_run(self, adv: Advance, joined: int = 0) -> None:
        """Log a run's steps; ``joined`` requests left the queue for the step it left in flight
        (scheduled before the output of its last row)."""
        if adv.columns is not None:
            if adv.k:
                self.steps.add_columns(*adv.columns)
            return
        preempted = dict(adv.preempted)
        unlogged = self._take_unlogged_preemptions()
        if unlogged:
            preempted[0] = preempted.get(0, 0) + unlogged
        segments, waiting_changes = adv.segments, adv.waiting_changes
        if joined:
            row = adv.k - 1
            waiting_changes[row] = waiting_changes.get(row, 0) - joined
            segments = _with_running(segments, row, joined)
        self.steps.add_run(adv.k, adv.starts, adv.token_times, adv.kv_blocks_used, segments,
                           adv.waiting, waiting_changes, preempted)

    def _arrive(self, rids: range) -> None:
        """Arrivals that came during a run, made at its end (never ahead of SimPy's clock); the
        scheduler gives those the run admitted what it did to them."""
        for rid in rids:
            req = self._new_request(rid)
            if req.status != Status.REJECTED:
                self.scheduler.add_request(req)

    # --- step bookkeeping ---------------------------------------------------------
    def _before_schedule(self) -> None:
        self.scheduler.kv.clock = self.env.now
        if self._deadlines:
            self._abort_due()

    def _abort_due(self) -> None:
        """Abort the requests whose client timed out by now (vLLM takes aborts between steps):
        they leave the scheduler, their blocks are freed, their status is ``aborted``."""
        now, due = self.env.now, []
        while self._deadlines and self._deadlines[0][0] <= now:
            due.append(heapq.heappop(self._deadlines)[1])
        aborted = self.scheduler.finish_requests(due, now) if due else []
        for req in aborted:
            req.status = Status.ABORTED
        if aborted:
            self._count_finished(len(aborted))

    def _apply(self, out: SchedulerOutput, start: float) -> None:
        now = self.env.now
        sched = self.scheduler
        sched.kv.clock = now
        sampled = self._sample(out)
        finished = sched.update_from_output(out, sampled, now)
        self._propose_drafts(out)
        batch = out.batch
        self.steps.add_step(
            start, now, sched.kv.num_used_blocks, sched.num_running, sched.num_waiting,
            sum(batch.prefill_tokens), len(batch.decode_context) + sum(batch.decode_spec_tokens),
            len(out.num_scheduled) + out.num_steady,
            len(out.preempted) + self._take_unlogged_preemptions(),
        )
        if self.decisions is not None:
            self.decisions.append(out)
        if finished:
            self._count_finished(len(finished))

    def _sample(self, out: SchedulerOutput) -> dict[int, int]:
        """Tokens each sampling request produces: 1 plus accepted draft tokens."""
        spec = self.config.speculative
        if not out.spec_tokens:
            return dict.fromkeys(out.sampling, 1)
        sampled = {}
        rand = self.rng.random
        for rid in out.sampling:
            accepted = 0
            for pos in range(out.spec_tokens.get(rid, 0)):
                if rand() >= spec.rate_at(pos):
                    break
                accepted += 1
            sampled[rid] = 1 + accepted
        return sampled

    def _propose_drafts(self, out: SchedulerOutput) -> None:
        """The drafter proposes draft tokens for the next step (n-gram may find none)."""
        spec = self.config.speculative
        if not spec.enabled:
            return
        k, max_model_len = spec.num_speculative_tokens, self.config.max_model_len
        rand = self.rng.random
        requests = self.scheduler.requests
        for rid in sorted(out.sampling):
            req = requests[rid]
            if req.status != Status.RUNNING:
                continue
            req.spec_tokens = draft_tokens(req, k, max_model_len, lambda: rand() < spec.proposal_rate)

    def _take_unlogged_preemptions(self) -> int:
        n, self._unlogged_preemptions = self._unlogged_preemptions, 0
        return n

    def _count_finished(self, n: int) -> None:
        self._finished += n
        if self.on_progress is not None:
            self.on_progress(n)

    def _state(self) -> str:
        s = self.scheduler
        return f"running={s.num_running} waiting={s.num_waiting} free_blocks={s.kv.num_free_blocks}"

    # --- entry point ----------------------------------------------------------------
    def run(self) -> EngineRun:
        loop = self.start()
        self.env.run(until=loop)  # the loop ends when every request has, or on request_stop
        return self.collect()

    def start(self, arrivals: bool = True) -> simpy.Process:
        """Start the engine loop (and, unless a cluster delivers them, the arrivals); return the loop."""
        env = self.env
        if not isinstance(self.scheduler, StepScheduler):  # (it covers every step: the compiled one)
            return env.process(self._run_in_runs())
        if arrivals:
            env.process(self._arrivals())
        return env.process(self._run_async() if self.async_scheduling else self._run_sync())

    def collect(self) -> EngineRun:
        """What the run produced, once its loop has ended."""
        env = self.env
        self.interrupted = self._stop_requested
        self.scheduler.materialize()
        self.requests.sort(key=attrgetter("rid"))  # (a run's arrivals and the next may come at one time)
        unfinished = [r for r in self.requests if r.status < Status.FINISHED]
        if unfinished and not self.interrupted:
            raise RuntimeError(f"{len(unfinished)} requests never finished: {self._state()}")
        kv = self.scheduler.kv
        return EngineRun(
            requests=self.requests,
            steps=self.steps,
            kv=self.kv_capacity,
            block_seconds=kv.block_seconds,
            prefix_queries=kv.prefix_queries,
            prefix_hits=kv.prefix_hits,
            end_s=env.now,
            decisions=self.decisions,
        )


def _with_running(segments: list[tuple[int, int, int, int, int]], row: int, more: int
                  ) -> list[tuple[int, int, int, int, int]]:
    """A run's row segments with ``more`` requests running from ``row`` on."""
    out = []
    for i, (start, batch, running, prefill, prefilling) in enumerate(segments):
        nxt = segments[i + 1][0] if i + 1 < len(segments) else None
        if start >= row:
            out.append((start, batch, running + more, prefill, prefilling))
        else:
            out.append((start, batch, running, prefill, prefilling))
            if nxt is None or nxt > row:  # the change falls inside this segment
                out.append((row, batch, running + more, prefill, prefilling))
    return out


def simulate(
    workload: Workload,
    config: EngineConfig,
    perf: PerformanceModel,
    *,
    slo=None,
    seed: int = 0,
    async_scheduling: bool | None = None,
    progress: bool = False,
    keep_decisions: bool = False,
    fast: bool = True,
    stop_on_interrupt: bool = False,
    compiled: bool | str = "auto",
) -> SimulatedRun:
    """Run a workload through one engine replica and return its RunResult (a SimulatedRun).

    ``fast`` advances runs of identical decode steps in closed form (same
    results as the step-by-step path, much faster); ``keep_decisions`` keeps
    every step's SchedulerOutput (and implies the step-by-step path).
    ``stop_on_interrupt`` (main thread only): Ctrl-C (SIGINT) or SIGTERM stops
    the run at the next step boundary and the result holds what was simulated
    until then (``summary.sections["partial"]``; unfinished requests have status
    ``unfinished``, requests not yet arrived are left out). ``compiled`` runs the
    step-by-step path compiled (simulator.engine.compiled; the same results, bit for
    bit) where it applies: True, False, or "auto" where it pays (heavy loads on the fast
    path); the result's ``engine_path`` says which path ran (``not_compiled``: why not).
    """
    from simulator.records.metrics import SLO

    kv = perf.kv_capacity(config.block_size, config.gpu_memory_utilization, config.num_gpu_blocks_override)
    factory = None
    if config.scheduler == "vllm":
        from simulator.engine.vllm_oracle import VllmScheduler

        factory = VllmScheduler
    bar = None
    on_progress = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(workload), unit="req", desc="simulating", mininterval=0.5)
        on_progress = bar.update
    try:
        engine = Engine(workload, config, perf, kv, seed=seed, async_scheduling=async_scheduling,
                        scheduler_factory=factory, keep_decisions=keep_decisions,
                        on_progress=on_progress, fast=fast, compiled=compiled)
        with stop_on_signals(engine.request_stop, stop_on_interrupt):
            run = engine.run()
    finally:
        if bar is not None:
            bar.close()
    slo = slo if isinstance(slo, SLO) else SLO.from_dict(slo)
    result = tabulate(run, workload, slo)
    result.summary.sections["async_scheduling"] = engine.async_scheduling
    result.summary.sections["scheduler"] = config.scheduler
    result.engine_path = "compiled" if engine.took_compiled else "fast" if engine.fast else "step by step"
    result.not_compiled = engine.not_compiled
    if engine.shapes is not None:
        result.summary.sections["shape_cache"] = engine.shapes.report()
    if engine.interrupted:
        result.summary.sections["partial"] = {
            "interrupted_at_s": run.end_s,
            "unfinished": int(sum(r.status < Status.FINISHED for r in run.requests)),
            "not_arrived": len(workload) - len(run.requests),
        }
    if keep_decisions:
        result.decisions = run.decisions
    return result


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], None], enabled: bool):
    """While active (if enabled and in the main thread), SIGINT and SIGTERM call ``stop``."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda _signum, _frame: stop())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
