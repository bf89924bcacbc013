"""What automatic prefix caching costs the engine when nothing is hit.

With ``enable_prefix_caching`` vLLM hashes each full KV block of every request (0.32:
``get_request_block_hasher``, sha256 by default), prompt blocks when the request arrives and
output blocks as they fill, and its scheduler registers full blocks in the cache and evicts
cached ones as it allocates (``KVCacheManager.cache_blocks``, the block pool), on the engine
core's thread, for every request it schedules, whether or not any block is ever hit. That is
why caching can lose a little when hits are rare: the study saw caching on ~1-4% slower than
off at 32B (paper.md 'Optimizations', prefix caching).

Measured by ``PYTHONPATH=. python benchmarks/measure_prefix_caching.py`` (vLLM 0.32 on a 2-core
AMD EPYC, 2026-12-04):

- the block hash: 0.98-1.05 us per 16-token block, 2.6-3.5 us per 128-token block (best of 5
  x 2,000 chained blocks), i.e. ``HASH_S_PER_BLOCK + HASH_S_PER_TOKEN x block_size`` per block;
- vLLM's own scheduler and KV cache manager (the simulator's ``engine.scheduler=vllm`` mode)
  on a 400-request workload with no shared prefix, caching on against off, 7 alternated
  rounds: 0.161 s more CPU (range 0.152-0.812) over 281,599 tokens and 81,192 request-steps;
  less the block hashes, 1.8 us per scheduled request per step (``CACHE_S_PER_REQUEST``).

A server CPU is of the same class; async scheduling (vLLM's default on GPUs since 0.11) may
hide part of this behind the GPU step, which the study's vLLM 0.8.1 could not.
"""

from __future__ import annotations

HASH_S_PER_BLOCK = 0.787e-6
HASH_S_PER_TOKEN = 0.0164e-6
CACHE_S_PER_REQUEST = 1.8e-6


def hash_s_per_token(block_size: int, enable_prefix_caching: bool = True) -> float:
    """Seconds of block hashing per token a step schedules (0 with prefix caching off)."""
    if not enable_prefix_caching:
        return 0.0
    return HASH_S_PER_BLOCK / block_size + HASH_S_PER_TOKEN


def cache_s_per_request(enable_prefix_caching: bool = True) -> float:
    """Seconds of cache bookkeeping per request a step schedules (0 with prefix caching off)."""
    return CACHE_S_PER_REQUEST if enable_prefix_caching else 0.0
