"""Paged KV cache, as vLLM V1's KVCacheManager and BlockPool keep it.

Blocks hold ``block_size`` tokens. One block (the null block) is reserved,
as in vLLM, so ``num_blocks - 1`` are usable. Blocks are allocated as tokens are
scheduled and freed when a request finishes or is preempted. With prefix
caching on, a full block is registered under the name of its content; freed
blocks stay cached (and count as free) until they are evicted, least recently
freed first, so a later request with the same prefix, or a preempted request
coming back, can reuse them.

Content names (see SimRequest.num_shared_blocks): block i of a request is
shared within its prefix group while it lies inside the shared prefix, else
private to the request. Shared names live in a dict (there are few). A private
name is kept per block, as (owner request, block index) in numpy arrays, and
given in bulk when the request frees its blocks (only then can it be looked
up), so the many blocks a long decode fills cost no Python work one by one.
"""

from __future__ import annotations

import numpy as np

from simulator.engine.request import SimRequest

#: owner of a block without content name, and of a block holding a shared prefix block
NO_HASH = -1
SHARED = -2


#: KV block-seconds count time in whole ticks of 2**-30 s (about 0.93 ns): each clock is rounded
#: once to ticks and the sums are integers, so a request's block-seconds do not depend on how
#: its acquisitions are grouped (one by one, or a run's at once). Ticks of a clock t are
#: t x 2**30 < 2**63 up to t = 2**33 s (272 years); the sums are Python integers (no bound), and
#: numpy's per-run sums are int64 where blocks x largest tick < 2**62 (e.g. 300 blocks at a day
#: of simulated time), else ticks less the run's earliest, which hold while a request's blocks
#: in one run x the run's span stay under 2**33 block-seconds (e.g. 65,536 blocks over 36 hours).
TICKS_PER_S = 2**30


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def ticks(clock: float) -> int:
    """``clock`` (s) in whole ticks (round half to even, as ``np.rint``)."""
    return round(clock * TICKS_PER_S)


def tick_sums(clocks: np.ndarray, starts: np.ndarray) -> list[int]:
    """The ticks of ``clocks`` summed over the stretches beginning at ``starts`` (increasing,
    the first 0), exactly: ``[sum(ticks(c) for c in stretch) ...]``."""
    t = np.rint(np.asarray(clocks, dtype=np.float64) * TICKS_PER_S)
    if len(t) * float(np.abs(t).max()) < 2.0**62:  # (the usual case: no int64 sum can overflow)
        return np.add.reduceat(t.astype(np.int64), starts).tolist()
    t = t.astype(np.int64)
    base = int(t.min())
    counts = np.diff(np.append(starts, len(t))).tolist()
    return [s + c * base for s, c in zip(np.add.reduceat(t - base, starts).tolist(), counts, strict=True)]


def tick_sum(clocks: np.ndarray) -> int:
    """``sum(ticks(c) for c in clocks)``, exactly."""
    if not len(clocks):
        return 0
    t = np.rint(np.asarray(clocks, dtype=np.float64) * TICKS_PER_S)
    if len(t) * float(np.abs(t).max()) < 2.0**62:  # (as tick_sums: no int64 sum can overflow)
        return int(t.astype(np.int64).sum())
    return tick_sums(clocks, _FIRST)[0]


_FIRST = np.zeros(1, dtype=np.int64)


class FreeBlockQueue:
    """vLLM's free-block queue (FreeKVCacheBlockQueue), kept in a numpy buffer.

    The queue is the stretch ``buf[head:tail]``, front first. ``pos[b]`` is the
    buffer index of block b's entry, -1 when b is not queued; an entry whose
    index differs from its block's ``pos`` is a hole, left by ``remove`` and
    skipped by pops (lazy deletion). When a push finds no room at its end, the
    live entries are packed into the middle of the buffer again.
    """

    def __init__(self, num_blocks: int):
        self._pos = np.full(num_blocks, -1, dtype=np.int64)
        # a third of room on each side of at most num_blocks live entries
        self._buf = np.zeros(3 * num_blocks + 3, dtype=np.int64)
        self._places = np.arange(len(self._buf))  # (slices of it: quicker than np.arange each time)
        self._head = self._tail = num_blocks + 1
        self._len = 0
        self._holes = 0  # entries left by ``remove`` not yet skipped

    def __len__(self) -> int:
        return self._len

    def __contains__(self, block: int) -> bool:
        return self._pos[block] >= 0

    def blocks(self) -> np.ndarray:
        """The queued blocks, front first."""
        seg = self._buf[self._head : self._tail]
        return seg[self._pos[seg] == self._places[self._head : self._tail]]

    def pop_front(self, n: int) -> np.ndarray:
        """Take the first ``n`` blocks (``n <= len``)."""
        if n > self._len:
            raise IndexError(f"pop of {n} blocks from a queue of {self._len}")
        self._len -= n
        buf, pos = self._buf, self._pos
        if n <= 2:  # the step-by-step path takes one block at a time: stay in Python
            out = []
            head = self._head
            while len(out) < n:
                block = buf.item(head)
                if pos.item(block) == head:
                    out.append(block)
                    pos[block] = -1
                else:
                    self._holes -= 1
                head += 1
            self._head = head
            return np.array(out, dtype=np.int64)
        if not self._holes:  # the first n entries are the blocks
            out = buf[self._head : self._head + n].copy()
            self._head += n
            pos[out] = -1
            return out
        parts = []
        while n:
            seg = buf[self._head : self._head + n]
            live = pos[seg] == self._places[self._head : self._head + n]
            self._head += n
            if np.count_nonzero(live) < len(live):
                seg = seg[live]
                self._holes -= n - len(seg)
            parts.append(seg)
            n -= len(seg)
        out = parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
        pos[out] = -1
        return out

    def pop_one(self) -> int:
        """Take the first block (the queue is not empty)."""
        buf, pos = self._buf, self._pos
        head = self._head
        block = buf.item(head)
        while pos.item(block) != head:  # skip holes
            self._holes -= 1
            head += 1
            block = buf.item(head)
        self._head = head + 1
        pos[block] = -1
        self._len -= 1
        return block

    def ahead_of(self, blocks: np.ndarray) -> tuple[int, int] | None:
        """(len(blocks), the entries ahead of the last one) when ``blocks`` are all queued, each
        nearer the front than the one before it; else None."""
        pos = self._pos[blocks]
        if np.count_nonzero(pos < 0) or np.count_nonzero(pos[1:] >= pos[:-1]):
            return None
        head, at = self._head, int(pos[-1])
        return len(blocks), int(np.count_nonzero(self._pos[self._buf[head:at]] == self._places[head:at]))

    def remove(self, block: int) -> None:
        """Take ``block`` out from wherever it is (a prefix hit on a free cached block)."""
        self.remove_many(np.array([block], dtype=np.int64))

    def remove_many(self, blocks: np.ndarray) -> None:
        """``remove`` each of ``blocks`` (distinct; an entry left behind is a hole)."""
        pos = self._pos[blocks]
        if np.count_nonzero(pos < 0):
            raise KeyError(f"block {int(blocks[np.argmax(pos < 0)])} is not free")
        self._pos[blocks] = -1
        self._len -= len(blocks)
        self._holes += len(blocks)

    def push_front(self, blocks: np.ndarray) -> None:
        """Put ``blocks`` before the current front, in their order."""
        n = len(blocks)
        if not n:
            return
        if self._head < n:
            self._repack()
        self._head -= n
        self._place(blocks, self._head)

    def push_back(self, blocks: np.ndarray) -> None:
        """Put ``blocks`` after the current back, in their order."""
        n = len(blocks)
        if not n:
            return
        if self._tail + n > len(self._buf):
            self._repack()
        self._place(blocks, self._tail)
        self._tail += n

    def _place(self, blocks: np.ndarray, at: int) -> None:
        self._buf[at : at + len(blocks)] = blocks
        self._pos[blocks] = self._places[at : at + len(blocks)]
        self._len += len(blocks)

    def _repack(self) -> None:
        live = self.blocks()
        self._holes = 0
        self._head = len(self._pos) + 1
        self._tail = self._head + len(live)
        self._buf[self._head : self._tail] = live
        self._pos[live] = self._places[self._head : self._tail]


class KVCacheManager:
    """Blocks per request, free-block accounting and the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is vLLM's null block)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_prefix_caching
        # block 0 is the null block; the free queue holds the rest in eviction order
        self.free_queue = FreeBlockQueue(num_blocks)
        self.free_queue.push_back(np.arange(1, num_blocks, dtype=np.int64))
        self._ref = np.zeros(num_blocks, dtype=np.int64)
        self._ranks = np.arange(num_blocks)  # 0, 1, ... (slices of it: quicker than np.arange)
        # content name of each block: owner NO_HASH (none), SHARED (see _shared_name)
        # or the request whose private block ``_index`` it holds; ``_serial`` orders
        # private registrations, so that of two copies the older one answers
        self._owner = np.full(num_blocks, NO_HASH, dtype=np.int64)
        self._index = np.zeros(num_blocks, dtype=np.int64)
        self._serial = np.zeros(num_blocks, dtype=np.int64)
        self._next_serial = 0
        #: request -> the blocks ever given its private names (some since evicted or renamed)
        self._named: dict[int, np.ndarray] = {}
        self._any_names = False  # whether any block was ever named (else every owner is NO_HASH)
        # shared name (group, index) -> the blocks holding it, oldest first. Like vLLM,
        # duplicates are kept (two requests may compute the same prefix block at once),
        # so evicting one copy leaves the other findable.
        self._shared: dict[tuple[int, int], dict[int, None]] = {}
        self._shared_name: dict[int, tuple[int, int]] = {}
        self.req_blocks: dict[int, list[int]] = {}
        #: requests that may hold named blocks (prefix hits adopted, shared blocks named): the
        #: others hold only blocks without a name, each alone, and ``free`` takes a short path
        self._holds_named: set[int] = set()
        self._num_cached_blocks: dict[int, int] = {}
        # prefix-cache statistics (tokens)
        self.prefix_queries = 0
        self.prefix_hits = 0
        # block-seconds per request: held blocks x time, summed in ticks (TICKS_PER_S) as
        # (blocks x release clock) - (sum of their acquisition clocks) at each free
        self.clock = 0.0
        self._block_ticks: dict[int, int] = {}
        self._acquired: dict[int, int] = {}

    # --- accounting -----------------------------------------------------
    @property
    def block_seconds(self) -> dict[int, float]:
        """Held blocks x time (s) per request that freed blocks, from the exact tick sums."""
        return {rid: t / TICKS_PER_S for rid, t in self._block_ticks.items()}

    @property
    def num_free_blocks(self) -> int:
        """Free blocks, cached-but-unused ones included (they can be evicted)."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by requests (the null block excluded)."""
        return self.num_blocks - 1 - len(self.free_queue)

    @property
    def usage(self) -> float:
        """vLLM's kv_cache_usage: the used share of the usable blocks (null block excluded)."""
        return 1.0 - len(self.free_queue) / (self.num_blocks - 1)

    def num_blocks_of(self, rid: int) -> int:
        return len(self.req_blocks.get(rid, ()))

    def num_blocks_held(self, reqs: list[SimRequest]) -> list[int]:
        """``num_blocks_of`` each of ``reqs``, which hold blocks (the fast path, for many)."""
        blocks = self.req_blocks
        return [len(blocks[r.rid]) for r in reqs]

    def blocks_held_together(self, reqs: list[SimRequest]) -> dict[tuple[int, ...], int]:
        """The blocks that several of ``reqs`` hold (shared prefix blocks), counted by their
        holders (indices into ``reqs``). A finishing request frees the blocks it holds alone;
        a block held together is freed with the last of its holders."""
        holders: dict[int, list[int]] = {}
        ref = self._ref
        for i, req in enumerate(reqs):
            if req.num_shared_blocks:
                for block in self.req_blocks.get(req.rid, ())[: req.num_shared_blocks]:
                    if ref[block] > 1:
                        holders.setdefault(block, []).append(i)
        out: dict[tuple[int, ...], int] = {}
        for together in holders.values():
            key = tuple(together)
            out[key] = out.get(key, 0) + 1
        return out

    def num_cached_blocks_of(self, rid: int) -> int:
        """How many of the request's blocks are registered in the prefix cache."""
        return self._num_cached_blocks.get(rid, 0)

    # --- prefix cache ---------------------------------------------------
    def computed_blocks(self, req: SimRequest, num_tokens: int, private: bool = True) -> list[int]:
        """Longest run of cached full blocks at the start of the request.

        At most ``num_tokens - 1`` tokens may hit, so that the last token is
        always computed (vLLM's rule). The request holds no blocks (it waits).
        ``private=False``: the shared prefix's hits only.
        """
        if not self.enable_caching:
            return []
        wanted = (num_tokens - 1) // self.block_size
        num_shared = min(req.num_shared_blocks, wanted)
        hit: list[int] = []
        name = req.shared_name
        for i in range(num_shared):
            blocks = self._shared.get(name(i))
            if not blocks:
                return hit
            hit.append(next(iter(blocks)))
        if private and wanted > num_shared and req.rid in self._named:
            hit.extend(self._private_hits(req.rid, num_shared, wanted))
        return hit

    def admission_blocks(self, req: SimRequest, num_tokens: int) -> int:
        """Free blocks admitting waiting ``req`` for ``num_tokens`` slots takes, its prefix-cache
        hits adopted (``blocks_needed`` with ``computed_blocks``). Its private hits are left out
        of the look-up: a waiting request holds none of its own blocks, so each private hit is
        a free block it adopts instead of a new one, and the count is the same."""
        return self.blocks_needed(req.rid, num_tokens, self.computed_blocks(req, req.num_tokens, private=False))

    def _private_hits(self, rid: int, start: int, stop: int) -> list[int]:
        """Cached private blocks start, start+1, ... (< stop) of ``rid``, up to the first miss."""
        named = self._named[rid]
        mine = self._owner[named] == rid
        count = np.count_nonzero(mine)
        if not count:  # (under load the usual case: all evicted)
            self._named[rid] = named[:0]
            return []
        blocks = named if count == len(named) else named[mine]
        index = self._index[blocks]
        lo, n = int(index[0]), len(index)
        if lo == start and int(index[-1]) - lo == n - 1 and not np.count_nonzero(index[1:] - index[:-1] - 1):
            # (usually) blocks start, start+1, ... in order, one copy of each (named at its frees)
            self._named[rid] = blocks
            return blocks[: stop - start].tolist()
        blocks = np.unique(blocks)  # (as np.flatnonzero(owner == rid))
        self._named[rid] = blocks
        index = self._index[blocks]
        keep = (index >= start) & (index < stop)
        blocks, index = blocks[keep], index[keep]
        order = np.lexsort((self._serial[blocks], index))  # by index, oldest copy first
        blocks, index = blocks[order], index[order]
        first = np.ones(len(index), dtype=bool)
        first[1:] = index[1:] != index[:-1]
        blocks, index = blocks[first], index[first]
        gap = np.flatnonzero(index != np.arange(start, start + len(index)))
        run = int(gap[0]) if len(gap) else len(index)
        return blocks[:run].tolist()

    def private_blocks_queued(self, rid: int) -> tuple[int, int] | None:
        """A waiting request's named private blocks as the free queue holds them: (h, entries
        ahead of them) for one copy each of blocks 0..h-1, all free, block h-1 nearest the front
        (as ``free`` leaves them; (0, 0): none), else None (its look-up would not be the
        in-order one of ``_private_hits``)."""
        named = self._named.get(rid)
        if named is None or not len(named):
            return 0, 0
        mine = named[self._owner[named] == rid]
        if not len(mine):
            return 0, 0
        if np.count_nonzero(self._index[mine] != self._ranks[: len(mine)]):  # (not 0, 1, ...)
            return None
        return self.free_queue.ahead_of(mine)

    def has_named_free(self, rid: int) -> bool:
        """Whether blocks named for ``rid`` wait in the free queue (cached, not yet evicted)."""
        named = self._named.get(rid)
        if named is None or not len(named):
            return False
        return bool(np.count_nonzero((self._owner[named] == rid) & (self.free_queue._pos[named] >= 0)))

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def cache_full_blocks(self, req: SimRequest, num_tokens: int) -> None:
        """Register the request's full blocks covering ``num_tokens`` tokens.

        Shared prefix blocks are named at once (other requests look them up);
        a private block can only be hit by its own request once it has freed
        it, so private blocks are named in bulk when the request frees them.
        """
        if not self.enable_caching:
            return
        rid = req.rid
        done = self._num_cached_blocks.get(rid, 0)
        if num_tokens // self.block_size <= done:  # the usual case: nothing new is full
            return
        blocks = self.req_blocks[rid]
        full = min(num_tokens // self.block_size, len(blocks))
        if full <= done:
            return
        self._num_cached_blocks[rid] = full
        owner = self._owner
        for i in range(done, min(full, req.num_shared_blocks)):
            block = blocks[i]
            if owner[block] == NO_HASH:
                self._any_names = True
                name = req.shared_name(i)
                self._shared.setdefault(name, {})[block] = None
                self._shared_name[block] = name
                owner[block] = SHARED
                self._holds_named.add(rid)

    def cache_private_blocks(self, rid: int, num_tokens: int) -> None:
        """``cache_full_blocks`` for a request without shared prefix blocks, by its id (an
        arrival a run of steps admits, before it comes)."""
        if not self.enable_caching:
            return
        full = min(num_tokens // self.block_size, len(self.req_blocks[rid]))
        if full > self._num_cached_blocks.get(rid, 0):
            self._num_cached_blocks[rid] = full

    def cache_many(self, reqs: list[SimRequest], num_tokens: list[int]) -> None:
        """``cache_full_blocks`` for many requests (the fast path, after a decode run)."""
        if not self.enable_caching:
            return
        bs = self.block_size
        cached = self._num_cached_blocks
        req_blocks = self.req_blocks
        for req, tokens in zip(reqs, num_tokens, strict=True):
            if cached.get(req.rid, 0) < req.num_shared_blocks:
                self.cache_full_blocks(req, tokens)
            else:
                cached[req.rid] = min(tokens // bs, len(req_blocks[req.rid]))

    def _name_private_blocks(self, rid: int, blocks: np.ndarray, num_cached: int, fresh: bool = False) -> None:
        """Name the request's registered blocks ``blocks[:num_cached]`` still without a name
        (``fresh``: none has one)."""
        blocks = blocks[:num_cached]
        index = self._ranks[: len(blocks)]
        if not fresh:
            unnamed = self._owner[blocks] == NO_HASH
            blocks, index = blocks[unnamed], index[unnamed]
        if not len(blocks):
            return
        self._any_names = True
        self._owner[blocks] = rid
        self._index[blocks] = index
        self._serial[blocks] = np.arange(self._next_serial, self._next_serial + len(blocks))
        self._next_serial += len(blocks)
        known = self._named.get(rid)
        self._named[rid] = blocks if known is None or not len(known) else np.concatenate((known, blocks))

    # --- allocation -----------------------------------------------------
    def blocks_needed(self, rid: int, num_tokens: int, hit_blocks: list[int] = ()) -> int:
        """Free blocks an allocation for ``num_tokens`` slots would consume."""
        held = len(self.req_blocks.get(rid, ()))
        need = max(cdiv(num_tokens, self.block_size) - held - len(hit_blocks), 0)
        if hit_blocks:
            need += int(np.count_nonzero(self._ref[hit_blocks] == 0))  # free cached ones
        return need

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
        blocks = self.req_blocks.get(rid)
        if blocks is not None and not hit_blocks and not full_sequence_tokens \
                and num_slots <= len(blocks) * self.block_size:
            return True  # the usual decode step: the held blocks have room
        free = len(self.free_queue)
        if full_sequence_tokens and self.blocks_needed(rid, full_sequence_tokens, hit_blocks) > free:
            return False
        if self.blocks_needed(rid, num_slots, hit_blocks) > free:
            return False
        blocks = self.req_blocks.setdefault(rid, [])
        num_new = max(cdiv(num_slots, self.block_size) - len(blocks) - len(hit_blocks), 0)
        if not hit_blocks and not num_new:
            return True
        if hit_blocks:
            self._holds_named.add(rid)
            hits = np.array(hit_blocks, dtype=np.int64)  # (distinct blocks)
            self.free_queue.remove_many(hits[self._ref[hits] == 0])
            self._ref[hits] += 1
        blocks.extend(hit_blocks)
        if num_new:
            blocks.extend(self.take_free_blocks(num_new).tolist())
        self._acquired[rid] = self._acquired.get(rid, 0) + (len(hit_blocks) + num_new) * ticks(self.clock)
        return True

    def append_block(self, rid: int) -> bool:
        """One more block for ``rid``, which holds blocks (a decode crossing a block boundary):
        ``allocate`` of one slot past its blocks, without the general case's work."""
        queue = self.free_queue
        if not queue._len:
            return False
        block = queue.pop_one()
        if self.enable_caching:
            owner = self._owner.item(block)
            if owner != NO_HASH:
                if owner == SHARED:
                    self._evict_shared(block)
                self._owner[block] = NO_HASH
        self._ref[block] = 1
        self.req_blocks[rid].append(block)
        acquired = self._acquired
        acquired[rid] = acquired.get(rid, 0) + round(self.clock * TICKS_PER_S)
        return True

    def take_free_blocks(self, n: int) -> np.ndarray:
        """Take ``n`` blocks from the front of the free queue, evicting their cached content."""
        blocks = self.free_queue.pop_front(n)
        owner = self._owner
        if self._any_names:  # (else no block has content to evict)
            if not self._shared_name:  # (no shared name to evict)
                pass
            elif n <= 2:
                for b in blocks.tolist():
                    if owner[b] == SHARED:
                        self._evict_shared(b)
            else:
                shared = blocks[owner[blocks] == SHARED]
                for b in shared.tolist():
                    self._evict_shared(b)
            owner[blocks] = NO_HASH
        self._ref[blocks] = 1
        return blocks

    def _evict_shared(self, block: int) -> None:
        name = self._shared_name.pop(block)
        copies = self._shared[name]
        del copies[block]
        if not copies:
            del self._shared[name]

    def open_table(self, rid: int) -> None:
        """Start ``rid``'s block table, empty (a run of steps admits it; its blocks come
        through ``add_taken_blocks``)."""
        self.req_blocks[rid] = []

    def add_taken_blocks(self, rid: int, blocks: list[int], acquired: int) -> None:
        """Give ``rid`` blocks already taken by ``take_free_blocks``; ``acquired`` sums the ticks
        of their acquisition clocks (``tick_sum``; the fast path hands out a run's blocks in bulk)."""
        self.req_blocks[rid].extend(blocks)
        self._acquired[rid] = self._acquired.get(rid, 0) + acquired

    def add_taken_runs(self, rids: list[int], blocks: list[int], ends: list[int], acquired: list[int]) -> None:
        """``add_taken_blocks`` for each of ``rids`` in turn: its blocks the next stretch of
        ``blocks``, up to its entry of ``ends``."""
        req_blocks, sums = self.req_blocks, self._acquired
        start = 0
        for rid, end, total in zip(rids, ends, acquired, strict=True):
            req_blocks[rid].extend(blocks[start:end])
            sums[rid] = sums.get(rid, 0) + total
            start = end

    def free(self, rid: int, finished: bool = False) -> None:
        """Release a request's blocks, tail first (``finished``: for good, not preempted).

        As vLLM's BlockPool.free_blocks: blocks without a content hash can
        never be hit, so they go to the front of the free queue (reused first);
        cached blocks go to the back, so the prefix cache evicts least recently
        freed first.
        """
        blocks = self.req_blocks.pop(rid, None)
        num_cached = self._num_cached_blocks.pop(rid, 0)
        if not blocks:
            return
        self._block_ticks[rid] = (self._block_ticks.get(rid, 0)
                                  + len(blocks) * ticks(self.clock) - self._acquired.pop(rid))
        held = np.array(blocks, dtype=np.int64)  # (quicker than np.fromiter from a list)
        if rid not in self._holds_named:
            # The usual case: private blocks only, none named yet, each held by this request
            # alone (a block is shared only through its name; a held block keeps its name, or
            # its lack of one, until it is freed). Its registered blocks (the
            # first num_cached) are cached: named if it was preempted (it may hit them when it
            # comes back); a finished request is done, so their names are not recorded.
            if num_cached and not finished:
                self._name_private_blocks(rid, held, num_cached, fresh=True)
            self._ref[held] = 0
            self.free_queue.push_front(held[num_cached:][::-1])
            self.free_queue.push_back(held[:num_cached][::-1])
            return
        self._holds_named.discard(rid)
        if num_cached:
            self._name_private_blocks(rid, held, num_cached)
        tail_first = held[::-1]
        ref = self._ref
        ref[tail_first] -= 1  # a request holds each block once
        released = tail_first[ref[tail_first] == 0]
        named = self._owner[released] != NO_HASH
        self.free_queue.push_front(released[~named])
        self.free_queue.push_back(released[named])

    def add_cached_prefix(self, group: int, num_blocks: int) -> int:
        """Put blocks 0..num_blocks-1 of shared prefix ``group`` into the prefix cache, free
        and evictable last, as if a request had computed and freed them (KV transferred from
        another replica, simulator.cluster.disagg); return how many fitted."""
        n = min(num_blocks, len(self.free_queue)) if self.enable_caching else 0
        if n <= 0:
            return 0
        blocks = self.take_free_blocks(n)
        for i, block in enumerate(blocks.tolist()):
            name = (group, i)
            self._shared.setdefault(name, {})[block] = None
            self._shared_name[block] = name
        self._owner[blocks] = SHARED
        self._any_names = True
        self._ref[blocks] = 0
        self.free_queue.push_back(blocks)
        return n
