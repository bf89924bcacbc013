"""vLLM's KV cache groups for models mixing full-attention and sliding-window layers.

vLLM's hybrid allocator (``vllm/v1/core/kv_cache_utils.py``,
``_get_kv_cache_groups_uniform_page_size``) splits the layers of each attention
kind into groups of ``group_size`` layers: the smallest layer count among the
kinds, or the largest when that is under 1.5 times the smallest (padding the
smaller kind). Every group has its own block table but all draw on one block
pool, whose block holds ``block_size`` tokens of one group, so the pool gets
``available bytes / (page bytes per layer x group_size x block_size)`` blocks.

A full-attention group holds ``cdiv(tokens, block_size)`` blocks per request. A
sliding-window group frees, at each allocation, the blocks wholly before the
window of the tokens computed so far (``SlidingWindowManager.remove_skipped_blocks``:
the first ``(computed - window + 1) // block_size`` blocks), so a request's
sliding-window blocks stop growing at about ``window / block_size + 1``.
"""

from __future__ import annotations

import numpy as np

from simulator.engine.kv_cache import KVCacheManager, ticks
from simulator.engine.request import SimRequest
from simulator.records.kv_groups import KVGroups, cdiv


class HybridKVCacheManager(KVCacheManager):
    """KVCacheManager for one full-attention group plus sliding-window groups sharing its block pool.

    The base class keeps the full-attention group (block tables, prefix cache). Each
    sliding-window group holds, per request, the blocks from the window's start on; at every
    allocation the blocks wholly before the window of the tokens computed so far go back to the
    pool first (vLLM's ``remove_skipped_blocks``), and blocks wholly before it are never taken.
    A request's computed tokens at an allocation are the slots of its previous one (vLLM's
    ``num_computed_tokens``), or its prefix-cache hits. Sliding blocks carry no content name:
    a prefix hit reuses full-attention blocks only and takes fresh sliding blocks for the window.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, groups: KVGroups):
        if groups.full_groups != 1:
            raise ValueError(f"one full-attention KV group is modelled, got {groups.full_groups}")
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.groups = groups
        self._sliding: dict[int, list[int]] = {}  # live sliding blocks, oldest first, per request
        self._sliding_end: dict[int, int] = {}  # logical length of the sliding block tables
        self._computed: dict[int, int] = {}  # slots of the previous allocation

    def num_blocks_of(self, rid: int) -> int:
        return super().num_blocks_of(rid) + len(self._sliding.get(rid, ()))

    def num_blocks_held(self, reqs: list[SimRequest]) -> list[int]:
        return [self.num_blocks_of(r.rid) for r in reqs]

    def _sliding_need(self, rid: int, num_slots: int, computed: int) -> int:
        """Sliding blocks to take for ``num_slots`` slots once those before the window are dropped."""
        end = max(self._sliding_end.get(rid, 0), self.groups.skipped_blocks(computed, self.block_size))
        return max(0, cdiv(num_slots, self.block_size) - end) * self.groups.sliding_groups

    def _drop_skipped(self, rid: int, computed: int) -> None:
        n = self.groups.sliding_groups
        live = self._sliding.get(rid)
        end = self._sliding_end.get(rid, 0)
        target = self.groups.skipped_blocks(computed, self.block_size)
        if live:
            start = end - len(live) // n
            drop = min(target, end) - start
            if drop > 0:
                self._release(rid, live[:drop * n])
                del live[:drop * n]
        if target > end:
            self._sliding_end[rid] = target

    def _release(self, rid: int, blocks: list[int]) -> None:
        if not blocks:
            return
        held = np.array(blocks, dtype=np.int64)
        self._ref[held] = 0
        self.free_queue.push_front(held[::-1])
        self._block_ticks[rid] = self._block_ticks.get(rid, 0) + len(blocks) * ticks(self.clock)

    def admission_blocks(self, req, num_tokens: int) -> int:
        # the sliding-window groups' need depends on how many tokens hit: look them all up
        return self.blocks_needed(req.rid, num_tokens, self.computed_blocks(req, req.num_tokens))

    def blocks_needed(self, rid: int, num_tokens: int, hit_blocks: list[int] = ()) -> int:
        computed = max(self._computed.get(rid, 0), len(hit_blocks) * self.block_size)
        return super().blocks_needed(rid, num_tokens, hit_blocks) + self._sliding_need(rid, num_tokens, computed)

    def allocate(self, rid: int, num_slots: int, hit_blocks: list[int] = (), full_sequence_tokens: int = 0) -> bool:
        computed = max(self._computed.get(rid, 0), len(hit_blocks) * self.block_size)
        self._drop_skipped(rid, computed)
        need = self._sliding_need(rid, num_slots, computed)
        if need or full_sequence_tokens:
            free = len(self.free_queue)
            if full_sequence_tokens and self.blocks_needed(rid, full_sequence_tokens, hit_blocks) > free:
                return False
            if KVCacheManager.blocks_needed(self, rid, num_slots, hit_blocks) + need > free:
                return False
        if not super().allocate(rid, num_slots, hit_blocks, full_sequence_tokens):
            return False
        if need:
            taken = self.take_free_blocks(need).tolist()
            self._sliding.setdefault(rid, []).extend(taken)
            self._sliding_end[rid] = cdiv(num_slots, self.block_size)
            self._acquired[rid] = self._acquired.get(rid, 0) + need * ticks(self.clock)
        self._computed[rid] = num_slots
        return True

    def append_block(self, rid: int) -> bool:
        return self.allocate(rid, len(self.req_blocks[rid]) * self.block_size + 1)

    def free(self, rid: int, finished: bool = False) -> None:
        live = self._sliding.pop(rid, [])
        self._sliding_end.pop(rid, None)
        self._computed.pop(rid, None)
        if live:  # their release is counted here; base free subtracts every acquisition
            self._block_ticks[rid] = self._block_ticks.get(rid, 0) + len(live) * ticks(self.clock)
            held = np.array(live, dtype=np.int64)
            self._ref[held] = 0
            self.free_queue.push_front(held[::-1])
        super().free(rid, finished)
