"""Data-parallel lock-step (simulator.cluster.lockstep): the ranks' steps start together and last
as long as the slowest rank's; an idle rank runs dummy batches while another is busy, none when
all are idle; with the option off a cluster's results are today's; a bad value is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulator.cluster import ClusterSpec, simulate_cluster
from simulator.cluster.cluster import data_parallel_ranks
from simulator.records.engine_config import EngineConfig
from simulator.records.performance import StepBatch
from simulator.records.workload import Workload
from tests.simulator.cluster.test_cluster import assert_same
from tests.simulator.conftest import LinearModel, make_workload
from tests.simulator.test_cli import run_cli

CFG = EngineConfig(max_num_batched_tokens=512, max_num_seqs=64, max_model_len=8192, num_gpu_blocks_override=1000)


def two_requests(arrival: tuple[float, float], prompt: tuple[int, int], output: tuple[int, int]) -> Workload:
    """Request 0 goes to rank 0, request 1 to rank 1 (round robin)."""
    return Workload(arrival_s=np.array(arrival, float), prompt_tokens=np.array(prompt),
                    output_tokens=np.array(output), reasoning_tokens=np.zeros(2, np.int64),
                    domain=np.full(2, "chat", object))


def run(w: Workload, lockstep: bool, async_scheduling: bool):
    return simulate_cluster(w, CFG, LinearModel(), ClusterSpec(replicas=2, lockstep=lockstep),
                            async_scheduling=async_scheduling)


def rank_steps(result, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A rank's step end times and durations."""
    mine = result.timeline["replica"] == rank
    return result.timeline["time_s"][mine], result.timeline["step_time_s"][mine]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_decoding_rank_steps_as_long_as_the_other_ranks_prefill(async_scheduling):
    # rank 0 decodes one request for ~1.6 s; rank 1 prefills 4,096 tokens in 8 chunks of 512 from 0.5 s
    w = two_requests((0.0, 0.5), (16, 4096), (400, 1))
    prefill_s = LinearModel().step_time(StepBatch(prefill_tokens=[512], prefill_context=[0]))
    locked = run(w, True, async_scheduling).result
    end1, step1 = rank_steps(locked, 1)
    end0, step0 = rank_steps(locked, 0)
    np.testing.assert_allclose(step1, prefill_s)
    together = np.isin(end0, end1)
    assert together.sum() == len(end1) == 8  # each prefill step ends with one of rank 0's steps ...
    np.testing.assert_allclose(step0[together], prefill_s)  # ... stretched to the prefill's duration
    assert step0[~together].max() < 0.5 * prefill_s  # the others are plain decode steps
    apart = run(w, False, async_scheduling).result
    assert rank_steps(apart, 0)[1].max() < 0.5 * prefill_s  # (without lock-step: never stretched)
    delay = locked.requests["e2e_s"][0] - apart.requests["e2e_s"][0]
    assert delay == pytest.approx(8 * (prefill_s - step0[~together].mean()), rel=0.05)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_an_idle_rank_runs_dummy_batches_while_the_other_is_busy_and_none_when_all_idle(async_scheduling):
    # rank 0 is busy from 0 s for ~0.2 s; both idle until 5 s; then rank 1 is busy
    w = two_requests((0.0, 5.0), (16, 16), (50, 30))
    out = run(w, True, async_scheduling)
    summary = out.result.summary
    dummies = [r["dummy_steps"] for r in summary["replicas"]]
    end0, _ = rank_steps(out.result, 0)
    end1, step1 = rank_steps(out.result, 1)
    assert end0[-1] < 1.0 and len(end0) == 50 and len(end1) == 30
    assert dummies == [30, 50]  # one dummy batch for each of the other rank's steps, none in the idle gap
    assert end1[0] - step1[0] == pytest.approx(5.0)  # a request reaching an idle group starts a wave at once
    assert summary["cluster"]["lockstep"] is True
    # no step overlaps another rank's, and a dummy batch is shorter than a decode step: nothing changes
    assert_same(run(w, False, async_scheduling).result, out.result)


class SharedExperts(LinearModel):
    """LinearModel plus MoE layers shared by two data-parallel ranks: ``experts_time(T) = 0.01 sqrt(T)``,
    and ``step_time`` prices them for both ranks loaded as this one (its tokens twice)."""

    name = "test-shared-experts"

    def experts_time(self, tokens: int) -> float:
        return 0.01 * tokens ** 0.5

    def step_time(self, batch: StepBatch) -> float:
        return super().step_time(batch) + self.experts_time(2 * batch.num_tokens)


def test_a_round_prices_the_experts_once_for_the_tokens_that_meet_unless_the_ranks_pad():
    # CFG's largest CUDA graph: min(64 x 2, 512, 512) = 128 tokens. Rank 0 decodes one request;
    # rank 1 prefills 4,096 tokens in chunks of 512 (no graph: no rank pads, the experts see
    # 512 + 1 tokens), then decodes one token a step (both within a graph: both pad to 1 token,
    # each rank's own model holds)
    from simulator.cluster.lockstep import cudagraph_token_limit

    assert cudagraph_token_limit(CFG.max_num_seqs, 0, CFG.max_num_batched_tokens) == 128
    assert cudagraph_token_limit(64, 3, 8192) == 512 and cudagraph_token_limit(8, 0, 8192) == 16
    pm = SharedExperts()
    w = two_requests((0.0, 0.5), (16, 4096), (400, 3))
    result = simulate_cluster(w, CFG, pm, ClusterSpec(replicas=2, lockstep=True)).result
    end1, step1 = rank_steps(result, 1)
    prefill = StepBatch(prefill_tokens=[512], prefill_context=[0])
    decode = StepBatch(decode_context=[600], decode_spec_tokens=[0])
    unpadded = max(pm.step_time(prefill) - pm.experts_time(1024), pm.step_time(decode) - pm.experts_time(2)) \
        + pm.experts_time(513)
    np.testing.assert_allclose(step1[:8], unpadded, rtol=1e-3)  # rank 0's context moves a little: rtol
    assert unpadded < 0.8 * pm.step_time(prefill)  # (the experts priced for 1,024 tokens would be longer)
    padded = pm.step_time(StepBatch(decode_context=[4097], decode_spec_tokens=[0]))
    np.testing.assert_allclose(step1[8:], padded, rtol=1e-3)  # the slower rank's step, experts for 2 x 1 token


def test_dp_ranks_of_a_moe_model_step_together_unless_the_option_is_off():
    w = make_workload(n=120, seed=4, rate=6, output=(1, 600))
    default = data_parallel_ranks(ClusterSpec(), 2, moe=True)
    off = data_parallel_ranks(ClusterSpec.from_dict({"dp_lockstep": False}), 2, moe=True)
    dense = data_parallel_ranks(ClusterSpec(), 2, moe=False)
    assert default.lockstep and not off.lockstep and not dense.lockstep
    today = simulate_cluster(w, CFG, LinearModel(), ClusterSpec(replicas=2, router="least_outstanding")).result
    for spec in (off, dense):
        result = simulate_cluster(w, CFG, LinearModel(), spec).result
        assert_same(today, result)
        assert result.summary["cluster"] == today.summary["cluster"]  # (no lock-step fields)
        assert "dummy_steps" not in result.summary["replicas"][0]
    locked = simulate_cluster(w, CFG, LinearModel(), default).result
    assert locked.requests["e2e_s"].mean() > today.requests["e2e_s"].mean()


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_a_bad_dp_lockstep_is_one_line_naming_the_field_and_exit_2(tmp_path, value):
    proc = run_cli(tmp_path, "model=qwen3-30b-a3b", "engine.data_parallel_size=2", f"cluster.dp_lockstep={value}",
                   check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: cluster.dp_lockstep: must be true or false, got ")


def test_a_moe_data_parallel_run_is_in_lock_step_from_the_command_line(tmp_path):
    args = ("model=qwen3-30b-a3b", "hardware=h100", "engine.data_parallel_size=2", "engine.enable_expert_parallel=true",
            "workload.num_requests=30", "plots=false")
    proc = run_cli(tmp_path / "on", *args)
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert summary["cluster"]["lockstep"] is True and "in lock-step" in proc.stdout
    assert sum(r["dummy_steps"] for r in summary["replicas"]) > 0
    run_cli(tmp_path / "off", *args, "cluster.dp_lockstep=false")
    assert "lockstep" not in json.loads((tmp_path / "off" / "summary.json").read_text())["cluster"]
