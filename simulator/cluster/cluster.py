"""A cluster: replicas behind a router, simulated together on one SimPy clock.

Every replica is the single-replica engine (simulator.cluster.replica) with its
native scheduler and fast path. Requests reach the router at their arrival
times, in arrival order; the router chooses a replica from the replicas'
reports as of the latest report time (``staleness_s``: reports at multiples of
it; 0: the current state) and its own count of what it sent. A router that
reads no reports (round robin) routes every request up front; the others
decide at the arrival time, or earlier once every replica's report for it is
already known (the same decision either way). A replica's fast path ends its
runs before the next arrival not routed yet, so the results equal the
step-by-step path's (tests/simulator/cluster/test_cluster.py).

With ``prefill_replicas`` and ``decode_replicas`` the cluster is disaggregated
(simulator.cluster.disagg): the router sends each request to a prefill replica,
its KV goes over the link to a decode replica, which generates the output.

With ``lockstep`` (the data-parallel ranks of a mixture-of-experts model,
``data_parallel_ranks``) the replicas step together (simulator.cluster.lockstep):
step by step, each step as long as the slowest rank's, the router deciding at
the arrival times.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import simpy

from simulator.cluster import compiled_cluster, disagg
from simulator.cluster.lockstep import LockstepGroup
from simulator.cluster.outputs import ClusterResult, results, single
from simulator.cluster.replica import ClusterEnvironment, ReplicaEngine
from simulator.cluster.router import ROUTERS, RouteRequest, make_router, report_time
from simulator.engine.steady import SteadyScheduler
from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError
from simulator.records.metrics import SLO
from simulator.records.performance import PerformanceModel, StepBatch
from simulator.records.workload import Workload

#: ClusterSpec fields the ``cluster`` config group does not set
INTERNAL_FIELDS = ("lockstep",)


@dataclass(frozen=True)
class ClusterSpec:
    """The cluster's layout and router (the ``cluster`` config group)."""

    replicas: int = 1
    router: str = "round_robin"
    staleness_s: float = 0.0
    load_cap: int = 16
    prefill_replicas: int = 0
    decode_replicas: int = 0
    prefill_hardware: str | None = None
    link_gbps: float | None = None
    #: the data-parallel ranks of a mixture-of-experts model step together, as vLLM runs them
    dp_lockstep: bool = True
    #: these replicas step together (set by ``data_parallel_ranks``, not a config field)
    lockstep: bool = False

    @property
    def disaggregated(self) -> bool:
        return self.prefill_replicas > 0 or self.decode_replicas > 0

    @property
    def single(self) -> bool:
        """One plain replica: the plain single-replica run."""
        return self.replicas == 1 and not self.disaggregated

    @property
    def num_replicas(self) -> int:
        return self.prefill_replicas + self.decode_replicas if self.disaggregated else self.replicas

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ClusterSpec:
        """Validate the ``cluster`` group; ConfigError naming the first bad field."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)} - set(INTERNAL_FIELDS)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError("cluster", f"unknown fields {unknown}; allowed: {', '.join(sorted(known))}")
        data = {k: v for k, v in data.items() if v is not None or k in ("prefill_hardware", "link_gbps")}
        spec = cls(**data)
        if spec.router not in ROUTERS:
            raise ConfigError("cluster.router", f"unknown router {spec.router!r}; allowed: {', '.join(ROUTERS)}")
        for name, least in (("replicas", 1), ("load_cap", 0), ("prefill_replicas", 0), ("decode_replicas", 0)):
            value = getattr(spec, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"cluster.{name}", f"must be an integer >= {least}, got {value!r}")
        if (spec.prefill_replicas > 0) != (spec.decode_replicas > 0):
            raise ConfigError("cluster.decode_replicas" if spec.prefill_replicas else "cluster.prefill_replicas",
                              "prefill_replicas and decode_replicas must both be >= 1 for disaggregation, got "
                              f"{spec.prefill_replicas} and {spec.decode_replicas}")
        if isinstance(spec.staleness_s, bool) or not isinstance(spec.staleness_s, int | float) \
                or not spec.staleness_s >= 0 or not math.isfinite(spec.staleness_s):
            raise ConfigError("cluster.staleness_s", f"must be a number of seconds >= 0, got {spec.staleness_s!r}")
        if not isinstance(spec.dp_lockstep, bool):
            raise ConfigError("cluster.dp_lockstep", f"must be true or false, got {spec.dp_lockstep!r}")
        if spec.link_gbps is not None and (isinstance(spec.link_gbps, bool) or not isinstance(spec.link_gbps, int | float)
                                           or not spec.link_gbps > 0):
            raise ConfigError("cluster.link_gbps", f"must be GB/s > 0 or null, got {spec.link_gbps!r}")
        return spec


def data_parallel_ranks(spec: ClusterSpec, dp: int, moe: bool = False) -> ClusterSpec:
    """vLLM's ``--data-parallel-size dp``: dp engine ranks on one clock, each request sent to the
    rank with the fewest outstanding requests, as vLLM's DP coordinator does (router
    least_outstanding); the ranks of a mixture-of-experts model (``moe``) step together unless
    ``cluster.dp_lockstep`` is false (vLLM runs a dense model's ranks as independent engines).
    Replicas of dp-rank engines are not modelled: refused in one line."""
    if dp == 1:
        return spec
    if not spec.single:
        fields = ("cluster.prefill_replicas/decode_replicas" if spec.disaggregated
                  else f"cluster.replicas={spec.replicas}")
        raise ConfigError("engine.data_parallel_size", f"{dp} with {fields} (replicas of data-parallel engines) "
                                                       f"is not modelled; set one of them to 1")
    return replace(spec, replicas=dp, router="least_outstanding", lockstep=spec.dp_lockstep and moe)


def _outer(w: Workload, gid: int) -> tuple[int, int]:
    """The request's outer prefix group and tokens (two-level sharing), where the workload has them."""
    outer = getattr(w, "outer_group", None)
    return (int(outer[gid]), int(w.outer_tokens[gid])) if outer is not None else (-1, 0)


class _Pool:
    """Replicas sharing a router (the whole cluster, or the prefill or decode pool)."""

    def __init__(self, replicas: list[ReplicaEngine], router):
        self.replicas = replicas
        self.router = router

    def choose(self, request: RouteRequest, view_s: float, ahead: tuple[ReplicaEngine, np.ndarray] | None = None
               ) -> ReplicaEngine:
        """The replica for ``request`` (``ahead``: a replica and the finishes of the run it is about
        to take, which its report counts)."""
        reports = [r.report(view_s, i, ahead[1] if ahead is not None and r is ahead[0] else None)
                   for i, r in enumerate(self.replicas)] if self.router.needs_reports else ()
        index = self.router.choose(request, reports)
        self.router.sent(request, index)
        replica = self.replicas[index]
        replica.sent += 1
        return replica


class _Outlook:
    """What ``cluster`` knows of the next arrivals from ``g`` (at most ``Cluster.PASS_LIMIT``) and
    of front replica ``replica``'s and the others' reports for them (``router.Outlook``): its
    outstanding count at an arrival is known from its finishes foreseen; the others' are at most
    the requests sent them less those finished, reported or foreseen."""

    def __init__(self, cluster: Cluster, replica: ReplicaEngine, g: int):
        self.cluster, self.replica, self.g = cluster, replica, g
        self.n = min(cluster.PASS_LIMIT, len(cluster.workload) - g)
        self._until: float | None = None

    def __len__(self) -> int:
        return self.n

    def request(self, k: int) -> RouteRequest:
        return self.cluster._request(self.g + k)

    def own(self, k: int) -> int | None:
        replica = self.replica
        if self._until is None:
            self._until = replica.foreseen_until()
        view = self.cluster.view_time(float(self.cluster.workload.arrival_s[self.g + k]))
        return replica.outstanding_foreseen(view) if replica.foreseen_from < view <= self._until else None

    def others(self) -> list[tuple[int, int]]:
        view = self.cluster.view_time(float(self.cluster.workload.arrival_s[self.g]))
        return [(r.outstanding_foreseen(view) if r.foreseen_from < view <= r.foreseen_until()
                 else r.outstanding_at_most(view), i)
                for i, r in enumerate(self.cluster.front.replicas) if r is not self.replica]


class Cluster:
    """Replicas and routers on one SimPy environment."""

    def __init__(self, workload: Workload, engine: EngineConfig, perf: PerformanceModel, spec: ClusterSpec, *,
                 seed: int = 0, fast: bool = True, prefill_perf: PerformanceModel | None = None,
                 link_gbps: float | None = None, async_scheduling: bool | None = None,
                 on_progress: Callable[[int], None] | None = None):
        self.workload = workload
        self.on_progress = on_progress  # called with 1 as each request ends (tqdm's update)
        #: when each request's client gives up (arrival + workload.timeout_s; inf: never)
        self.deadline_s = [a + t for a, t in zip(workload.arrival_s.tolist(), workload.timeout_s.tolist(),
                                                 strict=True)]
        self.stopped = False  # request_stop: each replica ends at its next step boundary
        self.spec = spec
        self.env = ClusterEnvironment()
        self._stop_event = self.env.event()
        self._stop_event.callbacks.append(self._stop_idle)
        n = len(workload)
        self._next_unrouted = 0  # the first arrival the router has not routed
        self._routing = False
        self._blocking = 0  # the front replica whose reports last held the router back
        self.ahead = True  # route arrivals ahead of their time where the decision is already known
        self.ahead_on_finishes = True  # ... for routers reading no KV usage, from bounds on finishes
        #: a replica's runs go past arrivals the router cannot send it (``Router.first_may_get``)
        self.pass_arrivals = False
        #: ... and are held until they end or a request routed there cuts them (``ReplicaEngine.hold``)
        self.hold_runs = True
        #: ... and a request routed there that such a run admits whole extends it (``ReplicaEngine.extend_held``)
        self.extend_held_runs = True
        #: ... and such a request arriving before the step admitting it is scheduled stays in the run
        #: until then, where a later request might still cut it (``ReplicaEngine._defer``)
        self.defer_held_admissions = True
        #: ... and a run held to the end of the steps it timed goes on, timing more (``ReplicaEngine._go_on``)
        self.go_on_held_runs = True
        #: ... also for a router reading KV usage (the replicas' reports read a held run's from
        #: its plan: ``ReplicaEngine._held_rows``)
        self.hold_kv_runs = True
        self.replica_of = np.full(n, -1, dtype=np.int64)  # the replica that generated each request
        #: the replicas stepping together (data-parallel lock-step), or None
        self.lockstep: LockstepGroup | None = None
        locked = spec.lockstep and not spec.disaggregated
        if locked:
            fast = False  # (rounds of single steps)
            self.ahead = False
        common = dict(env=self.env, fast=fast, async_scheduling=async_scheduling)
        self.transfer: disagg.Transfer | None = None
        self._handoffs: list[tuple[float, int, int, int]] = []  # (time, request id, prefill replica, local id)
        self._front_loops_left = 0  # prefill replicas still running (disaggregated)
        self.transfer_s = np.full(n, np.nan)

        def make(index: int, role: str, config: EngineConfig, model: PerformanceModel, known_until) -> ReplicaEngine:
            kv = model.kv_capacity(config.block_size, config.gpu_memory_utilization, config.num_gpu_blocks_override)
            return ReplicaEngine(index, role, n, workload, config, model, kv, seed=seed + index,
                                 known_until=known_until, on_finish=self._finished, **common)

        if not spec.disaggregated:
            router = make_router(spec.router, spec.replicas, seed=seed, load_cap=spec.load_cap)
            self.front = _Pool([make(i, "replica", engine, perf,
                                     lambda now, i=i: self._front_known_until(now, i))
                                for i in range(spec.replicas)], router)
            self.decode = None
            if locked:
                self.lockstep = LockstepGroup(self.front.replicas)
        else:
            p, d = spec.prefill_replicas, spec.decode_replicas
            gbps = spec.link_gbps if spec.link_gbps is not None else link_gbps
            if gbps is None or not gbps > 0:
                raise ConfigError("cluster.link_gbps", f"the KV-transfer link needs a bandwidth in GB/s > 0, got {gbps!r}")
            prefill_perf = prefill_perf or perf
            self.front = _Pool([make(i, "prefill", engine, prefill_perf, self._front_known_until) for i in range(p)],
                               make_router(spec.router, p, seed=seed, load_cap=spec.load_cap))
            self._front_loops_left = p
            self.transfer = disagg.Transfer(self.front.replicas[0].kv_capacity.bytes_per_token, float(gbps),
                                            int(workload.prompt_tokens.min()) if n else 1,
                                            int(workload.prefix_group.max()) + 1 if n else 0)
            decode_engine = replace(engine, enable_prefix_caching=True)  # holds the transferred KV
            self.decode = _Pool([make(p + i, "decode", decode_engine, perf, self._decode_known_until)
                                 for i in range(d)],
                                make_router(spec.router, d, seed=seed + 1, load_cap=spec.load_cap))
        self.replicas = self.front.replicas + (self.decode.replicas if self.decode else [])
        for replica in self.front.replicas:
            replica.known_from = self._next_arrival_s
        #: half the shortest step each replica's model gives (one decode token): a safe lower bound on
        #: the time between two of its steps' ends
        self._min_step_s = [0.5 * r.perf.step_time(StepBatch(decode_context=[1], decode_spec_tokens=[0]))
                            for r in self.replicas]

    # --- routing ----------------------------------------------------------------------
    def view_time(self, t: float) -> float:
        """When the reports a decision at ``t`` sees were made."""
        return report_time(t, self.spec.staleness_s)

    def _request(self, gid: int) -> RouteRequest:
        w = self.workload
        return RouteRequest(gid, float(w.arrival_s[gid]), int(w.prompt_tokens[gid]), int(w.prefix_group[gid]),
                            int(w.prefix_tokens[gid]))

    def _route(self, gid: int, ahead: tuple[ReplicaEngine, np.ndarray] | None = None) -> ReplicaEngine:
        """Route arrival ``gid`` (now, or ahead of its time)."""
        w = self.workload
        t = float(w.arrival_s[gid])
        replica = self.front.choose(self._request(gid), self.view_time(t), ahead)
        prefill = self.decode is not None
        j = replica.add(gid, t, int(w.prompt_tokens[gid]), 1 if prefill else int(w.output_tokens[gid]),
                        0 if prefill else int(w.reasoning_tokens[gid]), int(w.prefix_group[gid]),
                        int(w.prefix_tokens[gid]), *_outer(w, gid), deadline_s=self.deadline_s[gid])
        if not prefill:
            self.replica_of[gid] = replica.index
        replica.deliver_at(j, t)
        return replica

    def _arrivals(self):
        """The router's process: each arrival routed at its time, before the replicas' steps then."""
        arrival = self.workload.arrival_s.tolist()
        env = self.env
        for gid, t in enumerate(arrival):
            if gid < self._next_unrouted:
                continue  # routed ahead
            if t > env.now:
                event = env.event()
                env.call_at(t, lambda _e, event=event: event.succeed())
                yield event
                self._show_progress()
                if gid < self._next_unrouted:
                    continue
            self._next_unrouted = gid + 1
            self._route(gid)
        for replica in self.front.replicas:
            replica.close()

    def _show_progress(self) -> None:
        """Count on the progress bar the finishes of runs held (reported when the run is applied,
        which may be long after) that the clock has passed."""
        if self.on_progress is None:
            return
        now = self.env.now
        for replica in self.replicas:
            if replica.role != "prefill":
                n = replica.unshown_finishes(now)
                if n:
                    replica.shown_ahead += n
                    self.on_progress(n)

    def _route_ahead(self, new_timeout: simpy.Timeout | None = None) -> None:
        """Route the next arrivals now, ahead of their time, as far as every replica's reports
        for them are already known (``ReplicaEngine.determined_until``): the decisions are those
        made at the arrival times, and the replicas' fast path sees its arrivals earlier."""
        arrival = self.workload.arrival_s
        g = self._next_unrouted
        now = self.env.now
        if g >= len(arrival) or self._routing or arrival[g] <= now:
            return
        horizon = self._known_horizon(self.view_time(float(arrival[g])), new_timeout)
        self._routing = True
        try:
            while g < len(arrival):
                t = float(arrival[g])
                if t <= now or self.view_time(t) > horizon:
                    break
                self._next_unrouted = g + 1
                replica = self._route(g)
                horizon = min(horizon, self._known_for_router(replica, new_timeout))
                g += 1
        finally:
            self._routing = False

    def _look_ahead(self, replica: ReplicaEngine, now: float, ahead: tuple[np.ndarray, float] | None) -> None:
        """Before ``replica`` plans a run: route the next arrivals whose decisions are known once
        its own finishes are (``ahead``: from the run it would take if none came to it), until one
        goes to it; its run then reaches further than the next arrival."""
        arrival = self.workload.arrival_s
        g = self._next_unrouted
        if ahead is None or g >= len(arrival) or self._routing or arrival[g] <= now:
            return
        need = self.view_time(float(arrival[g]))
        others = self._known_horizon(need, None, replica)
        if need > others:
            return
        finishes, last_row = ahead
        horizon = min(others, last_row)
        self._routing = True
        try:
            while g < len(arrival):
                t = float(arrival[g])
                if t <= now or self.view_time(t) > horizon:
                    break
                self._next_unrouted = g + 1
                chosen = self._route(g, (replica, finishes))
                g += 1
                if chosen is replica:
                    break  # its run changes from here
                horizon = min(horizon, self._known_for_router(chosen, None))
        finally:
            self._routing = False

    def _known_horizon(self, need: float, new_timeout: simpy.Timeout | None,
                       skip: ReplicaEngine | None = None) -> float:
        """The least ``_known_for_router`` of the front replicas but ``skip``, or, as soon as one
        is found, one below ``need`` (then nothing can be routed: the rest is not computed). The
        replica found below last time is asked first."""
        replicas = self.front.replicas
        n = len(replicas)
        horizon = math.inf
        for k in range(n):
            i = (self._blocking + k) % n
            if replicas[i] is skip:
                continue
            known = self._known_for_router(replicas[i], new_timeout)
            if known < need:
                self._blocking = i
                return known
            horizon = min(horizon, known)
        return horizon

    def _known_for_router(self, replica: ReplicaEngine, new_timeout: simpy.Timeout | None) -> float:
        """Until when the router already knows what it would read of ``replica``: its steps
        (``determined_until``), and for routers that read no KV usage, its finishes, which are
        known further (``no_finish_until``)."""
        until = replica.determined_until(new_timeout)
        if self.front.router.needs_kv or not self.ahead_on_finishes:
            return replica.reports_known_until(until)
        # (its reports count the finishes foreseen, where they hold)
        return max(replica.no_finish_until(until, self._min_step_s[replica.index]), replica.foreseen_until())

    def _next_arrival_s(self) -> float:
        """The next arrival not routed yet (inf: none): no request routed from now on arrives
        before it."""
        g = self._next_unrouted
        arrival = self.workload.arrival_s
        return float(arrival[g]) if g < len(arrival) else math.inf

    def _front_known_until(self, now: float, index: int | None = None) -> float:
        """Until when the requests routed to front replica ``index`` (None: any) are known: the
        next arrival not routed yet, or, where runs may pass arrivals, the first one the router
        may send it (``Router.first_may_get``, from what is known of its reports then)."""
        arrival = self.workload.arrival_s
        g = self._next_unrouted
        if g >= len(arrival) or index is None or not self.pass_arrivals:
            return self._next_arrival_s()
        # (a run passing arrivals ends exactly at its time: ``ExactEnvironment.timeout_at``)
        end = g + self.front.router.first_may_get(index, _Outlook(self, self.front.replicas[index], g))
        return float(arrival[end]) if end < len(arrival) else math.inf

    #: how many arrivals not routed yet a replica's runs may pass (``_Outlook``)
    PASS_LIMIT = 32

    # --- disaggregation: prefill -> KV transfer -> decode -------------------------------
    def _finished(self, replica: ReplicaEngine, j: int, finish_s: float, dropped: bool) -> None:
        """A request ended on ``replica``: a prefill that completed goes on to the decode pool;
        any other end is the request's own (counted for the progress bar)."""
        if replica.role != "prefill" or dropped:
            if not dropped and replica.shown_ahead:
                replica.shown_ahead -= 1  # (counted as the clock passed it: ``_show_progress``)
            elif self.on_progress is not None:
                self.on_progress(1)
            return
        gid = replica.gid(j)
        t = finish_s + self.transfer.seconds(int(self.workload.prompt_tokens[gid]))
        heapq.heappush(self._handoffs, (t, gid, replica.index, j))
        self.env.call_at(t, lambda _e: self._hand_over())

    def _hand_over(self) -> None:
        """The transfers due now end: each request joins the decode replica chosen for it (in
        order of time, then request id, whichever path reported the prefill's end first)."""
        env, w = self.env, self.workload
        while self._handoffs and self._handoffs[0][0] <= env.now:
            t, gid, _, _ = heapq.heappop(self._handoffs)
            replica = self.decode.choose(self._request(gid), self.view_time(t))
            prompt = int(w.prompt_tokens[gid])
            group = self.transfer.group_base + gid
            bs = replica.config.block_size
            replica.scheduler.kv.add_cached_prefix(group, prompt // bs)
            j = replica.add(gid, t, prompt, int(w.output_tokens[gid]), int(w.reasoning_tokens[gid]), group, prompt,
                            deadline_s=self.deadline_s[gid])
            self.replica_of[gid] = replica.index
            self.transfer_s[gid] = self.transfer.seconds(prompt)
            replica.deliver(j)
        self._maybe_close_decode()

    def _front_loop_done(self, _event) -> None:
        self._front_loops_left -= 1
        self._maybe_close_decode()

    def _maybe_close_decode(self) -> None:
        if self.decode is not None and not self._front_loops_left and not self._handoffs:
            for replica in self.decode.replicas:
                if not replica.closed:
                    replica.close()

    def _decode_known_until(self, now: float) -> float:
        """No request reaches a decode replica before the transfers already due, nor before a
        prefill not reported yet could end (after every prefill replica's known steps) plus the
        shortest transfer."""
        due = self._handoffs[0][0] if self._handoffs else math.inf
        if self._front_loops_left:
            # (an idle prefill replica's next request is routed at the next arrival at the earliest)
            known = min(self._front_known_until(now), *(r.determined_until() for r in self.front.replicas))
            due = min(due, max(known, now) + self.transfer.min_seconds)
        return due

    # --- the run --------------------------------------------------------------------------
    def run(self, slo: SLO) -> ClusterResult:
        env = self.env
        if len(self.workload) and not self.front.router.needs_reports:
            for gid in range(len(self.workload)):
                self._route(gid)  # up front: the replicas' fast path sees their arrivals ahead
            self._next_unrouted = len(self.workload)
            for replica in self.front.replicas:
                replica.close()
        else:
            env.process(self._arrivals())
            if self.ahead:
                env.on_timeout = self._route_ahead
                reads_kv = self.front.router.needs_kv
                if self.ahead_on_finishes and (not reads_kv or self.hold_kv_runs):
                    for replica in self.front.replicas:
                        if isinstance(replica.scheduler, SteadyScheduler):
                            if not reads_kv:  # (its reports ahead would lack the KV usage)
                                replica.look_ahead = self._look_ahead
                            replica.foresee = True
                            replica.report_kv = reads_kv
                    self.pass_arrivals = self.decode is None
                    for replica in self.front.replicas:
                        replica.hold = replica.foresee and self.pass_arrivals and self.hold_runs
                        replica.extend_held = self.extend_held_runs
                        replica.defer_held = self.defer_held_admissions
                        replica.go_on_held = self.go_on_held_runs
        loops = [self.lockstep.start()] if self.lockstep is not None else []
        for replica in self.replicas:
            if self.lockstep is not None:
                continue  # (the group's loop is theirs)
            loop = replica.start_loop()
            if replica.role == "prefill":
                loop.callbacks.append(self._front_loop_done)
            loops.append(loop)
        env.run(until=simpy.AllOf(env, loops))
        if not self.stopped and len(self.workload):
            # a replica idle at the end ends with the cluster's arrivals (not when the router,
            # deciding ahead, happened to close it)
            last = float(self.workload.arrival_s[-1])
            for replica in self.replicas:
                replica.end_s = max(replica.end_s, last)
        return self._results(slo)

    def request_stop(self) -> None:
        """Stop the run (e.g. on Ctrl-C; safe from a signal handler): every replica ends at its
        next step boundary and ``run`` returns what was simulated (``summary["partial"]``)."""
        self.stopped = True
        for replica in self.replicas:
            replica.request_stop()
        if not self._stop_event.triggered:
            self._stop_event.succeed()  # (processed on the clock: ``_stop_idle``)

    def _stop_idle(self, _event) -> None:
        """The replicas waiting for a request end now; the others at their next step boundary."""
        for replica in self.replicas:
            replica.stop_held()
            if replica._wake is not None and not replica._wake.triggered:
                replica._wake.succeed()

    def _results(self, slo: SLO) -> ClusterResult:
        return results(self, slo)


def simulate_cluster(workload: Workload, engine: EngineConfig, perf: PerformanceModel, spec: ClusterSpec, *,
                     slo=None, seed: int = 0, fast: bool = True, prefill_perf: PerformanceModel | None = None,
                     link_gbps: float | None = None, async_scheduling: bool | None = None,
                     progress: bool = False, stop_on_interrupt: bool = False,
                     compiled: bool | str = "auto") -> ClusterResult:
    """Simulate ``workload`` on the cluster ``spec``; one plain replica is exactly
    ``simulator.engine.loop.simulate`` (its result, with a ``replica`` column of zeros).
    ``compiled`` (True, False or "auto": where it pays) runs the replicas on the compiled
    scheduler where it applies (simulator.cluster.compiled_cluster: the same tables); the
    result's ``engine_path`` says which ran ("compiled" or "python"), ``not_compiled`` why not
    where it was asked for and refused.

    ``progress`` and ``stop_on_interrupt`` as ``simulate``'s: a tqdm bar of requests ended, and
    Ctrl-C (SIGINT) or SIGTERM stopping every replica at its next step boundary, the result
    holding what was simulated (``summary["partial"]``; unfinished requests have status
    ``unfinished``, requests not yet arrived are left out).
    """
    from simulator.engine.loop import stop_on_signals

    slo = slo if isinstance(slo, SLO) else SLO.from_dict(slo)
    if spec.single:
        return single(workload, engine, perf, spec, slo=slo, seed=seed, fast=fast, async_scheduling=async_scheduling,
                      progress=progress, stop_on_interrupt=stop_on_interrupt, compiled=compiled)
    if engine.scheduler == "vllm":
        raise ConfigError("engine.scheduler", "a cluster runs the native scheduler only, got 'vllm'")
    wants = compiled_cluster.wanted(workload, engine, perf, spec, compiled, fast)
    reason = compiled_cluster.why_not(workload, engine, perf, spec) if wants else ""
    take_compiled = wants and not reason
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(workload), unit="req", desc="simulating", mininterval=0.5)
    try:
        on_progress = bar.update if bar is not None else None
        if take_compiled:
            cluster = compiled_cluster.CompiledCluster(workload, engine, perf, spec, seed=seed,
                                                       async_scheduling=async_scheduling, on_progress=on_progress)
        else:
            cluster = Cluster(workload, engine, perf, spec, seed=seed, fast=fast, prefill_perf=prefill_perf,
                              link_gbps=link_gbps, async_scheduling=async_scheduling, on_progress=on_progress)
        with stop_on_signals(cluster.request_stop, stop_on_interrupt):
            out = cluster.run(slo)
        out.engine_path = "compiled" if take_compiled else "python"
        out.not_compiled = reason if compiled is True else ""
        return out
    finally:
        if bar is not None:
            bar.close()
