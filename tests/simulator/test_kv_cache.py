from simulator.kv_cache import KVCacheManager


def private(rid):
    return lambda i: (rid, i)


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
    shared = lambda i: ("p", 0, i)  # noqa: E731
    assert kv.allocate(1, 64)
    kv.cache_full_blocks(1, shared, 64)
    kv.free(1)
    hits = kv.computed_blocks(shared, 65)
    assert len(hits) == 4  # all full blocks, the last token recomputed
    assert len(kv.computed_blocks(shared, 64)) == 3  # at most num_tokens - 1 tokens hit
    # a new private request takes free blocks: the tail blocks of request 1 go first
    assert kv.allocate(2, 16)
    assert len(kv.computed_blocks(shared, 65)) == 4  # block 0 (never cached) was taken first
    assert kv.allocate(3, 16)
    assert len(kv.computed_blocks(shared, 65)) == 3  # the tail block was evicted


def test_adopting_hits_consumes_free_blocks_and_shares_them():
    kv = KVCacheManager(num_blocks=8, block_size=16)
    shared = lambda i: ("p", 0, i)  # noqa: E731
    assert kv.allocate(1, 48)
    kv.cache_full_blocks(1, shared, 48)
    hits = kv.computed_blocks(shared, 49)
    assert len(hits) == 3
    assert kv.allocate(2, 49, hits)
    assert kv.num_used_blocks == 4  # three shared + one private
    kv.free(1)
    assert kv.num_used_blocks == 4  # still referenced by request 2
    kv.free(2)
    assert kv.num_used_blocks == 0


def test_block_seconds_integrate_held_blocks_over_time():
    kv = KVCacheManager(num_blocks=10, block_size=16)
    kv.clock = 0.0
    kv.allocate(1, 16)
    kv.clock = 2.0
    kv.allocate(1, 17)  # 1 block for 2 s
    kv.clock = 5.0
    kv.free(1)  # 2 blocks for 3 s
    assert abs(kv.block_seconds[1] - 8.0) < 1e-12
