"""Replicas on one clock: the fast path equals step by step, one replica equals the plain run,
and the tables hold every request once with its replica."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulator.cluster import ClusterSpec, simulate_cluster
from simulator.cluster.cluster import Cluster
from simulator.cluster.router import ROUTERS, Router
from simulator.engine import fast_forward
from simulator.engine.loop import simulate
from simulator.plots import plot_kv_per_replica
from simulator.records.engine_config import EngineConfig
from simulator.records.metrics import SLO
from tests.simulator.conftest import VectorLinearModel, make_workload


def assert_same(slow, fast):
    for table in ("requests", "timeline"):
        a, b = getattr(slow, table), getattr(fast, table)
        assert list(a) == list(b)
        for key in a:
            if a[key].dtype.kind == "f" and key != "kv_block_seconds":  # (block-seconds: exact tick sums)
                np.testing.assert_allclose(b[key], a[key], rtol=1e-9, atol=1e-9, err_msg=f"{table}.{key}")
            else:
                np.testing.assert_array_equal(b[key], a[key], err_msg=f"{table}.{key}")


def count_runs(monkeypatch) -> list[int]:
    """A one-item list counting the runs of steps the fast path applies (``fast_forward.apply_run``)."""
    runs = [0]
    apply_run = fast_forward.apply_run

    def counting(*args, **kwargs):
        runs[0] += 1
        return apply_run(*args, **kwargs)

    monkeypatch.setattr(fast_forward, "apply_run", counting)
    return runs


@pytest.mark.parametrize("router", ["round_robin", "least_outstanding", "least_kv", "prefix_affinity",
                                    "power_of_two"])
@pytest.mark.parametrize(("async_scheduling", "staleness"), [(False, 0.0), (True, 0.0), (True, 0.5)])
def test_fast_path_equals_step_by_step_in_a_cluster(router, async_scheduling, staleness):
    w = make_workload(n=150, seed=3, rate=8, output=(1, 2000), prefix_groups=3, prefix_tokens=64)
    cfg = EngineConfig(num_gpu_blocks_override=500, max_model_len=8192)
    spec = ClusterSpec(replicas=3, router=router, staleness_s=staleness)
    slow = simulate_cluster(w, cfg, VectorLinearModel(), spec, fast=False, async_scheduling=async_scheduling)
    fast = simulate_cluster(w, cfg, VectorLinearModel(), spec, fast=True, async_scheduling=async_scheduling)
    assert_same(slow.result, fast.result)
    assert slow.result.summary["preemptions"] > 0  # the case covers preemption


@pytest.mark.parametrize("router", ["round_robin", "least_kv"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_one_replica_on_the_cluster_clock_is_the_plain_engine(router, async_scheduling):
    w = make_workload(n=120, seed=5, rate=3, output=(1, 2000))
    cfg = EngineConfig(num_gpu_blocks_override=600, max_model_len=8192)
    plain = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling)
    cluster = Cluster(w, cfg, VectorLinearModel(), ClusterSpec(replicas=1, router=router),
                      async_scheduling=async_scheduling).run(SLO())
    assert_same(plain, type(plain)({k: v for k, v in cluster.result.requests.items() if k != "replica"},
                                   {k: v for k, v in cluster.result.timeline.items() if k != "replica"}, {}))


def test_tables_hold_each_request_once_with_its_replica(tmp_path):
    w = make_workload(n=200, seed=7, rate=6, output=(1, 1500))
    out = simulate_cluster(w, EngineConfig(max_model_len=8192), VectorLinearModel(),
                           ClusterSpec(replicas=3, router="least_outstanding"))
    requests, timeline, summary = out.result.requests, out.result.timeline, out.result.summary
    np.testing.assert_array_equal(requests["request_id"], np.arange(len(w)))
    np.testing.assert_array_equal(requests["arrival_s"], w.arrival_s)
    for index, replica in enumerate(out.replicas):
        mine = requests["replica"] == index
        np.testing.assert_array_equal(np.sort(replica.requests["request_id"]), np.flatnonzero(mine))
        np.testing.assert_array_equal(timeline["time_s"][timeline["replica"] == index], replica.timeline["time_s"])
        assert summary["replicas"][index]["requests"] == int(mine.sum())
    assert summary["completed"] == len(w)
    assert summary["cluster"]["requests_per_replica"] == [int((requests["replica"] == i).sum()) for i in range(3)]
    assert summary["kv_usage"]["peak"] == max(r["kv_usage"]["peak"] for r in summary["replicas"])
    path = plot_kv_per_replica(out.result, tmp_path / "kv_usage_replicas.png")
    assert path.stat().st_size > 0


def test_same_seed_same_cluster():
    w = make_workload(n=100, seed=2, rate=6, output=(1, 1500))
    spec = ClusterSpec(replicas=4, router="power_of_two")

    def run(seed):
        return simulate_cluster(w, EngineConfig(max_model_len=8192), VectorLinearModel(), spec, seed=seed).result

    assert_same(run(1), run(1))
    assert not np.array_equal(run(1).requests["replica"], run(2).requests["replica"])


@pytest.mark.parametrize("router", ["least_outstanding", "least_kv", "prefix_affinity", "power_of_two"])
@pytest.mark.parametrize(("async_scheduling", "staleness"), [(False, 0.0), (True, 0.0), (True, 0.5)])
def test_deciding_ahead_of_time_changes_no_decision(router, async_scheduling, staleness):
    """Routing an arrival before its time (where the reports it needs are known) equals routing
    it at its time: the ground truth for the cluster's look-ahead."""
    w = make_workload(n=150, seed=8, rate=8, output=(1, 2000), prefix_groups=3, prefix_tokens=64)
    cfg = EngineConfig(num_gpu_blocks_override=500, max_model_len=8192)
    spec = ClusterSpec(replicas=3, router=router, staleness_s=staleness)

    def run(ahead: bool):
        cluster = Cluster(w, cfg, VectorLinearModel(), spec, async_scheduling=async_scheduling)
        cluster.ahead = ahead
        return cluster.run(SLO()).result

    assert_same(run(False), run(True))


@pytest.mark.parametrize("router", ["least_outstanding", "least_kv"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_no_run_applies_a_step_past_the_next_routing_decision(router, async_scheduling, monkeypatch):
    """Every run a replica takes at once ends before its arrivals stop being known
    (``Arrivals.known_until_s``: the next routing decision that may send it one), also when
    admissions inside the run and a short KV cache cut it (``fast_forward._fit_kv``). (Runs held
    until a request routed there cuts them, ``ReplicaEngine.hold``: the next test.)"""
    from simulator.cluster.replica import ClusterRuns

    advance = ClusterRuns.advance
    taken = []

    def checked(self, now, pace, next_arrival, in_flight):
        adv = advance(self, now, pace, next_arrival, in_flight)
        if adv is not None and adv.k > 0:  # (k 0: a run held)
            taken.append(adv.k)
            assert adv.end_s < self.arrivals.known_until_s, (now, adv.k, adv.end_s, self.arrivals.known_until_s)
        return adv

    monkeypatch.setattr(ClusterRuns, "advance", checked)
    w = make_workload(n=150, seed=1, rate=30, output=(1, 400))
    cfg = EngineConfig(max_model_len=8192, num_gpu_blocks_override=150)
    cluster = Cluster(w, cfg, VectorLinearModel(), ClusterSpec(replicas=2, router=router),
                      async_scheduling=async_scheduling)
    cluster.run(SLO())
    assert len(taken) > 10 and max(taken) > 1


@pytest.mark.parametrize(("seed", "async_scheduling", "router"), [
    (0, False, "least_outstanding"), (1, True, "least_outstanding"), (2, False, "power_of_two"),
    (3, True, "power_of_two"), (0, True, "prefix_affinity"), (3, False, "prefix_affinity")])
def test_runs_held_until_a_request_routed_there_cuts_them_change_no_bit(seed, async_scheduling, router,
                                                                           monkeypatch):
    """A replica's run planned as if no more requests came is held, not applied, until it ends
    or a request routed there arrives (``ReplicaEngine.hold``); then it is applied cut before
    its first step scheduled at or after that arrival (the request comes during its last step,
    as a single run's arrivals that it does not admit), so an arrival routed elsewhere does not
    end it. Each replica's tables are bit for bit those of runs ended before every arrival the
    replica may get (``Cluster.hold_runs`` off), in fewer runs. Fails with the cut a step later,
    or with no cut (the request queued into the state before the run)."""
    from simulator.cluster.replica import ReplicaEngine

    release = ReplicaEngine._release
    cuts = []

    def checked(self, t):
        held = self._held
        release(self, t)
        adv, _, admissions, _ = self._unlogged
        if t < math.inf:
            cuts.append(adv.k < held.run.k)
            # every step applied is scheduled before ``t`` (step 1 at the run's start)
            assert held.now < t and (adv.starts[1:] < t).all(), (t, adv.starts[-3:])
            # ... and the run reaches the first step boundary at or after it (or all its steps),
            # or, where it would end with an admission's prefill, that admission's arrival (a
            # run extended by requests it admits: the next test), never a time gone by
            dropped = [float(self.column("time_s")[a.rid]) for a in held.run.admissions if a not in admissions]
            assert adv.end_s >= min([t, *dropped]) or adv.k == held.run.k, (t, adv.end_s)
            assert adv.end_s >= self.env.now

    monkeypatch.setattr(ReplicaEngine, "_release", checked)
    runs = count_runs(monkeypatch)
    w = make_workload(n=200, seed=seed, rate=20, output=(1, 500), prefix_groups=3 if router == "prefix_affinity" else 0,
                      prefix_tokens=64 if router == "prefix_affinity" else 0)
    results, taken = [], []
    for hold in (False, True):
        runs[0] = 0
        cluster = Cluster(w, EngineConfig(max_model_len=8192), VectorLinearModel(), ClusterSpec(replicas=4, router=router),
                          async_scheduling=async_scheduling)
        cluster.hold_runs = hold
        results.append(cluster.run(SLO()))
        taken.append(runs[0])
    assert any(cuts) and taken[1] < taken[0]
    for a, b in zip(*(r.replicas for r in results), strict=True):
        for table in ("requests", "timeline"):
            x, y = getattr(a, table), getattr(b, table)
            for key in x:
                np.testing.assert_array_equal(y[key], x[key], err_msg=f"{table}.{key}")


@pytest.mark.parametrize(("seed", "async_scheduling", "router", "rate"), [
    (0, False, "least_outstanding", 20), (1, True, "least_outstanding", 20), (2, True, "least_outstanding", 60),
    (3, False, "power_of_two", 20), (4, True, "power_of_two", 60), (5, True, "prefix_affinity", 20)])
def test_held_runs_extended_by_the_requests_they_admit_change_no_bit(seed, async_scheduling, router, rate,
                                                                      monkeypatch):
    """A request routed to a replica whose run is held, and that the step after its arrival admits
    whole, joins the run instead of cutting it (``ReplicaEngine.extend_held``: the run's walk
    through the arrivals goes on, ``fast_forward.ArrivalWalk.extend``); at its arrival the run
    stays held where no request routed there later can cut it before that admission
    (``ReplicaEngine._held_admits``), else it is cut there as before. Each replica's tables are bit
    for bit those of runs cut by every request routed there (``Cluster.extend_held_runs`` off), in
    fewer runs. (Half the requests share prefixes for prefix_affinity: a prefix-cache lookup is no
    admission inside a run, so those still cut it.)"""
    from dataclasses import replace

    from simulator.cluster.replica import ReplicaEngine

    seen = {"extended": 0, "not extended": 0, "kept at arrival": 0, "cut at arrival": 0}
    extend, admits = ReplicaEngine._extend_held, ReplicaEngine._held_admits

    def extending(self, j):
        out = extend(self, j)
        seen["extended" if out else "not extended"] += 1
        return out

    def admitting(self, j):
        out = admits(self, j)
        seen["kept at arrival" if out else "cut at arrival"] += 1
        return out

    monkeypatch.setattr(ReplicaEngine, "_extend_held", extending)
    monkeypatch.setattr(ReplicaEngine, "_held_admits", admitting)
    runs = count_runs(monkeypatch)
    w = make_workload(n=200, seed=seed, rate=rate, output=(1, 500))
    if router == "prefix_affinity":
        shared = make_workload(n=200, seed=seed, rate=rate, output=(1, 500), prefix_groups=3, prefix_tokens=64)
        w = replace(shared, prefix_group=np.where(np.arange(200) % 2 == 0, shared.prefix_group, -1))
    results, taken = [], []
    for extend_held in (False, True):
        runs[0] = 0
        seen.update(dict.fromkeys(seen, 0))
        cluster = Cluster(w, EngineConfig(max_model_len=8192), VectorLinearModel(), ClusterSpec(replicas=4, router=router),
                          async_scheduling=async_scheduling)
        cluster.extend_held_runs = extend_held
        results.append(cluster.run(SLO()))
        taken.append(runs[0])
        if not extend_held:
            assert seen["extended"] == seen["kept at arrival"] == 0
    assert seen["extended"] > 20 and seen["kept at arrival"] > 20 and seen["cut at arrival"] > 0, seen
    assert taken[1] < 0.7 * taken[0], taken
    for a, b in zip(*(r.replicas for r in results), strict=True):
        for table in ("requests", "timeline"):
            x, y = getattr(a, table), getattr(b, table)
            for key in x:
                np.testing.assert_array_equal(y[key], x[key], err_msg=f"{table}.{key}")



@pytest.mark.parametrize(("seed", "async_scheduling", "router", "staleness", "rate"), [
    (0, False, "least_kv", 0.0, 60), (1, True, "least_kv", 0.0, 60), (2, True, "least_kv", 0.25, 20),
    (0, True, "least_kv", 0.0, None), (0, False, "least_outstanding", 0.0, 20),
    (0, True, "least_outstanding", 0.0, 20)])
def test_requests_waiting_in_a_held_run_for_their_step_change_no_bit(seed, async_scheduling, router, staleness, rate,
                                                                      monkeypatch):
    """A request that arrives at a replica whose held run admits it in a later step, where a
    request routed there later might still cut the run before that admission (bursts), stays in
    the run until the step is scheduled (``ReplicaEngine._defer``): a cut meanwhile keeps the steps
    a cut at its arrival keeps, and queues it; at the step the run stays held if no request can
    cut it before the admission then (``_settle``), else it is cut as at the arrival. Every
    decision, what the router read for it (the KV usage where it reads it), and each replica's
    tables are bit for bit those of runs cut at such an arrival (``Cluster.defer_held_admissions``
    off), in fewer runs. (``rate`` None: bursts of five arrivals, prompts with and without shared
    prefixes.)"""
    from simulator.cluster.replica import ReplicaEngine

    seen = {"kept": 0, "cut": 0}
    settle = ReplicaEngine._settle

    def settling(self, held, j):
        waiting = any(i == j for i, _ in self._deferred) and self._held is held
        settle(self, held, j)
        if waiting:
            seen["kept" if self._held is held else "cut"] += 1

    monkeypatch.setattr(ReplicaEngine, "_settle", settling)
    runs = count_runs(monkeypatch)
    w = bursty(200, seed) if rate is None else make_workload(n=200, seed=seed, rate=rate, output=(1, 500))
    results, taken, seen_by = [], [], []
    for defer in (False, True):
        runs[0] = 0
        seen.update(dict.fromkeys(seen, 0))
        cluster = Cluster(w, EngineConfig(max_model_len=8192), VectorLinearModel(),
                          ClusterSpec(replicas=3, router=router, staleness_s=staleness),
                          async_scheduling=async_scheduling)
        cluster.defer_held_admissions = defer
        decide, decisions, kv = cluster.front.router.choose, [], cluster.front.router.needs_kv

        def deciding(request, reports, decide=decide, decisions=decisions, kv=kv):
            index = decide(request, reports)
            decisions.append((request.rid, index, tuple((r.kv_usage if kv else 0, r.outstanding) for r in reports)))
            return index

        cluster.front.router.choose = deciding
        results.append(cluster.run(SLO()))
        taken.append(runs[0])
        seen_by.append(decisions)
        if not defer:
            assert seen == {"kept": 0, "cut": 0}
    assert seen_by[1] == seen_by[0] and len(seen_by[0]) == len(w)
    for a, b in zip(*(r.replicas for r in results), strict=True):
        for table in ("requests", "timeline"):
            x, y = getattr(a, table), getattr(b, table)
            for key in x:
                np.testing.assert_array_equal(y[key], x[key], err_msg=f"{table}.{key}")
    assert seen["kept"] > 0 and seen["cut"] > 0, seen
    assert taken[1] < taken[0], taken


@pytest.mark.parametrize(("seed", "async_scheduling", "staleness", "shared"), [
    (0, False, 0.0, False), (1, True, 0.0, False), (2, True, 0.25, True), (3, False, 0.25, True),
    (4, True, 0.0, True)])
def test_least_kv_replicas_hold_runs_whose_kv_reports_come_from_their_plans(seed, async_scheduling, staleness,
                                                                           shared, monkeypatch):
    """A router reading KV usage (least_kv) lets the replicas hold and extend runs too
    (``Cluster.hold_kv_runs``): a held run's report reads the KV blocks used after its last step
    that ended before the report from the run's plan (``ReplicaEngine._held_rows``: blocks taken
    as members cross block boundaries and at admissions, those of each member finishing freed at
    its last output, a block held together with its last holder; rows before an admission that
    extended the run from those worked out before it, ``_keep_rows``), a run applied and not
    logged yet from its rows. Every KV usage reported equals that of the replica's final timeline at
    the report's time; every decision, what the router read for it, and each replica's tables are
    bit for bit those of runs ended before every arrival (``hold_kv_runs`` off), in fewer runs,
    with requests arriving at a held run that admits them later kept in it until their step or not
    (``defer_held_admissions``). (Half the requests share prefixes where ``shared``: blocks held
    together.)"""
    from dataclasses import replace

    from simulator.cluster.replica import ReplicaEngine

    answers = []
    kv_before = ReplicaEngine._kv_before

    def recording(self, view_s):
        held = self._held is not None and view_s > self._held.now
        stale = held and self._held.rows is None and view_s <= self._held.stale_until
        used = kv_before(self, view_s)
        source = "stale" if stale else "held" if held else "unlogged" if self._unlogged is not None else "log"
        answers.append((self, view_s, used, source))
        return used

    monkeypatch.setattr(ReplicaEngine, "_kv_before", recording)
    runs = count_runs(monkeypatch)
    w = make_workload(n=200, seed=seed, rate=20, output=(1, 500))
    if shared:
        s = make_workload(n=200, seed=seed, rate=20, output=(1, 500), prefix_groups=3, prefix_tokens=64)
        w = replace(s, prefix_group=np.where(np.arange(200) % 2 == 0, s.prefix_group, -1))
    results, taken, seen_by, sources = [], [], [], []
    for hold, defer in ((False, True), (True, False), (True, True)):
        runs[0] = 0
        answers.clear()
        cluster = Cluster(w, EngineConfig(max_model_len=8192), VectorLinearModel(),
                          ClusterSpec(replicas=4, router="least_kv", staleness_s=staleness),
                          async_scheduling=async_scheduling)
        cluster.hold_kv_runs, cluster.defer_held_admissions = hold, defer
        router = cluster.front.router
        choose, seen = router.choose, []

        def deciding(request, reports, choose=choose, seen=seen):
            index = choose(request, reports)
            seen.append((request.rid, index, tuple((r.kv_usage, r.outstanding) for r in reports)))
            return index

        router.choose = deciding
        results.append(cluster.run(SLO()))
        taken.append(runs[0])
        seen_by.append(seen)
        steps = {id(r): r.steps.columns() for r in cluster.replicas}
        for replica, view_s, used, _ in answers:
            log = steps[id(replica)]
            i = int(np.searchsorted(log["end_s"], view_s, side="left"))
            assert used == (int(log["kv_blocks_used"][i - 1]) if i else 0), (view_s, used)
        sources += [source for *_, source in answers] if hold else []
    assert sources.count("held") > 100 and sources.count("unlogged") > 0, sources.count("held")
    assert sources.count("stale") > 0
    assert taken[2] <= taken[1] < 0.6 * taken[0], taken
    assert seen_by[2] == seen_by[1] == seen_by[0] and len(seen_by[0]) == len(w)
    for other in results[1:]:
        for a, b in zip(results[0].replicas, other.replicas, strict=True):
            for table in ("requests", "timeline"):
                x, y = getattr(a, table), getattr(b, table)
                for key in x:
                    np.testing.assert_array_equal(y[key], x[key], err_msg=f"{table}.{key}")


@pytest.mark.parametrize(("seed", "async_scheduling", "router"), [
    (0, False, "least_outstanding"), (1, True, "least_outstanding"), (2, False, "least_outstanding"),
    (3, True, "least_outstanding"), (0, False, "power_of_two"), (1, True, "power_of_two"),
    (2, False, "prefix_affinity"), (0, True, "prefix_affinity"), (3, True, "prefix_affinity"),
    (3, False, "all_prefix_affinity")])
def test_runs_taken_from_the_foreseen_plans_change_no_bit(seed, async_scheduling, router):
    """Each replica's tables are bit for bit those of the cluster deciding at the arrival times,
    when the runs are cut from the plans made as if no more requests came (``ClusterRuns``),
    admissions inside them included (arrivals close together), and go past arrivals the
    replica cannot get (``Router.first_may_get``: least_outstanding's bounds, power_of_two's
    draws; half the requests share prefixes for prefix_affinity, all for all_prefix_affinity).
    Seed 3 with prefixes: a run ends at a time SimPy's clock cannot reach from the run's start
    by a delay (``simulator.engine.loop.ExactEnvironment.timeout_at``)."""
    w = make_workload(n=200, seed=seed, rate=20, output=(1, 500))
    if router == "all_prefix_affinity":
        router = "prefix_affinity"
        w = make_workload(n=200, seed=seed, rate=20, output=(1, 500), prefix_groups=3, prefix_tokens=64)
    elif router == "prefix_affinity":
        from dataclasses import replace

        shared = make_workload(n=200, seed=seed, rate=20, output=(1, 500), prefix_groups=3, prefix_tokens=64)
        w = replace(shared, prefix_group=np.where(np.arange(200) % 2 == 0, shared.prefix_group, -1))
    cfg = EngineConfig(max_model_len=8192)
    spec = ClusterSpec(replicas=4, router=router)

    def run(ahead: bool):
        cluster = Cluster(w, cfg, VectorLinearModel(), spec, async_scheduling=async_scheduling)
        cluster.ahead = ahead
        return cluster.run(SLO())

    at_time, ahead = run(False), run(True)
    for a, b in zip(at_time.replicas, ahead.replicas, strict=True):
        for table in ("requests", "timeline"):
            x, y = getattr(a, table), getattr(b, table)
            for key in x:
                np.testing.assert_array_equal(y[key], x[key], err_msg=f"{table}.{key}")


class LeastOutstandingByDefault(Router):
    """least_outstanding's choice, without its ``first_may_get``: the default (it may get any)."""

    name = "least_outstanding_by_default"

    def choose(self, request, reports):
        return min(reports, key=lambda r: (r.outstanding, r.index)).index


def test_a_router_opts_in_to_runs_past_arrivals_by_first_may_get(monkeypatch):
    """A router that does not implement ``Router.first_may_get`` makes every replica's runs stop
    at the next arrival not routed yet, and gives the same tables bit for bit as
    least_outstanding, which implements it and whose runs go past arrivals: fewer runs."""
    monkeypatch.setitem(ROUTERS, LeastOutstandingByDefault.name, LeastOutstandingByDefault)
    known_until = Cluster._front_known_until
    passed = {}  # router -> how often a replica's arrivals were known past the next one

    def spy(self, now, index=None):
        until = known_until(self, now, index)
        g = self._next_unrouted
        if index is not None and g < len(self.workload):
            name = self.spec.router
            passed[name] = passed.get(name, 0) + (until > float(self.workload.arrival_s[g]))
        return until

    monkeypatch.setattr(Cluster, "_front_known_until", spy)
    runs = count_runs(monkeypatch)
    w = make_workload(n=200, seed=0, rate=20, output=(1, 500))
    results, taken = {}, {}
    for router in ("least_outstanding", LeastOutstandingByDefault.name):
        runs[0] = 0
        cluster = Cluster(w, EngineConfig(max_model_len=8192), VectorLinearModel(),
                          ClusterSpec(replicas=4, router=router))
        cluster.hold_runs = False  # (a run held goes past arrivals whatever the router)
        results[router], taken[router] = cluster.run(SLO()), runs[0]
    assert passed[LeastOutstandingByDefault.name] == 0 < passed["least_outstanding"]
    assert taken["least_outstanding"] < taken[LeastOutstandingByDefault.name]
    for a, b in zip(results["least_outstanding"].replicas, results[LeastOutstandingByDefault.name].replicas,
                    strict=True):
        for table in ("requests", "timeline"):
            x, y = getattr(a, table), getattr(b, table)
            for key in x:
                np.testing.assert_array_equal(y[key], x[key], err_msg=f"{table}.{key}")


def with_timeouts(w, seconds: float, patient: int = 0):
    """``w`` with every client giving up ``seconds`` after its arrival, but the last ``patient``."""
    from dataclasses import replace

    timeouts = np.full(len(w), seconds)
    if patient:
        timeouts[len(w) - patient:] = np.inf
    return replace(w, timeout_s=timeouts)


@pytest.mark.parametrize("router", ["round_robin", "least_outstanding"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_one_replica_with_client_timeouts_is_the_plain_engine(router, async_scheduling):
    w = with_timeouts(make_workload(n=120, seed=5, rate=6, output=(1, 2000)), 20.0)
    cfg = EngineConfig(num_gpu_blocks_override=400, max_model_len=8192)
    plain = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling)
    assert 0 < plain.summary["aborted"] < len(w)  # the case covers aborts
    cluster = Cluster(w, cfg, VectorLinearModel(), ClusterSpec(replicas=1, router=router),
                      async_scheduling=async_scheduling).run(SLO())
    assert_same(plain, type(plain)({k: v for k, v in cluster.result.requests.items() if k != "replica"},
                                   {k: v for k, v in cluster.result.timeline.items() if k != "replica"}, {}))


@pytest.mark.parametrize("router", ["least_outstanding", "power_of_two", "least_kv"])
def test_client_timeouts_abort_in_a_cluster_and_deciding_ahead_changes_nothing(router):
    """Aborts free the replica and count as finished for the router; an arrival routed ahead of
    its time (aborts bound when a replica's next report can change) is routed as at its time."""
    # (long outputs: without aborts bounding a replica's next finish, routing ahead differs here)
    w = with_timeouts(make_workload(n=150, seed=8, rate=10, output=(200, 2000)), 10.0)
    cfg = EngineConfig(num_gpu_blocks_override=400, max_model_len=8192)

    def run(ahead: bool):
        cluster = Cluster(w, cfg, VectorLinearModel(), ClusterSpec(replicas=2, router=router))
        cluster.ahead = ahead
        out = cluster.run(SLO()).result
        # every request, aborted ones too, has ended for the router
        assert [r.report(math.inf, i).outstanding for i, r in enumerate(cluster.replicas)] == [0, 0]
        return out

    out = run(True)
    requests = out.requests
    aborted = requests["status"] == "aborted"
    assert 0 < aborted.sum() < len(w)
    assert out.summary["aborted"] == aborted.sum() == sum(r["aborted"] for r in out.summary["replicas"])
    # aborted at the first step boundary from the deadline, not before
    assert np.all(requests["finish_s"][aborted] >= requests["arrival_s"][aborted] + 10.0)
    assert_same(run(False), out)


@pytest.mark.parametrize(("router", "async_scheduling"), [("least_kv", True), ("least_outstanding", False),
                                                      ("power_of_two", True)])
def test_a_held_run_going_on_past_the_steps_it_timed_changes_no_bit(router, async_scheduling, monkeypatch):
    """A run held to the end of the steps its walk timed (512 past its latest admission) goes on,
    timing as many again, instead of being applied there and planned anew (``ReplicaEngine._go_on``):
    every decision and each replica's tables are bit for bit those without it, in fewer runs."""
    from simulator.cluster.replica import ReplicaEngine

    went_on = [0]
    go_on = ReplicaEngine._go_on

    def going_on(self, held, end_s):
        k = held.run.k
        go_on(self, held, end_s)
        went_on[0] += self._held is held and held.run.k > k

    monkeypatch.setattr(ReplicaEngine, "_go_on", going_on)
    runs = count_runs(monkeypatch)
    w = make_workload(n=300, seed=4, rate=8, output=(200, 2000))
    results, taken, decided = [], [], []
    for on in (False, True):
        runs[0] = went_on[0] = 0
        cluster = Cluster(w, EngineConfig(max_model_len=8192), VectorLinearModel(),
                          ClusterSpec(replicas=3, router=router), async_scheduling=async_scheduling)
        cluster.go_on_held_runs = on
        decide, decisions = cluster.front.router.choose, []
        cluster.front.router.choose = lambda request, reports, decide=decide, decisions=decisions: (
            decisions.append((request.rid, tuple((r.kv_usage, r.outstanding) for r in reports)))
            or decide(request, reports))
        results.append(cluster.run(SLO()))
        taken.append(runs[0])
        decided.append(decisions)
        assert (went_on[0] > 0) == on
    assert repr(decided[1]) == repr(decided[0])  # (nan KV usage where a router reads none)
    for a, b in zip(*(r.replicas for r in results), strict=True):
        for table in ("requests", "timeline"):
            x, y = getattr(a, table), getattr(b, table)
            for key in x:
                np.testing.assert_array_equal(y[key], x[key], err_msg=f"{table}.{key}")
    assert taken[1] < taken[0], taken


def test_blocks_every_bs_steps_counted_by_step_are_those_listed_one_by_one():
    """``every_bs_steps`` (a held run's blocks per step, from each member's first block and count)
    against the blocks listed one by one, for random members, block sizes and run lengths."""
    from simulator.cluster.replica import every_bs_steps

    rng = np.random.default_rng(0)
    for _ in range(500):
        m, bs, k = int(rng.integers(1, 40)), int(rng.choice([1, 2, 16, 128])), int(rng.integers(1, 2000))
        first = rng.integers(1, k + 1, m)
        count = np.maximum((np.minimum(rng.integers(0, k + 50, m), k) - first) // bs + 1, 0)
        listed = [f + bs * r for f, c in zip(first.tolist(), count.tolist(), strict=True) for r in range(c)]
        np.testing.assert_array_equal(every_bs_steps(first, count, bs, k), np.bincount(
            np.array(listed, dtype=np.int64) - 1, minlength=k))


def test_the_progress_bar_counts_a_held_runs_finishes_as_the_clock_passes_them():
    """A run held (applied only when it ends or a request cuts it) reports its finishes late; the
    progress bar still counts, at every arrival, at least the requests that ended before it."""
    w = make_workload(n=300, seed=4, rate=8, output=(200, 2000))
    cluster = Cluster(w, EngineConfig(max_model_len=8192), VectorLinearModel(),
                      ClusterSpec(replicas=3, router="least_outstanding"))
    shown, samples = [0], []
    cluster.on_progress = lambda n: shown.__setitem__(0, shown[0] + n)
    show = cluster._show_progress
    cluster._show_progress = lambda: (show(), samples.append((cluster.env.now, shown[0])))
    out = cluster.run(SLO()).result
    finish = np.sort(out.requests["finish_s"])
    assert shown[0] == len(w) and len(samples) > 100
    lags = [int(np.searchsorted(finish, now, side="left")) - count for now, count in samples]
    assert max(lags) <= 0  # (without the count as the clock passes: up to dozens behind)


def test_a_stopped_cluster_returns_what_it_simulated():
    w = make_workload(n=300, seed=4, rate=8, output=(200, 2000))
    cfg = EngineConfig(max_model_len=8192)
    spec = ClusterSpec(replicas=3, router="least_outstanding")
    full = simulate_cluster(w, cfg, VectorLinearModel(), spec).result
    cluster = Cluster(w, cfg, VectorLinearModel(), spec)
    # stop once a third of the requests have ended, as Ctrl-C would (tests/.../test_cluster_cli.py)
    ended = []
    cluster.on_progress = lambda n: (ended.append(n), len(ended) == 100 and cluster.request_stop())
    out = cluster.run(SLO()).result
    partial = out.summary["partial"]
    status = out.requests["status"]
    assert partial["not_arrived"] > 0 and len(status) == len(w) - partial["not_arrived"]
    assert (status == "unfinished").sum() == partial["unfinished"] > 0
    assert out.requests["arrival_s"].max() <= partial["interrupted_at_s"] < full.summary["duration_s"]
    # what finished before the stop finished as in the full run
    done = out.requests["request_id"][status == "completed"]
    np.testing.assert_array_equal(out.requests["e2e_s"][status == "completed"], full.requests["e2e_s"][done])


def test_each_replica_reports_its_shape_cache_as_a_single_run_does():
    """A model with a shape cache: each replica's summary holds its misses and seconds, as the
    single run of its requests reports them."""
    from simulator.records.performance import ShapeCacheCost

    w = make_workload(n=60, seed=4, rate=4, prompt=(16, 400), output=(20, 200))
    cfg = EngineConfig(num_gpu_blocks_override=300, max_num_seqs=32)
    model = VectorLinearModel()
    model.shape_cache = ShapeCacheCost(capacity=8, per_miss_s=0.003, per_miss_token_s=2e-5)
    out = simulate_cluster(w, cfg, model, ClusterSpec(replicas=2, router="round_robin"))
    for index, replica in enumerate(out.replicas):
        ids = out.result.requests["request_id"][out.result.requests["replica"] == index]
        alone = simulate(w.select(ids), cfg, model, seed=index).summary["shape_cache"]
        assert replica.summary["shape_cache"] == alone and alone["misses"] > 0
        assert out.result.summary["replicas"][index]["shape_cache"] == alone
    plain = simulate_cluster(w, cfg, VectorLinearModel(), ClusterSpec(replicas=2, router="round_robin"))
    assert all("shape_cache" not in r for r in plain.result.summary["replicas"])


def bursty(n: int, seed: int):
    """Bursts of five arrivals within 20 ms, about 1.5 s apart; outputs short and long, prompts
    with a shared prefix (three groups) or none."""
    from dataclasses import replace

    w = make_workload(n=n, seed=seed, rate=4, output=(1, 600), prefix_groups=3, prefix_tokens=64)
    rng = np.random.default_rng(seed)
    starts = np.cumsum(rng.exponential(1.5, -(-n // 5)))
    arrival = np.sort(np.repeat(starts, 5)[:n] + rng.uniform(0, 0.02, n))
    group = np.where(rng.uniform(size=n) < 0.5, w.prefix_group, -1)
    return replace(w, arrival_s=arrival, prefix_group=group)


@pytest.mark.parametrize("router", ["least_outstanding", "power_of_two", "prefix_affinity"])
@pytest.mark.parametrize(("async_scheduling", "staleness"), [(False, 0.0), (True, 0.0), (True, 0.25)])
def test_every_decision_and_what_the_router_saw_equal_the_step_by_step_clusters(router, async_scheduling,
                                                                                staleness):
    """Each request's replica and the outstanding counts the router read for it are those of the
    step-by-step cluster deciding at the arrival times, whatever the fast path's runs and the
    look-ahead decide ahead of time (bursty arrivals, short and long outputs)."""
    w = bursty(160, seed=11)
    cfg = EngineConfig(num_gpu_blocks_override=400, max_model_len=8192)
    spec = ClusterSpec(replicas=4, router=router, staleness_s=staleness)

    def run(fast: bool):
        cluster = Cluster(w, cfg, VectorLinearModel(), spec, fast=fast, async_scheduling=async_scheduling)
        cluster.ahead = fast
        router_ = cluster.front.router
        choose, seen = router_.choose, []

        def recording(request, reports):
            index = choose(request, reports)
            seen.append((request.rid, index, tuple(r.outstanding for r in reports)))
            return index

        router_.choose = recording
        return seen, cluster.run(SLO()).result

    slow_seen, slow = run(False)
    fast_seen, fast = run(True)
    assert fast_seen == slow_seen and len(slow_seen) == len(w)
    assert_same(slow, fast)
