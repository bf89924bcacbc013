"""A cluster's replicas on the compiled scheduler (simulator.engine.compiled), the router between.

Each replica is a ``CompiledScheduler`` whose requests come one by one (``routed``). The router
decides the arrivals in order, each at its time: every replica first runs up to the time its
report is as of (``report_time``: the arrival, or the latest report time with ``staleness_s``)
and stops there (``CompiledScheduler.until``: nothing happens at or after it), so its report, the
requests sent to it and not finished before that time and its KV usage after its last step that
ended before it, is the one the Python cluster reads (``ReplicaEngine.report``). The request then
joins the replica chosen ahead of that replica's own events of its arrival time, as the Python
cluster's ``call_at`` delivers it. A router that reads no reports routes every request up front.
The tables equal the Python cluster's (tests/simulator/cluster/test_compiled_cluster.py), which
stays the path for what this one does not cover (``why_not``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from simulator.cluster.outputs import ClusterResult, results
from simulator.cluster.router import ROUTERS, ReplicaReport, RouteRequest, make_router, report_time
from simulator.engine import compiled
from simulator.engine.request import SimRequest
from simulator.engine.rules import admission_error
from simulator.engine.run_log import EngineRun, StepLog
from simulator.records.engine_config import EngineConfig
from simulator.records.metrics import SLO
from simulator.records.performance import KVCapacity, PerformanceModel
from simulator.records.workload import Workload

if TYPE_CHECKING:
    from simulator.cluster.cluster import ClusterSpec


def why_not(workload: Workload, engine: EngineConfig, perf: PerformanceModel, spec: ClusterSpec) -> str:
    """Why the cluster cannot run on the compiled scheduler ('' if it can)."""
    if spec.disaggregated:
        return "prefill/decode disaggregation"
    if spec.lockstep:
        return "data-parallel lock-step"
    if engine.scheduler != "native":
        return f"scheduler {engine.scheduler!r}"
    if np.isfinite(np.asarray(workload.timeout_s, dtype=float)).any():
        return "client timeouts in a cluster"
    kv = perf.kv_capacity(engine.block_size, engine.gpu_memory_utilization, engine.num_gpu_blocks_override)
    return compiled.unsupported(engine, perf, kv)


def wanted(workload: Workload, engine: EngineConfig, perf: PerformanceModel, spec: ClusterSpec,
           choice: bool | str, fast: bool) -> bool:
    """Whether ``choice`` ("auto", True or False) asks for the compiled cluster: "auto" on the fast
    path for at least ``compiled.AUTO_MIN_REQUESTS`` requests where the router reads the replicas'
    reports (the Python cluster then stops its replicas' runs at every decision) or the load is
    heavy (``compiled.AUTO_MIN_LOAD`` of the replicas' decode capacity)."""
    if choice != "auto":
        return bool(choice)
    if not fast or len(workload) < compiled.AUTO_MIN_REQUESTS:
        return False
    if ROUTERS[spec.router].needs_reports:
        return True
    kv = perf.kv_capacity(engine.block_size, engine.gpu_memory_utilization, engine.num_gpu_blocks_override)
    return compiled.offered_load(workload, engine, kv, perf, spec.replicas) >= compiled.AUTO_MIN_LOAD


class CompiledReplica:
    """One replica: a routed ``CompiledScheduler``, its step log and what its router reads."""

    role = "replica"
    shapes = None  # (no per-shape set-up cost: ``why_not``)

    def __init__(self, index: int, workload: Workload, rows: compiled.RequestRows, config: EngineConfig,
                 perf: PerformanceModel, kv: KVCapacity, async_scheduling: bool, finish_every: int = 0):
        self.index, self.workload, self.config, self.kv_capacity = index, workload, config, kv
        self.async_scheduling = async_scheduling
        self.scheduler = compiled.CompiledScheduler(config, kv, workload, perf, async_scheduling=async_scheduling,
                                                    finish_every=finish_every, rows=rows, routed=True)
        self.steps = StepLog()
        self.count = 0  # requests routed here
        self.sent = 0  # requests the router sent here (its own count)
        self.end_s = 0.0

    def add(self, gid: int) -> None:
        """Request ``gid`` of the workload comes here at its arrival time."""
        self.scheduler.arrive(gid)
        self.count += 1

    def run_until(self, t: float) -> None:
        """Run every step that ends before ``t`` (and what comes before it), nothing at or after."""
        self.scheduler.until(t)
        self.scheduler.run_routed(self.steps)

    def finish(self, closed_s: float, go_on: Callable[[], bool]) -> None:
        """No more requests come: run to the end (idle before ``closed_s``, the cluster's last
        arrival: it ends then, as the Python cluster's replicas do), or until ``go_on()`` says to
        stop (asked every ``finish_every`` requests ended)."""
        self.scheduler.close()
        self.scheduler.run_routed(self.steps, go_on)
        self.end_s = max(self.scheduler.clock, closed_s)

    @property
    def ended(self) -> int:
        """Requests ended here so far (completed or rejected)."""
        return self.scheduler.num_ended

    def report(self, view_s: float, position: int) -> ReplicaReport:
        """As ``ReplicaEngine.report`` (``run_until(view_s)`` done): requests sent and not finished
        before ``view_s``, and the KV usage after its last step that ended before it."""
        sched = self.scheduler
        return ReplicaReport(position, self.sent - sched.finished_before(view_s),
                             sched.last_kv_blocks / max(self.kv_capacity.num_blocks - 1, 1))

    def column(self, name: str) -> np.ndarray:
        """``gid``: the workload's id of each request routed here, by local id."""
        if name != "gid":
            raise KeyError(name)
        return self.scheduler.row_of[: self.count].copy()

    def collect(self) -> EngineRun:
        """What the replica ran, as ``Engine.collect`` gives it (request ids local, in routing order;
        in a stopped run, the requests that had arrived)."""
        w, cfg, kv, bs = self.workload, self.config, self.kv_capacity, self.config.block_size
        sched = self.scheduler
        sched.flush(self.steps)  # (a stopped run's last steps)
        requests = []
        for j, gid in enumerate(self.column("gid")[: sched.num_arrived].tolist()):
            req = SimRequest(j, float(w.arrival_s[gid]), int(w.prompt_tokens[gid]), int(w.output_tokens[gid]),
                             int(w.reasoning_tokens[gid]), int(w.prefix_group[gid]), int(w.prefix_tokens[gid]), bs,
                             int(w.outer_group[gid]), int(w.outer_tokens[gid]))
            req.reject_reason = admission_error(req.num_prompt, req.max_tokens, cfg, kv)
            sched.add_request(req)
            requests.append(req)
        sched.materialize()
        return EngineRun(requests=requests, steps=self.steps, kv=kv, block_seconds=sched.kv.block_seconds,
                         prefix_queries=sched.kv.prefix_queries, prefix_hits=sched.kv.prefix_hits, end_s=self.end_s)


class CompiledCluster:
    """The replicas and the router, with what ``cluster.results`` reads of a cluster."""

    decode = None  # (no disaggregation, no lock-step: ``why_not``)
    lockstep = None
    transfer = None

    def __init__(self, workload: Workload, engine: EngineConfig, perf: PerformanceModel, spec: ClusterSpec, *,
                 seed: int = 0, async_scheduling: bool | None = None,
                 on_progress: Callable[[int], None] | None = None):
        self.workload, self.spec, self.on_progress = workload, spec, on_progress
        n = len(workload)
        if async_scheduling is None:
            async_scheduling = engine.async_scheduling if engine.async_scheduling is not None else True
        kv = perf.kv_capacity(engine.block_size, engine.gpu_memory_utilization, engine.num_gpu_blocks_override)
        rows = compiled.RequestRows.of(workload, engine, kv)
        every = max(n // 100, 1) if on_progress is not None else 0  # (progress while replicas run on)
        self.replicas = [CompiledReplica(i, workload, rows, engine, perf, kv, async_scheduling, every)
                         for i in range(spec.replicas)]
        self.front = SimpleNamespace(replicas=self.replicas, router=make_router(
            spec.router, spec.replicas, seed=seed, load_cap=spec.load_cap))
        self.replica_of = np.full(n, -1, dtype=np.int64)
        self.transfer_s = np.full(n, np.nan)
        self.stopped = False
        self.env = SimpleNamespace(now=0.0)  # (the clock at the end, as the Python cluster's)
        self._shown = 0
        if on_progress is not None:  # (a progress bar: someone is watching)
            compiled.say_if_cold()

    def request_stop(self) -> None:
        """Stop at the next routing decision; ``run`` returns what was simulated."""
        self.stopped = True

    def run(self, slo: SLO) -> ClusterResult:
        """Route every arrival, run the replicas to their ends; the cluster's result."""
        w, router, replicas = self.workload, self.front.router, self.replicas
        arrival = w.arrival_s.tolist()
        at = -math.inf  # the time every replica has run up to
        for gid, t in enumerate(arrival):
            if self.stopped:
                break
            reports = ()
            if router.needs_reports:
                view = report_time(t, self.spec.staleness_s)
                if view != at:
                    for replica in replicas:
                        replica.run_until(view)
                    at = view
                    self._show_progress()
                reports = [replica.report(view, i) for i, replica in enumerate(replicas)]
            request = RouteRequest(gid, t, int(w.prompt_tokens[gid]), int(w.prefix_group[gid]),
                                   int(w.prefix_tokens[gid]))
            index = router.choose(request, reports)
            router.sent(request, index)
            replica = replicas[index]
            replica.sent += 1
            replica.add(gid)
            self.replica_of[gid] = index
        closed = arrival[-1] if arrival else 0.0
        for replica in replicas:
            if not self.stopped:
                replica.finish(closed, self._show_progress)
            if self.stopped:
                replica.end_s = replica.scheduler.clock
        self._show_progress()
        self.env.now = max((r.end_s for r in replicas), default=0.0)
        return results(self, slo)

    def _show_progress(self) -> bool:
        """Count the requests ended since on the progress bar; whether to go on (no stop asked)."""
        if self.on_progress is not None:
            ended = sum(r.ended for r in self.replicas)
            if ended > self._shown:
                self.on_progress(ended - self._shown)
                self._shown = ended
        return not self.stopped
