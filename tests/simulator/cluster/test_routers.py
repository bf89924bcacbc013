"""Routers: the registry, and what load- and prefix-aware routing buys over round robin."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.cluster import ROUTERS, ClusterSpec, simulate_cluster
from simulator.cluster.router import ReplicaReport, RouteRequest, make_router
from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError
from simulator.records.workload import Workload
from tests.simulator.conftest import VectorLinearModel, make_workload


def bursty_workload(n: int = 240, seed: int = 0) -> Workload:
    """Bursts of 12 requests every 6 s; a fifth of them reason for thousands of tokens."""
    rng = np.random.default_rng(seed)
    arrivals = np.sort(np.repeat(np.arange(n // 12) * 6.0, 12) + rng.uniform(0, 0.2, n))
    out = np.where(rng.random(n) < 0.2, rng.integers(2000, 4000, n), rng.integers(50, 300, n))
    return Workload(arrival_s=arrivals, prompt_tokens=rng.integers(100, 1500, n), output_tokens=out,
                    reasoning_tokens=out // 2, domain=np.full(n, "math", object))


def test_every_router_is_registered_by_name():
    assert list(ROUTERS) == ["round_robin", "least_outstanding", "least_kv", "prefix_affinity", "power_of_two"]
    for name in ROUTERS:
        assert make_router(name, 3).name == name


def test_unknown_router_names_the_field_and_the_choices():
    with pytest.raises(ConfigError) as err:
        ClusterSpec.from_dict({"replicas": 2, "router": "fastest"})
    message = str(err.value)
    assert message.startswith("cluster.router: unknown router 'fastest'") and "\n" not in message
    assert all(name in message for name in ROUTERS)


@pytest.mark.parametrize(("data", "field"), [
    ({"replicas": 0}, "cluster.replicas"),
    ({"staleness_s": -1}, "cluster.staleness_s"),
    ({"prefill_replicas": 2}, "cluster.decode_replicas"),
    ({"link_gbps": 0}, "cluster.link_gbps"),
    ({"replica": 2}, "cluster"),
])
def test_bad_cluster_settings_name_their_field(data, field):
    with pytest.raises(ConfigError) as err:
        ClusterSpec.from_dict(data)
    assert err.value.field == field


def test_routers_choose_from_the_reports():
    request = RouteRequest(0, 0.0, 100, 3, 64)
    reports = [ReplicaReport(0, 5, 0.1), ReplicaReport(1, 2, 0.9), ReplicaReport(2, 4, 0.5)]
    assert make_router("least_outstanding", 3).choose(request, reports) == 1
    assert make_router("least_kv", 3).choose(request, reports) == 0
    affinity = make_router("prefix_affinity", 3, load_cap=3)
    affinity.sent(request, 2)  # replica 2 now holds group 3's prefix
    assert affinity.choose(request, reports) == 2
    affinity = make_router("prefix_affinity", 3, load_cap=1)
    affinity.sent(request, 2)  # ... but is 2 over the least loaded: the cap wins
    assert affinity.choose(request, reports) == 1


def test_power_of_two_is_seeded():
    reports = [ReplicaReport(i, 0, 0.0) for i in range(8)]
    request = RouteRequest(0, 0.0, 10, -1, 0)

    def picks(seed):
        router = make_router("power_of_two", 8, seed=seed)
        return [router.choose(request, reports) for _ in range(50)]

    assert picks(1) == picks(1)
    assert picks(1) != picks(2)


def test_power_of_two_foresees_the_replicas_it_draws():
    # the two replicas it may choose for each coming request, drawn ahead on a copy of its
    # generator: the choice is always one of them, and looking ahead changes no choice
    rng = np.random.default_rng(4)
    peeking, plain = make_router("power_of_two", 5, seed=3), make_router("power_of_two", 5, seed=3)
    request = RouteRequest(0, 0.0, 100, -1, 0)
    for _ in range(60):
        ahead = int(rng.integers(0, 6))
        drawn = [[r for r in range(5) if peeking.may_choose(r, a)] for a in range(ahead + 1)]
        assert all(len(pair) == 2 for pair in drawn)
        for pair in drawn:
            reports = [ReplicaReport(i, int(n), 0.0) for i, n in enumerate(rng.integers(0, 4, 5))]
            chosen = peeking.choose(request, reports)
            assert chosen == plain.choose(request, reports) and chosen in pair


class FakeOutlook:
    """``router.Outlook`` from lists: the own count at each arrival, the others' bounds, and
    which arrivals share a prefix."""

    def __init__(self, own, others, prefixed=()):
        self.own_counts, self.bounds, self.prefixed = own, others, set(prefixed)

    def __len__(self):
        return len(self.own_counts)

    def request(self, k):
        return RouteRequest(k, float(k), 100, 0 if k in self.prefixed else -1, 64 if k in self.prefixed else 0)

    def own(self, k):
        return self.own_counts[k]

    def others(self):
        return list(self.bounds)


def test_least_outstanding_knows_the_first_arrival_a_replica_may_get():
    # replica 1 has 5 outstanding; the others at most 2 and 3: arrivals fill them to 5 and 5
    # first (the water rises over the lowest), so it may get the 6th (k = 5) at the earliest
    router = make_router("least_outstanding", 3)
    assert router.first_may_get(1, FakeOutlook([5] * 8, [(2, 0), (3, 2)])) == 5
    # ties go to the lower index: replica 0 may get the next at once, replica 2 only the second
    # (the first may go to replica 0 at 3)
    assert router.first_may_get(0, FakeOutlook([3] * 4, [(3, 1), (3, 2)])) == 0
    assert router.first_may_get(2, FakeOutlook([3] * 4, [(3, 0), (3, 1)])) == 1
    # its own count not known (None) ends the look through; none past it: len
    assert router.first_may_get(1, FakeOutlook([9, 9, None, 9], [(0, 0), (0, 2)])) == 2
    assert router.first_may_get(1, FakeOutlook([9] * 3, [(0, 0), (0, 2)])) == 3
    # prefix_affinity: the same for requests without a shared prefix, up to one with a prefix
    affinity = make_router("prefix_affinity", 3)
    assert affinity.first_may_get(1, FakeOutlook([5] * 8, [(2, 0), (3, 2)])) == 5
    assert affinity.first_may_get(1, FakeOutlook([5] * 8, [(2, 0), (3, 2)], prefixed=[3])) == 3
    # a router without the rule: it may get the next one
    assert make_router("least_kv", 3).first_may_get(1, FakeOutlook([5] * 8, [(2, 0), (3, 2)])) == 0


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2), st.lists(st.integers(0, 4), min_size=3, max_size=3),
       st.lists(st.integers(0, 2), min_size=1, max_size=8))
def test_least_outstanding_never_rules_out_an_arrival_it_may_get(replica, counts, drops):
    # every count the others may have (at most their bounds), the replica's own count falling
    # by its finishes: the arrivals before first_may_get all go elsewhere
    router = make_router("least_outstanding", 3)
    own = np.maximum(counts[replica] - np.cumsum(drops), 0).tolist()
    bounds = [(counts[i], i) for i in range(3) if i != replica]
    first = router.first_may_get(replica, FakeOutlook(own, bounds))
    request = RouteRequest(0, 0.0, 100, -1, 0)
    for actual in itertools.product(*(range(b + 1) for b, _ in bounds)):
        load = dict(zip([i for _, i in bounds], actual, strict=True))
        for k in range(first):
            load[replica] = own[k]
            chosen = router.choose(request, [ReplicaReport(i, load[i], 0.0) for i in range(3)])
            assert chosen != replica, (actual, k, first)
            load[chosen] += 1


def test_least_outstanding_tail_ttft_no_worse_than_round_robin_on_bursts():
    w = bursty_workload()
    cfg = EngineConfig(max_num_seqs=4, max_model_len=8192)
    p99 = {router: simulate_cluster(w, cfg, VectorLinearModel(), ClusterSpec(replicas=4, router=router))
           .result.summary["ttft_s"]["p99"] for router in ("round_robin", "least_outstanding")}
    assert p99["least_outstanding"] <= p99["round_robin"]


def test_prefix_affinity_raises_the_prefix_cache_hit_rate():
    w = make_workload(n=300, seed=1, rate=4, prompt=(1100, 1600), output=(20, 400), prefix_groups=8,
                      prefix_tokens=1024)
    cfg = EngineConfig(max_model_len=8192, num_gpu_blocks_override=2000)
    rate = {}
    for router in ("round_robin", "prefix_affinity"):
        summary = simulate_cluster(w, cfg, VectorLinearModel(), ClusterSpec(replicas=4, router=router)).result.summary
        assert summary["prefix_cache"]["queried_tokens"] == int(w.prompt_tokens.sum())
        rate[router] = summary["prefix_cache"]["hit_rate"]
    assert rate["prefix_affinity"] > rate["round_robin"]


def test_stale_reports_change_least_kv_decisions():
    w = bursty_workload(n=120, seed=2)
    cfg = EngineConfig(max_num_seqs=4, max_model_len=8192)

    def routes(staleness):
        out = simulate_cluster(w, cfg, VectorLinearModel(), ClusterSpec(replicas=3, router="least_kv",
                                                                         staleness_s=staleness))
        return out.result.requests["replica"]

    assert np.array_equal(routes(0.0), routes(0.0))
    assert not np.array_equal(routes(0.0), routes(5.0))
