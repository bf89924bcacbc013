"""Details of vLLM 0.32 the native model follows, found by the differential test.

Each case is small and hand-made, runs without vLLM, and pins one behaviour of
vLLM's BlockPool or Scheduler that the lockstep comparison with the real
scheduler showed the native model had to follow (docs/scheduler-fidelity.md).
"""

import numpy as np

from simulator.engine.kv_cache import KVCacheManager
from simulator.engine.loop import simulate
from simulator.engine.native import NativeScheduler
from simulator.engine.request import SimRequest, Status
from simulator.records.engine_config import EngineConfig, SpeculativeConfig
from simulator.records.workload import Workload
from tests.simulator.conftest import LinearModel


def shared(rid, group=0):
    """A request whose first 64 prompt tokens are shared with its prefix group."""
    return SimRequest(rid, 0.0, 64, 1, prefix_group=group, prefix_tokens=64)


def test_freed_blocks_without_a_hash_are_reused_before_cached_ones():
    # vLLM's free_blocks: uncached blocks to the front of the free queue, cached to the back
    kv = KVCacheManager(num_blocks=6, block_size=16)
    assert kv.allocate(1, 40)  # 3 blocks, the last one partly filled
    kv.cache_full_blocks(shared(1), 40)  # 2 full blocks cached
    kv.free(1)
    assert kv.allocate(2, 16)  # takes the uncached tail block, not a cached one
    assert len(kv.computed_blocks(shared(9), 33)) == 2
    assert kv.allocate(3, 16)  # then the never-used blocks
    assert kv.allocate(4, 16)
    assert len(kv.computed_blocks(shared(9), 33)) == 2


def test_a_second_copy_of_a_cached_block_stays_findable_when_the_first_is_evicted():
    # two requests computed the same prefix block at once; vLLM keeps both under the hash
    kv = KVCacheManager(num_blocks=4, block_size=16)
    assert kv.allocate(1, 16) and kv.allocate(2, 16)
    kv.cache_full_blocks(shared(1), 16)
    kv.cache_full_blocks(shared(2), 16)
    first, second = kv.req_blocks[1][0], kv.req_blocks[2][0]
    kv.free(1)
    kv.free(2)
    assert kv.computed_blocks(shared(9), 17) == [first]  # the oldest copy answers
    assert kv.allocate(3, 32)  # the never-used block, then the first copy (evicted)
    assert kv.computed_blocks(shared(9), 17) == [second]


def test_async_scheduler_caches_the_last_block_before_freeing_a_finished_request():
    s = NativeScheduler(EngineConfig(max_model_len=1024), 10, async_scheduling=True)
    req = SimRequest(0, 0.0, 31, 2)  # 31 + 2 tokens: the second block fills with the first output
    s.add_request(req)
    step1 = s.schedule()
    step2 = s.schedule()  # scheduled while step 1 is in flight
    s.update_from_output(step1, dict.fromkeys(step1.sampling, 1), 0.1)
    full, partial = s.kv.req_blocks[0][:2], s.kv.req_blocks[0][2:]
    assert s.update_from_output(step2, dict.fromkeys(step2.sampling, 1), 0.2) == [req]
    assert req.status == Status.FINISHED
    # both full blocks were cached before the free: they go to the back of the free queue
    # (evicted last), tail first; the partial block, never cached, to the front
    queue = s.kv.free_queue.blocks().tolist()
    assert queue[-2:] == full[::-1]
    assert queue[: len(partial)] == partial[::-1]


def test_sync_scheduler_caches_blocks_filled_by_accepted_drafts_only_at_the_next_step():
    spec = SpeculativeConfig(num_speculative_tokens=4, acceptance_rate=(1.0,))
    s = NativeScheduler(EngineConfig(max_model_len=1024, speculative=spec), 20, async_scheduling=False)
    req = SimRequest(0, 0.0, 14, 100)
    s.add_request(req)
    out = s.schedule()  # the prompt
    s.update_from_output(out, {0: 1}, 0.1)
    req.spec_tokens = 4
    out = s.schedule()  # 1 + 4 drafts from token 14: all accepted fills block 0 and more
    assert out.spec_tokens == {0: 4}
    s.update_from_output(out, {0: 5}, 0.2)
    assert req.num_computed == 19 and req.num_output == 6
    assert s.kv.num_cached_blocks_of(0) == 0  # vLLM's Scheduler: not yet cached
    s.schedule()
    assert s.kv.num_cached_blocks_of(0) == 1


def test_one_token_decode_joining_a_decode_batch_is_padded_to_the_speculative_size():
    spec = SpeculativeConfig(num_speculative_tokens=3, acceptance_rate=(1.0,))
    s = NativeScheduler(EngineConfig(max_model_len=1024, speculative=spec), 50, async_scheduling=False)
    s.add_request(SimRequest(0, 0.0, 40, 100))
    out = s.schedule()
    s.update_from_output(out, {0: 1}, 0.1)
    s.add_request(SimRequest(1, 0.1, 1, 100))  # a one-token prompt
    out = s.schedule()
    assert out.num_scheduled == {0: 1, 1: 4}
    assert out.spec_tokens == {1: 3} and out.spec_padding == {1}
    # padding drafts are never accepted, whatever the sampler says
    s.update_from_output(out, {0: 1, 1: 4}, 0.2)
    assert s.requests[1].num_output == 1 and s.requests[1].num_computed == 1


def test_no_padding_while_a_prefill_chunk_is_running():
    spec = SpeculativeConfig(num_speculative_tokens=3, acceptance_rate=(1.0,))
    cfg = EngineConfig(max_model_len=1024, max_num_batched_tokens=64, max_num_seqs=8,
                       long_prefill_token_threshold=32, speculative=spec)
    s = NativeScheduler(cfg, 50, async_scheduling=False)
    s.add_request(SimRequest(0, 0.0, 200, 10))
    out = s.schedule()  # alone: a first chunk of 64 (no long-prefill cap for a lone request)
    s.update_from_output(out, {}, 0.1)
    s.add_request(SimRequest(1, 0.1, 1, 10))
    out = s.schedule()  # request 0 is still prefilling: request 1 gets its one token, unpadded
    assert out.num_scheduled == {0: 32, 1: 1}
    assert not out.spec_padding


def self_preempting_case():
    """One request at a time whose draft slots overrun the KV cache it exactly fills (sync)."""
    spec = SpeculativeConfig(num_speculative_tokens=3, acceptance_rate=(0.0,))
    config = EngineConfig(block_size=32, max_num_seqs=1, max_num_batched_tokens=2048,
                          max_model_len=2048, enable_prefix_caching=False,
                          num_gpu_blocks_override=40, speculative=spec)
    # 715 + 533 = 1248 tokens: the 39 usable blocks of 32
    workload = Workload(arrival_s=np.array([0.0, 0.0]), prompt_tokens=np.array([715, 100]),
                        output_tokens=np.array([533, 20]), reasoning_tokens=np.array([0, 0]),
                        domain=np.array(["x", "x"], object))
    return workload, config


def test_a_step_that_only_preempts_is_followed_at_once_by_the_next():
    # near the end of request 0, 1 + 3 draft slots need a 40th block: it preempts itself,
    # the step schedules nothing, and (as vLLM's engine) the engine schedules again, no stall
    workload, config = self_preempting_case()
    result = simulate(workload, config, LinearModel(), async_scheduling=False)
    assert result.summary["completed"] == 2
    assert result.requests["preemptions"][0] > 0
    assert result.requests["output_tokens"].tolist() == [533, 20]
