"""Measure what automatic prefix caching costs vLLM's engine core when nothing is hit
(the source of calibration/prefix_caching_cost.py).

    PYTHONPATH=. .venv-engine/bin/python benchmarks/measure_prefix_caching.py

1. vLLM 0.32's block hash (``hash_block_tokens``, sha256, chained): microseconds per block
   for block sizes 16 and 128 (best of 5 runs over 2,000 blocks).
2. vLLM's own scheduler and KV cache manager (the simulator's ``engine.scheduler=vllm``
   mode drives the real ``vllm.v1.core.sched.Scheduler``, hashing each request's blocks with
   vLLM's request block hasher) on a workload with no shared prefix, prefix caching on and
   off, alternated: process CPU seconds per token of the workload; the median difference is
   what caching costs per token (hashing, registering and evicting blocks, lookups).
"""

from __future__ import annotations

import random
import statistics
import time

import numpy as np


def hash_cost() -> float:
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    fn = get_hash_fn_by_name("sha256")
    kv_cache_utils.init_none_hash(fn)
    rng = random.Random(0)
    for block_size in (16, 128):
        blocks = [[rng.randrange(150_000) for _ in range(block_size)] for _ in range(2000)]
        best = float("inf")
        for _ in range(5):
            start, parent = time.perf_counter(), None
            for block in blocks:
                parent = kv_cache_utils.hash_block_tokens(fn, parent, block, None)
            best = min(best, (time.perf_counter() - start) / len(blocks))
        print(f"hash, block_size {block_size}: {best * 1e6:.2f} us per block")
        if block_size == 16:
            per_block_16 = best
    return per_block_16


def flat_model():
    """A constant step time: the scheduler's CPU time is what is measured, not the model's."""
    from simulator.records.performance import MemoryBreakdown, PerformanceModel

    class Flat(PerformanceModel):
        name = "flat"

        def step_time(self, batch) -> float:
            return 0.01

        def kv_bytes_per_token(self) -> int:
            return 1000

        def memory(self, gpu_memory_utilization: float) -> MemoryBreakdown:
            return MemoryBreakdown(2**34, 2**34, 0, 0, 0, 2**34)

    return Flat()


def scheduler_cost(reps: int = 7, n: int = 400, hash_s_per_block: float = 1e-6) -> None:
    from simulator.engine.loop import simulate
    from simulator.records.engine_config import EngineConfig
    from simulator.records.workload import Workload

    rng = np.random.default_rng(0)
    w = Workload(arrival_s=np.sort(rng.uniform(0, 5, n)), prompt_tokens=rng.integers(300, 700, n),
                 output_tokens=rng.integers(100, 300, n), reasoning_tokens=np.zeros(n, int),
                 domain=np.full(n, "chat", object))
    tokens = int(w.prompt_tokens.sum() + w.output_tokens.sum())
    seconds = {True: [], False: []}
    request_steps = 0
    for rep in range(reps + 1):
        for on in (True, False):
            config = EngineConfig(block_size=16, max_model_len=4096, num_gpu_blocks_override=20000,
                                  enable_prefix_caching=on, scheduler="vllm")
            start = time.process_time()
            result = simulate(w, config, flat_model(), seed=0, fast=False)
            if rep:  # the first round imports and warms vLLM
                seconds[on].append(time.process_time() - start)
            assert result.summary["prefix_cache"]["hit_rate"] == 0.0
            request_steps = int(np.sum(result.timeline["batch_size"]))
    diff = [a - b for a, b in zip(seconds[True], seconds[False], strict=True)]
    cost = statistics.median(diff)
    hashing = (tokens / 16) * hash_s_per_block
    print(f"scheduler, block_size 16, {n} requests, {tokens:,} tokens, {request_steps:,} request-steps, "
          f"{reps} rounds: caching on {statistics.median(seconds[True]):.2f} s, off "
          f"{statistics.median(seconds[False]):.2f} s; cost of caching (median difference) {cost:.3f} s "
          f"[{min(diff):.3f}, {max(diff):.3f}] = {cost / tokens * 1e9:.0f} ns per token; less the block "
          f"hashes ({hashing:.3f} s): {(cost - hashing) / request_steps * 1e6:.2f} us per request-step")


if __name__ == "__main__":
    hash_s_per_block = hash_cost()
    scheduler_cost(hash_s_per_block=hash_s_per_block)
