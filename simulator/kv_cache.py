"""Paged KV cache, as vLLM V1's KVCacheManager and BlockPool keep it.

Blocks hold ``block_size`` tokens. One block (the null block) is reserved,
as in vLLM, so ``num_blocks - 1`` are usable. Blocks are allocated as tokens are
scheduled and freed when a request finishes or is preempted. With prefix
caching on, a full block is registered under a content hash; freed blocks stay
cached (and count as free) until they are evicted, least recently freed first,
so a later request with the same prefix, or a preempted request coming back,
can reuse them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


class KVCacheManager:
    """Blocks per request, free-block accounting and the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is vLLM's null block)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_prefix_caching
        # block 0 is the null block; the free queue holds the rest in eviction order
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self._ref = [0] * num_blocks
        self._hash_of: list[Hashable | None] = [None] * num_blocks
        # content hash -> the blocks holding it, oldest first. Like vLLM, duplicates
        # are kept (two requests may compute the same prefix block at once), so
        # evicting one copy leaves the other findable.
        self._cached: dict[Hashable, dict[int, None]] = {}
        self.req_blocks: dict[int, list[int]] = {}
        self._num_cached_blocks: dict[int, int] = {}
        # prefix-cache statistics (tokens)
        self.prefix_queries = 0
        self.prefix_hits = 0
        # block-seconds each request has held, integrated as its block count changes
        self.clock = 0.0
        self.block_seconds: dict[int, float] = {}
        self._held_since: dict[int, float] = {}

    # --- accounting -----------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Free blocks, cached-but-unused ones included (they can be evicted)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by requests (the null block excluded)."""
        return self.num_blocks - 1 - len(self._free)

    @property
    def usage(self) -> float:
        """vLLM's kv_cache_usage: the used share of the usable blocks (null block excluded)."""
        return 1.0 - len(self._free) / (self.num_blocks - 1)

    # --- prefix cache ---------------------------------------------------
    def computed_blocks(self, block_hash: Callable[[int], Hashable], num_tokens: int) -> list[int]:
        """Longest run of cached full blocks at the start of a request.

        ``block_hash(i)`` names the content of the request's block i. At most
        ``num_tokens - 1`` tokens may hit, so that the last token is always
        computed (vLLM's rule).
        """
        if not self.enable_caching:
            return []
        hit: list[int] = []
        for i in range((num_tokens - 1) // self.block_size):
            blocks = self._cached.get(block_hash(i))
            if not blocks:
                break
            hit.append(next(iter(blocks)))
        return hit

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    # --- allocation -----------------------------------------------------
    def blocks_needed(self, rid: int, num_tokens: int, hit_blocks: list[int] = ()) -> int:
        """Free blocks an allocation for ``num_tokens`` slots would consume."""
        held = len(self.req_blocks.get(rid, ()))
        need = max(cdiv(num_tokens, self.block_size) - held - len(hit_blocks), 0)
        evictable = sum(1 for b in hit_blocks if self._ref[b] == 0)
        return need + evictable

    def allocate(
        self,
        rid: int,
        num_slots: int,
        hit_blocks: list[int] = (),
        full_sequence_tokens: int = 0,
    ) -> bool:
        """Give ``rid`` blocks for ``num_slots`` token slots in all.

        ``hit_blocks`` are prefix-cache hits adopted first. When
        ``full_sequence_tokens`` is set (vLLM's scheduler_reserve_full_isl
        admission gate), the whole sequence must fit in the free blocks.
        Returns False, changing nothing, when the blocks are not there.
        """
        free = len(self._free)
        if full_sequence_tokens and self.blocks_needed(rid, full_sequence_tokens, hit_blocks) > free:
            return False
        if self.blocks_needed(rid, num_slots, hit_blocks) > free:
            return False
        blocks = self.req_blocks.setdefault(rid, [])
        num_new = cdiv(num_slots, self.block_size) - len(blocks) - len(hit_blocks)
        if not hit_blocks and num_new <= 0:
            return True
        self._integrate(rid, len(blocks))
        for b in hit_blocks:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
            blocks.append(b)
        for _ in range(num_new):
            blocks.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self._hash_of[block]
        if h is not None:  # evict it from the prefix cache
            blocks = self._cached.get(h)
            if blocks is not None:
                blocks.pop(block, None)
                if not blocks:
                    del self._cached[h]
            self._hash_of[block] = None
        self._ref[block] = 1
        return block

    def cache_full_blocks(self, rid: int, block_hash: Callable[[int], Hashable], num_tokens: int) -> None:
        """Register the request's full blocks covering ``num_tokens`` tokens."""
        if not self.enable_caching:
            return
        blocks = self.req_blocks[rid]
        done = self._num_cached_blocks.get(rid, 0)
        full = min(num_tokens // self.block_size, len(blocks))
        for i in range(done, full):
            block = blocks[i]
            if self._hash_of[block] is None:
                h = block_hash(i)
                self._cached.setdefault(h, {})[block] = None
                self._hash_of[block] = h
        if full > done:
            self._num_cached_blocks[rid] = full

    def free(self, rid: int) -> None:
        """Release a request's blocks, tail first.

        As vLLM's BlockPool.free_blocks: blocks without a content hash can
        never be hit, so they go to the front of the free queue (reused first);
        cached blocks go to the back, so the prefix cache evicts least recently
        freed first.
        """
        blocks = self.req_blocks.pop(rid, None)
        self._num_cached_blocks.pop(rid, None)
        if not blocks:
            return
        self._integrate(rid, len(blocks))
        reuse_first: list[int] = []
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash_of[b] is None:
                    reuse_first.append(b)
                else:
                    self._free[b] = None
        for b in reversed(reuse_first):
            self._free[b] = None
            self._free.move_to_end(b, last=False)

    def _integrate(self, rid: int, held: int) -> None:
        """Add held x (clock - last change) to the request's block-seconds."""
        since = self._held_since.get(rid)
        if since is not None and held:
            self.block_seconds[rid] = self.block_seconds.get(rid, 0.0) + held * (self.clock - since)
        self._held_since[rid] = self.clock

    def num_blocks_of(self, rid: int) -> int:
        return len(self.req_blocks.get(rid, ()))
