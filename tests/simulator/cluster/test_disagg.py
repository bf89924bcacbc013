"""Prefill/decode disaggregation: the KV transfer is timed from bytes and bandwidth, and TTFT
holds prefill, transfer and the decode replica's first step."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.cluster import ClusterSpec, simulate_cluster
from simulator.records.engine_config import EngineConfig
from simulator.records.performance import StepBatch
from simulator.records.workload import Workload
from tests.simulator.cluster.test_cluster import assert_same
from tests.simulator.conftest import VectorLinearModel, make_workload

PROMPT = 16 * 16 + 1  # sixteen full KV blocks and one token


def one_request(output: int = 5) -> Workload:
    return Workload(arrival_s=[1.0], prompt_tokens=[PROMPT], output_tokens=[output], reasoning_tokens=[0],
                    domain=np.array(["math"], object))


def disaggregated(workload, link_gbps, **kwargs):
    spec = ClusterSpec(prefill_replicas=1, decode_replicas=1, link_gbps=link_gbps)
    return simulate_cluster(workload, EngineConfig(max_model_len=4096), VectorLinearModel(), spec,
                            async_scheduling=False, **kwargs)


def test_ttft_is_prefill_plus_transfer_plus_the_first_decode_step():
    model = VectorLinearModel()
    link_gbps = 0.001  # 1 MB/s: a slow link, so the transfer shows
    out = disaggregated(one_request(), link_gbps)
    row = {k: v[0] for k, v in out.result.requests.items()}
    transfer = PROMPT * model.kv_bytes / (link_gbps * 1e9)  # bytes / (bytes per second)
    assert row["kv_transfer_s"] == pytest.approx(transfer, rel=1e-12)
    prefill = model.step_time(StepBatch(prefill_tokens=[PROMPT], prefill_context=[0]))
    # the decode replica finds the transferred blocks and computes the last prompt token only
    first_decode = model.step_time(StepBatch(decode_context=[PROMPT], decode_spec_tokens=[0]))
    assert row["ttft_s"] == pytest.approx(prefill + transfer + first_decode, rel=1e-12)
    assert (row["prefill_replica"], row["replica"], row["status"]) == (0, 1, "completed")
    decode_steps = out.result.timeline["replica"] == 1
    assert out.result.timeline["prefill_tokens"][decode_steps].sum() == 0


def test_a_slower_link_adds_its_extra_transfer_time_to_ttft():
    fast, slow = (disaggregated(one_request(), gbps).result.requests for gbps in (0.002, 0.001))
    extra = slow["kv_transfer_s"][0] - fast["kv_transfer_s"][0]
    assert extra > 0
    assert slow["ttft_s"][0] - fast["ttft_s"][0] == pytest.approx(extra, rel=1e-9)
    assert slow["tpot_s"][0] == pytest.approx(fast["tpot_s"][0], rel=1e-12)  # decoding is unchanged


@pytest.mark.parametrize(("router", "staleness", "async_scheduling"), [
    ("least_outstanding", 0.0, False), ("least_outstanding", 0.0, True), ("round_robin", 0.3, True)])
def test_disaggregated_fast_path_equals_step_by_step(router, staleness, async_scheduling):
    w = make_workload(n=120, seed=4, rate=6, output=(1, 1500), prefix_groups=2, prefix_tokens=64)
    spec = ClusterSpec(prefill_replicas=2, decode_replicas=2, router=router, staleness_s=staleness, link_gbps=0.5)
    cfg = EngineConfig(max_model_len=8192, num_gpu_blocks_override=700)
    slow, fast = (simulate_cluster(w, cfg, VectorLinearModel(), spec, fast=f, async_scheduling=async_scheduling)
                  for f in (False, True))
    assert_same(slow.result, fast.result)
    requests = fast.result.requests
    assert (requests["status"] == "completed").all()
    assert set(requests["replica"].tolist()) == {2, 3} and set(requests["prefill_replica"].tolist()) == {0, 1}
    assert (requests["ttft_s"] > requests["kv_transfer_s"]).all()


def test_disaggregated_decisions_ahead_of_time_change_nothing():
    from simulator.cluster.cluster import Cluster
    from simulator.records.metrics import SLO

    w = make_workload(n=120, seed=5, rate=6, output=(1, 1500))
    spec = ClusterSpec(prefill_replicas=2, decode_replicas=2, router="power_of_two", link_gbps=0.5)

    def run(ahead: bool):
        cluster = Cluster(w, EngineConfig(max_model_len=8192, num_gpu_blocks_override=700), VectorLinearModel(), spec)
        cluster.ahead = ahead
        return cluster.run(SLO()).result

    assert_same(run(False), run(True))


def test_client_timeouts_count_from_the_arrival_at_the_cluster():
    """A request whose client gives up while in the decode pool is aborted there; the deadline
    counts from the arrival at the cluster, not at the decode replica."""
    from dataclasses import replace

    w = make_workload(n=120, seed=2, rate=8, output=(1, 2000))
    w = replace(w, timeout_s=np.full(len(w), 10.0))
    spec = ClusterSpec(prefill_replicas=1, decode_replicas=1, link_gbps=10.0)
    out = simulate_cluster(w, EngineConfig(num_gpu_blocks_override=400, max_model_len=8192), VectorLinearModel(),
                           spec).result
    requests = out.requests
    aborted = requests["status"] == "aborted"
    assert aborted.sum() > 0 and out.summary["aborted"] == aborted.sum()
    assert np.all(requests["finish_s"][aborted] >= requests["arrival_s"][aborted] + 10.0)
    completed = requests["status"] == "completed"
    assert np.all(requests["e2e_s"][completed] < 10.0 + 1.0)  # (within a step of the deadline)


def test_a_stopped_disaggregated_run_marks_requests_in_transfer_unfinished():
    from simulator.cluster.cluster import Cluster
    from simulator.records.metrics import SLO

    w = make_workload(n=200, seed=3, rate=8, output=(100, 1500))
    spec = ClusterSpec(prefill_replicas=1, decode_replicas=2, link_gbps=0.0005)  # a slow link (~1 s): KV in flight
    cluster = Cluster(w, EngineConfig(max_model_len=8192), VectorLinearModel(), spec)
    ended = []
    cluster.on_progress = lambda n: (ended.append(n), len(ended) == 40 and cluster.request_stop())
    out = cluster.run(SLO()).result
    partial, requests = out.summary["partial"], out.requests
    assert len(requests["request_id"]) == len(w) - partial["not_arrived"] < len(w)
    np.testing.assert_array_equal(requests["request_id"], np.sort(requests["request_id"]))
    unfinished = requests["status"] == "unfinished"
    assert unfinished.sum() == partial["unfinished"] > 0
    in_transfer = unfinished & (requests["replica"] == requests["prefill_replica"])
    assert in_transfer.any() and np.all(np.isnan(requests["ttft_s"][in_transfer]))
    assert out.summary["completed"] == int((requests["status"] == "completed").sum()) > 0
