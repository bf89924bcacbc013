"""A waiting run's blocks made step window by step window are the whole run's, as
``crossing_steps`` orders them, admissions inside it included."""

import numpy as np

from simulator.engine.run_blocks import RunBlocks
from simulator.engine.run_plan import crossing_steps


def _members(rng, n, bs):
    computed = rng.integers(0, 120, n)
    held = -(-computed // bs) + rng.integers(0, 2, n)
    first = rng.integers(1, 4, n)
    last = rng.integers(0, 220, n)
    return computed, held, first, last


def test_blocks_made_window_by_window_are_the_whole_runs():
    rng = np.random.default_rng(3)
    for _ in range(200):
        n, bs, k = int(rng.integers(1, 12)), int(rng.choice([1, 4, 16])), int(rng.integers(1, 200))
        computed, held, first, last = _members(rng, n, bs)
        steps, owners = crossing_steps(computed, held, bs, np.minimum(last, k), first)
        made = RunBlocks(bs, held * bs - computed + first, np.minimum(last, k))
        while made.upto < k:
            made.extend(min(k, made.upto + int(rng.integers(1, 40))))
        assert np.array_equal(made.steps, steps) and np.array_equal(made.owners, owners)
        assert not made.entry.any()
        counts = np.bincount(owners, minlength=n)
        assert np.array_equal(made.decodes_through(k), counts)
        assert [made.decodes_of(i, k) for i in range(n)] == counts.tolist()


def test_an_admission_drops_the_blocks_made_past_its_step_and_makes_them_again_with_its_own():
    # members admitted in step t: their prompt blocks in step t (a cut prefill's rest in t + 1),
    # their decodes from their first step; every block in vLLM's order (by step, then member)
    rng = np.random.default_rng(5)
    dropped = 0
    for _ in range(200):
        n, bs, k = int(rng.integers(1, 10)), int(rng.choice([1, 4, 16])), int(rng.integers(10, 200))
        computed, held, first, last = _members(rng, n, bs)
        cap = np.minimum(last, k)
        made = RunBlocks(bs, held * bs - computed + first, cap)
        t = int(rng.integers(1, k))
        made.extend(min(k, t + int(rng.integers(0, 50))))
        dropped += made.upto > t
        m = int(rng.integers(1, 4))
        tokens = rng.integers(1, 100, m)
        need = -(-tokens // bs)
        rest = np.zeros(m, dtype=np.int64)
        if rng.integers(2) and tokens[-1] >= 2:
            rest[-1] = int(rng.integers(1, tokens[-1]))
        new_first = t + 1 + (rest > 0)
        new_cap = np.minimum(t + rng.integers(1, 100, m) + (rest > 0), k)
        needs = need * bs - tokens + new_first
        prompt_owners = np.repeat(np.arange(m), need)
        rank = np.arange(len(prompt_owners)) - np.repeat(np.cumsum(need) - need, need)
        later = rank >= (-(-(tokens - rest) // bs))[prompt_owners]
        entry = np.where(later, 0, 1).astype(np.int8)
        made.add(t, needs, new_cap, t + later, prompt_owners + n, entry)
        made.extend(k)
        old_steps, old_owners = crossing_steps(computed, held, bs, cap, first)
        new_steps, new_owners = crossing_steps(tokens, need, bs, new_cap, new_first)
        steps = np.concatenate((old_steps, t + later, new_steps))
        owners = np.concatenate((old_owners, prompt_owners + n, new_owners + n))
        entries = np.concatenate((np.zeros(len(old_steps), dtype=np.int8), entry,
                                  np.zeros(len(new_steps), dtype=np.int8)))
        order = np.lexsort((owners, steps))
        assert np.array_equal(made.steps, steps[order]) and np.array_equal(made.owners, owners[order])
        assert np.array_equal(made.entry, entries[order])
        made.drop_from(n)
        assert np.array_equal(made.steps, old_steps) and np.array_equal(made.owners, old_owners)
    assert dropped > 100
