"""The native scheduler on small hand-made cases (vLLM V1 semantics)."""

import numpy as np
import pytest

from simulator.engine.native import NativeScheduler
from simulator.engine.request import SimRequest, Status
from simulator.records.engine_config import EngineConfig


def make(num_blocks=100, async_scheduling=False, **engine):
    # vLLM's default seqs cap, within the token budget as vLLM requires
    seqs = min(1024, engine.get("max_num_batched_tokens", 8192))
    cfg = EngineConfig(**{"max_model_len": 4096, "enable_prefix_caching": False, "max_num_seqs": seqs, **engine})
    return NativeScheduler(cfg, num_blocks, async_scheduling=async_scheduling)


def req(rid, prompt, out, t=0.0, block_size=16, **kw):
    return SimRequest(rid, t, prompt, out, block_size=block_size, **kw)


def step(s, t=0.0):
    """Schedule one step and apply it synchronously; return the decisions."""
    out = s.schedule()
    s.update_from_output(out, dict.fromkeys(out.sampling, 1), t)
    return out


def test_long_prompt_is_prefilled_in_chunks_then_decodes():
    s = make(max_num_batched_tokens=256)
    s.add_request(req(0, 1000, 3))
    chunks = [step(s).num_scheduled[0] for _ in range(4)]
    assert chunks == [256, 256, 256, 232]
    r = s.requests[0]
    assert r.num_output == 1  # the last chunk samples the first token
    out = step(s)
    assert out.num_scheduled == {0: 1} and out.batch.decode_context == [1001]
    step(s)
    assert r.status == Status.FINISHED and r.num_output == 3
    assert s.kv.num_used_blocks == 0


def test_budget_and_max_num_seqs_are_respected():
    s = make(max_num_batched_tokens=300, max_num_seqs=3)
    for i in range(6):
        s.add_request(req(i, 200, 5))
    out = s.schedule()
    assert out.total_tokens <= 300
    assert out.num_scheduled == {0: 200, 1: 100}  # second prompt chunked to the budget
    for _ in range(20):
        s.update_from_output(out, dict.fromkeys(out.sampling, 1), 0.0)
        out = s.schedule()
        assert out.total_tokens <= 300
        assert s.num_running <= 3


def test_running_requests_are_served_before_waiting_ones():
    s = make(max_num_batched_tokens=64)
    s.add_request(req(0, 32, 10))
    step(s)
    s.add_request(req(1, 500, 10))
    out = s.schedule()
    assert list(out.num_scheduled) == [0, 1]
    assert out.num_scheduled == {0: 1, 1: 63}


def test_chunked_prefill_off_waits_for_the_whole_prompt():
    # with chunking off, a prompt larger than the remaining budget is not started
    s2 = make(num_blocks=1000, max_num_batched_tokens=4096, enable_chunked_prefill=False)
    s2.add_request(req(0, 3000, 10))
    s2.add_request(req(1, 2000, 10))
    assert s2.schedule().num_scheduled == {0: 3000}


def test_preemption_takes_the_last_admitted_and_requeues_it_first():
    # 7 usable blocks of 16 tokens; three requests of 32-token prompts take 2 blocks each
    s = make(num_blocks=8)
    for i in range(3):
        s.add_request(req(i, 32, 40))
    step(s)
    assert [r.rid for r in s.running] == [0, 1, 2]
    # decoding token 33 needs a third block for each: 1 is free, so 0 gets it, 1 then preempts 2
    out = step(s)
    assert out.preempted == [2]
    assert [r.rid for r in s.running] == [0, 1]
    assert s.waiting[0].rid == 2 and s.requests[2].status == Status.PREEMPTED
    assert s.requests[2].num_preemptions == 1 and s.requests[2].num_computed == 0


def test_preempted_request_recomputes_prompt_and_its_output():
    s = make(num_blocks=8)
    for i in range(3):
        s.add_request(req(i, 32, 40))
    step(s)
    victim = s.requests[2]
    produced = victim.num_output
    step(s)  # preempts request 2
    assert victim.status == Status.PREEMPTED
    # run until it is resumed; its recompute covers prompt + the output it had
    for _ in range(200):
        out = s.schedule()
        if 2 in out.resumed:
            assert out.num_scheduled[2] == 32 + produced
            break
        s.update_from_output(out, dict.fromkeys(out.sampling, 1), 0.0)
    else:
        raise AssertionError("request 2 was never resumed")


def test_no_admission_in_a_step_that_preempted():
    s = make(num_blocks=8)
    for i in range(3):
        s.add_request(req(i, 32, 40))
    step(s)
    s.add_request(req(3, 8, 5))
    out = s.schedule()
    assert out.preempted and 3 not in out.num_scheduled


def test_prefix_cache_hits_skip_shared_prompt_blocks():
    s = make(enable_prefix_caching=True)
    s.add_request(req(0, 100, 2, prefix_group=7, prefix_tokens=64))
    step(s)
    s.add_request(req(1, 90, 2, prefix_group=7, prefix_tokens=64))
    out = s.schedule()
    assert out.num_scheduled[1] == 90 - 64
    assert s.kv.prefix_hits == 64


def test_async_scheduling_does_not_schedule_past_max_tokens():
    s = make(async_scheduling=True)
    s.add_request(req(0, 16, 3))
    outs = []
    # two steps in flight: schedule, schedule, apply the oldest, ...
    pending = [s.schedule()]
    for _ in range(6):
        nxt = s.schedule()
        if nxt.num_scheduled:
            pending.append(nxt)
        if not pending:
            break
        done = pending.pop(0)
        outs.append(done)
        s.update_from_output(done, dict.fromkeys(done.sampling, 1), 0.0)
    r = s.requests[0]
    assert r.status == Status.FINISHED and r.num_output == 3
    assert sum(1 for o in outs if 0 in o.sampling) == 3  # exactly one sampling step per token


def test_engine_settings_vllm_refuses_are_one_line_errors():
    import pytest

    from simulator.records.errors import ConfigError

    with pytest.raises(ConfigError, match=r"engine.max_num_batched_tokens: must be >= max_num_seqs=256"):
        EngineConfig(max_num_seqs=256, max_num_batched_tokens=128)
    assert EngineConfig(max_num_seqs=128, max_num_batched_tokens=128).max_num_batched_tokens == 128


def test_finish_requests_aborts_running_and_waiting_ones():
    s = make(num_blocks=100, max_num_seqs=1)
    s.add_request(req(0, 40, 10))
    s.add_request(req(1, 40, 10))
    step(s)
    assert s.num_running == 1 and s.num_waiting == 1 and s.kv.num_used_blocks > 0
    done = s.finish_requests([0, 1], 2.0)
    assert [r.rid for r in done] == [0, 1]
    assert all(r.status == Status.FINISHED and r.finish_s == 2.0 for r in done)
    assert not s.has_requests() and s.kv.num_used_blocks == 0
    assert s.stats().num_running == 0 and s.kv_usage == 0.0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_run_ends_when_its_last_requests_are_all_aborted(async_scheduling):
    # every client gives up after 20 s and the cache is small: the last requests in the engine
    # are aborted after the arrivals are over, and the engine ends instead of stalling
    from dataclasses import replace

    from simulator.engine.loop import simulate
    from tests.simulator.conftest import VectorLinearModel, make_workload

    w = make_workload(n=120, seed=5, rate=6, output=(1, 2000))
    w = replace(w, timeout_s=np.full(len(w), 20.0))
    cfg = EngineConfig(num_gpu_blocks_override=400, max_model_len=8192)
    result = simulate(w, cfg, VectorLinearModel(), async_scheduling=async_scheduling)
    status = result.requests["status"]
    assert (status == "aborted").sum() > 0
    assert status[-1] == "aborted"  # the last arrival's client gave up before it finished
    assert set(status) <= {"completed", "aborted"}
