from collections import OrderedDict
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.engine.kv_cache import (
    TICKS_PER_S,
    FreeBlockQueue,
    KVCacheManager,
    tick_sum,
    tick_sums,
)
from simulator.engine.request import SimRequest


def request(rid, group=-1, prefix=0, block_size=16):
    """A request whose first ``prefix`` tokens are shared with its prefix group."""
    return SimRequest(rid, 0.0, max(prefix, 1), 1, prefix_group=group, prefix_tokens=prefix,
                      block_size=block_size)


# --- the free-block queue ---------------------------------------------------------------


def test_queue_pops_in_order_and_pushes_to_either_end():
    q = FreeBlockQueue(10)
    q.push_back(np.arange(1, 10))
    assert q.pop_front(3).tolist() == [1, 2, 3]
    q.push_front(np.array([3, 1]))  # in their order, before the old front
    q.push_back(np.array([2]))
    assert q.blocks().tolist() == [3, 1, 4, 5, 6, 7, 8, 9, 2]
    assert len(q) == 9
    assert q.pop_front(1).tolist() == [3]
    assert q.pop_front(8).tolist() == [1, 4, 5, 6, 7, 8, 9, 2]
    assert len(q) == 0
    with pytest.raises(IndexError):
        q.pop_front(1)


def test_removed_blocks_leave_holes_that_pops_skip():
    q = FreeBlockQueue(10)
    q.push_back(np.arange(1, 10))
    q.remove(2)
    assert 2 not in q and 5 in q
    q.remove(5)
    assert len(q) == 7
    assert q.pop_front(1).tolist() == [1]
    assert q.pop_front(4).tolist() == [3, 4, 6, 7]  # a bulk pop across both holes
    q.push_back(np.array([5]))  # a removed block queued again sits at its new place only
    assert q.blocks().tolist() == [8, 9, 5]
    with pytest.raises(KeyError):
        q.remove(2)


def test_removing_several_blocks_at_once_is_removing_each():
    """``remove_many`` (a request's prefix hits on free cached blocks) leaves the queue that
    removing its blocks one by one leaves, and changes nothing when one is not free."""
    one, several = FreeBlockQueue(12), FreeBlockQueue(12)
    for q in (one, several):
        q.push_back(np.arange(1, 12))
    for b in (9, 2, 5):
        one.remove(b)
    several.remove_many(np.array([9, 2, 5]))
    assert len(several) == len(one) == 8
    assert several.blocks().tolist() == one.blocks().tolist()
    assert several.pop_front(5).tolist() == one.pop_front(5).tolist() == [1, 3, 4, 6, 7]
    with pytest.raises(KeyError):
        several.remove_many(np.array([10, 2]))
    assert several.blocks().tolist() == [8, 10, 11]


def test_queue_keeps_its_order_across_repacking():
    # 600 pushes into a buffer of 3 x 6 + 3 entries: the live entries are repacked many times
    q = FreeBlockQueue(6)
    q.push_back(np.arange(1, 6))
    ref = OrderedDict.fromkeys(range(1, 6))
    for i in range(300):
        a, b = q.pop_front(2).tolist()
        assert [a, b] == [ref.popitem(last=False)[0] for _ in range(2)]
        q.push_front(np.array([a]))
        q.push_back(np.array([b]))
        ref[a] = None
        ref.move_to_end(a, last=False)
        ref[b] = None
        if i % 5 == 0:  # a hole in the middle, and the block queued again at the back
            middle = list(ref)[2]
            q.remove(middle)
            q.push_back(np.array([middle]))
            ref.move_to_end(middle)
        assert q.blocks().tolist() == list(ref)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("pfbr"), st.integers(0, 40)), max_size=80))
def test_queue_matches_an_ordered_dict(ops):
    num_blocks = 41
    q = FreeBlockQueue(num_blocks)
    q.push_back(np.arange(1, num_blocks))
    ref = OrderedDict.fromkeys(range(1, num_blocks))
    taken: list[int] = []
    for op, x in ops:
        if op == "p":
            n = min(x, len(ref))
            got = q.pop_front(n).tolist()
            want = [ref.popitem(last=False)[0] for _ in range(n)]
            assert got == want
            taken.extend(want)
        elif op in "fb" and taken:
            back = taken[-(x % len(taken) + 1):]
            del taken[-(x % len(taken) + 1):]
            (q.push_front if op == "f" else q.push_back)(np.array(back))
            if op == "f":
                for b in reversed(back):
                    ref[b] = None
                    ref.move_to_end(b, last=False)
            else:
                ref.update(dict.fromkeys(back))
        elif op == "r" and ref:
            b = list(ref)[x % len(ref)]
            q.remove(b)
            del ref[b]
            taken.append(b)
        assert len(q) == len(ref)
    assert q.blocks().tolist() == list(ref)


# --- the KV cache manager ---------------------------------------------------------------


def test_null_block_is_reserved_and_blocks_follow_tokens():
    kv = KVCacheManager(num_blocks=10, block_size=16)
    assert kv.num_free_blocks == 9
    assert kv.allocate(1, 17)  # 17 tokens -> 2 blocks
    assert kv.num_blocks_of(1) == 2 and kv.num_used_blocks == 2
    assert kv.allocate(1, 32)  # still 2 blocks
    assert kv.num_blocks_of(1) == 2
    assert kv.allocate(1, 33)
    assert kv.num_blocks_of(1) == 3
    kv.free(1)
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == 9
    assert 0 not in kv.free_queue.blocks()


def test_allocation_fails_without_change_when_blocks_are_missing():
    kv = KVCacheManager(num_blocks=5, block_size=16)
    assert kv.allocate(1, 48)
    assert not kv.allocate(2, 33)  # needs 3, 1 free
    assert kv.num_blocks_of(2) == 0 and kv.num_free_blocks == 1


def test_full_sequence_gate_checks_the_whole_prompt():
    kv = KVCacheManager(num_blocks=5, block_size=16)
    # first chunk fits (1 block) but the whole 100-token sequence (7 blocks) does not
    assert not kv.allocate(1, 16, full_sequence_tokens=100)
    assert kv.allocate(1, 16, full_sequence_tokens=64)


def test_prefix_cache_hits_survive_free_until_evicted():
    kv = KVCacheManager(num_blocks=6, block_size=16)
    assert kv.allocate(1, 64)
    kv.cache_full_blocks(request(1, group=0, prefix=64), 64)
    kv.free(1)
    other = request(2, group=0, prefix=64)
    assert len(kv.computed_blocks(other, 65)) == 4  # all full blocks, the last token recomputed
    assert len(kv.computed_blocks(other, 64)) == 3  # at most num_tokens - 1 tokens hit
    assert kv.computed_blocks(request(3, group=1, prefix=64), 65) == []  # another group
    # a new private request takes free blocks: the tail blocks of request 1 go first
    assert kv.allocate(4, 16)
    assert len(kv.computed_blocks(other, 65)) == 4  # block 0 (never cached) was taken first
    assert kv.allocate(5, 16)
    assert len(kv.computed_blocks(other, 65)) == 3  # the tail block was evicted


def test_adopting_hits_consumes_free_blocks_and_shares_them():
    kv = KVCacheManager(num_blocks=8, block_size=16)
    assert kv.allocate(1, 48)
    kv.cache_full_blocks(request(1, group=0, prefix=48), 48)
    hits = kv.computed_blocks(request(2, group=0, prefix=48), 49)
    assert len(hits) == 3
    assert kv.allocate(2, 49, hits)
    assert kv.num_used_blocks == 4  # three shared + one private
    kv.free(1)
    assert kv.num_used_blocks == 4  # still referenced by request 2
    kv.free(2)
    assert kv.num_used_blocks == 0


def test_a_preempted_request_hits_its_own_freed_blocks_oldest_copy_first():
    kv = KVCacheManager(num_blocks=12, block_size=16)
    me = request(1)
    assert kv.allocate(1, 64)
    kv.cache_full_blocks(me, 64)
    first = list(kv.req_blocks[1])
    kv.free(1)  # preempted: its blocks queue up at the back, tail first
    assert kv.computed_blocks(me, 65) == first
    assert kv.computed_blocks(me, 40) == first[:2]
    assert kv.computed_blocks(request(2), 65) == []  # private blocks are the request's own
    # back with block 0 only, the request recomputes blocks 1..3: two copies of each now
    assert kv.allocate(1, 64, first[:1])
    kv.cache_full_blocks(me, 64)
    second = list(kv.req_blocks[1])
    assert second[0] == first[0] and not set(second[1:]) & set(first)
    kv.free(1)
    assert kv.computed_blocks(me, 65) == first  # the older copies answer
    # evict the old copy of block 3 (the first of the request's blocks in the queue)
    queue = kv.free_queue.blocks().tolist()
    assert kv.allocate(2, 16 * (queue.index(first[3]) + 1))
    assert kv.computed_blocks(me, 65) == first[:3] + second[3:]


def test_caching_many_requests_at_once_equals_one_by_one():
    def state(bulk):
        kv = KVCacheManager(num_blocks=40, block_size=4)
        reqs = [request(0), request(1, group=0, prefix=8), request(2), request(3, group=0, prefix=8)]
        for r, slots in zip(reqs, (10, 14, 3, 17), strict=True):
            assert kv.allocate(r.rid, slots)
        kv.cache_full_blocks(reqs[0], 4)
        tokens = [10, 14, 3, 17]
        if bulk:
            kv.cache_many(reqs, tokens)
        else:
            for r, t in zip(reqs, tokens, strict=True):
                kv.cache_full_blocks(r, t)
        for r in reqs:
            kv.free(r.rid)
        return [kv.computed_blocks(r, 40) for r in reqs], kv.free_queue.blocks().tolist()

    assert state(bulk=True) == state(bulk=False)
    hits, _ = state(bulk=True)
    assert [len(h) for h in hits] == [2, 3, 0, 4]


@pytest.mark.parametrize("caching", [True, False])
def test_one_block_at_a_boundary_is_what_allocate_gives(caching):
    # a decode crossing a block boundary takes its block through append_block: the same block,
    # the same evictions (shared and private names), the same queue and accounting as allocate
    def history():
        kv = KVCacheManager(num_blocks=14, block_size=4, enable_prefix_caching=caching)
        kv.clock = 1.0
        reqs = [request(0, group=0, prefix=8, block_size=4), request(1, block_size=4),
                request(2, block_size=4)]
        for r, slots in zip(reqs, (8, 12, 4), strict=True):
            assert kv.allocate(r.rid, slots)
            kv.cache_full_blocks(r, slots)
        kv.free(0)  # shared prefix blocks, named, to the back of the queue
        kv.free(1)  # private blocks named in bulk, to the back
        kv.clock = 2.5
        return kv

    a, b = history(), history()
    while True:  # request 2 grows one block at a time until the cache is full
        held = len(a.req_blocks[2])
        grown_a = a.allocate(2, held * 4 + 1)
        grown_b = b.append_block(2)
        assert grown_a == grown_b
        assert a.req_blocks == b.req_blocks
        assert a.free_queue.blocks().tolist() == b.free_queue.blocks().tolist()
        assert a.computed_blocks(request(3, group=0, prefix=8, block_size=4), 9) == \
               b.computed_blocks(request(3, group=0, prefix=8, block_size=4), 9)
        assert a.computed_blocks(request(1, block_size=4), 13) == b.computed_blocks(request(1, block_size=4), 13)
        if not grown_a:
            break
    a.free(2)
    b.free(2)
    assert a.block_seconds == b.block_seconds
    assert a.num_used_blocks == b.num_used_blocks == 0


def test_block_seconds_integrate_held_blocks_over_time():
    kv = KVCacheManager(num_blocks=10, block_size=16)
    kv.clock = 0.0
    kv.allocate(1, 16)
    kv.clock = 2.0
    kv.allocate(1, 17)  # 1 block for 2 s
    kv.clock = 5.0
    kv.free(1)  # 2 blocks for 3 s
    assert kv.block_seconds[1] == 8.0


def test_block_seconds_are_blocks_times_held_time_in_whole_ticks():
    # clocks off the 2**-30 s grid: each is rounded once, the sum is exact
    kv = KVCacheManager(num_blocks=10, block_size=16)
    kv.clock = 0.1
    kv.allocate(1, 48)  # 3 blocks from 0.1 s
    kv.clock = 0.7
    assert kv.append_block(1)  # a 4th from 0.7 s
    kv.clock = 1000.3
    kv.free(1)
    t = [round(c * TICKS_PER_S) for c in (0.1, 0.7, 1000.3)]
    assert kv.block_seconds[1] == (3 * (t[2] - t[0]) + (t[2] - t[1])) / TICKS_PER_S
    assert abs(kv.block_seconds[1] - (3 * 1000.2 + 999.6)) < 4 * 2.0**-30


@settings(max_examples=200, deadline=None)
@given(clocks=st.lists(st.floats(0.0, 90_000.0), min_size=1, max_size=60), cuts=st.sets(st.integers(1, 59)),
       release=st.floats(90_000.0, 100_000.0))
def test_block_seconds_do_not_depend_on_how_acquisitions_are_grouped(clocks, cuts, release):
    # the step-by-step path takes one block at a time; the fast path hands out a run's blocks in
    # bulk, the run cut anywhere: the same bits either way
    clocks = sorted(clocks)
    one = KVCacheManager(num_blocks=64, block_size=1)
    for i, c in enumerate(clocks):
        one.clock = c
        assert one.allocate(7, 1) if i == 0 else one.append_block(7)
    bulk = KVCacheManager(num_blocks=64, block_size=1)
    bulk.open_table(7)
    bounds = [0, *sorted(c for c in cuts if c < len(clocks)), len(clocks)]
    for a, b in pairwise(bounds):
        taken = bulk.take_free_blocks(b - a).tolist()
        bulk.add_taken_blocks(7, taken, tick_sum(np.array(clocks[a:b])))
    runs = KVCacheManager(num_blocks=64, block_size=1)
    runs.open_table(7)
    runs.add_taken_runs([7], runs.take_free_blocks(len(clocks)).tolist(), [len(clocks)],
                        tick_sums(np.array(clocks), np.array([0])))
    for kv in (one, bulk, runs):
        kv.clock = release
        kv.free(7)
    assert one.block_seconds[7] == bulk.block_seconds[7] == runs.block_seconds[7]
    assert one.req_blocks == bulk.req_blocks == runs.req_blocks


def test_tick_sums_are_exact_far_past_float_precision():
    clocks = np.full(70_000, 86_400.0 * 3) + np.arange(70_000) * 1e-3  # three days in, 70,000 blocks
    starts = np.array([0, 1, 40_000])
    exact = [sum(round(c * TICKS_PER_S) for c in part.tolist())
             for part in np.split(clocks, starts[1:])]
    assert tick_sums(clocks, starts) == exact
    assert tick_sum(clocks) == sum(exact)


class ReferenceKV:
    """The block pool written the plain way (an OrderedDict free queue, tuple content
    names in one dict), as vLLM's BlockPool reads: the oracle for KVCacheManager."""

    def __init__(self, num_blocks, block_size):
        self.block_size = block_size
        self.free_queue = OrderedDict.fromkeys(range(1, num_blocks))
        self.ref = [0] * num_blocks
        self.name = [None] * num_blocks
        self.cached = {}
        self.req_blocks = {}
        self.num_cached = {}

    @staticmethod
    def block_name(req, i):
        return ("prefix", req.prefix_group, i) if i < req.num_shared_blocks else (req.rid, i)

    def computed_blocks(self, req, num_tokens):
        hit = []
        for i in range((num_tokens - 1) // self.block_size):
            copies = self.cached.get(self.block_name(req, i))
            if not copies:
                break
            hit.append(next(iter(copies)))
        return hit

    def allocate(self, rid, num_slots, hits):
        blocks = self.req_blocks.setdefault(rid, [])
        num_new = max(-(-num_slots // self.block_size) - len(blocks) - len(hits), 0)
        if num_new + sum(self.ref[b] == 0 for b in hits) > len(self.free_queue):
            return False
        for b in hits:
            if self.ref[b] == 0:
                del self.free_queue[b]
            self.ref[b] += 1
            blocks.append(b)
        for _ in range(num_new):
            b, _ = self.free_queue.popitem(last=False)
            if self.name[b] is not None:
                del self.cached[self.name[b]][b]
                if not self.cached[self.name[b]]:
                    del self.cached[self.name[b]]
                self.name[b] = None
            self.ref[b] = 1
            blocks.append(b)
        return True

    def cache_full_blocks(self, req, num_tokens):
        blocks = self.req_blocks[req.rid]
        full = min(num_tokens // self.block_size, len(blocks))
        for i in range(self.num_cached.get(req.rid, 0), full):
            if self.name[blocks[i]] is None:
                self.name[blocks[i]] = self.block_name(req, i)
                self.cached.setdefault(self.name[blocks[i]], {})[blocks[i]] = None
        self.num_cached[req.rid] = max(full, self.num_cached.get(req.rid, 0))

    def free(self, rid):
        self.num_cached.pop(rid, None)
        first = []
        for b in reversed(self.req_blocks.pop(rid, [])):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.name[b] is None:
                    first.append(b)
                else:
                    self.free_queue[b] = None
        for b in reversed(first):
            self.free_queue[b] = None
            self.free_queue.move_to_end(b, last=False)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from("aacfm"), st.integers(0, 5), st.integers(1, 20)),
                 min_size=10, max_size=120),
    num_blocks=st.integers(6, 30),
)
def test_kv_cache_matches_the_reference_block_pool(ops, num_blocks):
    # six requests, two sharing a prefix group; sequences of allocations (with prefix hits
    # for requests holding nothing), registrations, frees (preemptions) and bulk registrations
    block_size = 4
    reqs = [request(rid, group=rid % 2 if rid < 4 else -1, prefix=12 if rid < 4 else 0,
                    block_size=block_size) for rid in range(6)]
    tokens = dict.fromkeys(range(6), 0)
    kv, ref = KVCacheManager(num_blocks, block_size), ReferenceKV(num_blocks, block_size)
    for op, rid, n in ops:
        req = reqs[rid]
        if op == "a":
            hits = kv.computed_blocks(req, tokens[rid] + n) if not kv.num_blocks_of(rid) else []
            assert hits == (ref.computed_blocks(req, tokens[rid] + n) if not ref.req_blocks.get(rid) else [])
            ok = kv.allocate(rid, tokens[rid] + n, hits)
            assert ok == ref.allocate(rid, tokens[rid] + n, hits)
            if ok:
                tokens[rid] += n
        elif op == "c" and kv.num_blocks_of(rid):
            kv.cache_full_blocks(req, tokens[rid])
            ref.cache_full_blocks(req, tokens[rid])
        elif op == "m":
            holding = [r for r in reqs if kv.num_blocks_of(r.rid)]
            kv.cache_many(holding, [tokens[r.rid] for r in holding])
            for r in holding:
                ref.cache_full_blocks(r, tokens[r.rid])
        elif op == "f":
            kv.free(rid)
            ref.free(rid)
            tokens[rid] = 0
        assert kv.req_blocks.get(rid, []) == ref.req_blocks.get(rid, [])
        assert kv.free_queue.blocks().tolist() == list(ref.free_queue)
    for req in reqs:
        kv.free(req.rid)
        ref.free(req.rid)
    assert kv.free_queue.blocks().tolist() == list(ref.free_queue)
    for req in reqs:  # what each request would find on coming back
        assert kv.computed_blocks(req, 200) == ref.computed_blocks(req, 200)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["pop", "pop1", "pop_one", "remove", "front", "back"]),
                          st.integers(0, 1000)), max_size=80))
def test_queue_matches_a_list_and_counts_its_holes(ops):
    # the queue against a plain list model; the hole count (which lets a pop skip the check
    # for holes) is always the number of dead entries in the queue's stretch
    size = 12
    q = FreeBlockQueue(size)
    q.push_back(np.arange(1, size))
    model = list(range(1, size))
    out: list[int] = []  # blocks taken, to push again
    for op, x in ops:
        if op in ("pop", "pop1", "pop_one") and model:
            n = 1 if op != "pop" else 1 + x % len(model)
            got = [q.pop_one()] if op == "pop_one" else q.pop_front(n).tolist()
            assert got == model[: len(got)]
            del model[: len(got)]
            out += got
        elif op == "remove" and model:
            b = model.pop(x % len(model))
            q.remove(b)
            out.append(b)
        elif op in ("front", "back") and out:
            b = out.pop(x % len(out))
            if op == "front":
                q.push_front(np.array([b]))
                model.insert(0, b)
            else:
                q.push_back(np.array([b]))
                model.append(b)
        assert q.blocks().tolist() == model and len(q) == len(model)
        stretch = q._buf[q._head : q._tail]
        assert q._holes == int((q._pos[stretch] != np.arange(q._head, q._tail)).sum())
