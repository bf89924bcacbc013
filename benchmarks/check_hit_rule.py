"""Check the count rule for a returning victim's prefix-cache hits against the simulator's own
look-ups, on the overloaded case (docs/benchmarks.md, the next step for admissions inside runs).

A preempted request's named blocks go to the back of the free queue, tail first (its blocks
without a name to the front); blocks are taken from the front. So when it comes back its blocks
0..m-1 are still cached, m = h - min(h, D): h its named blocks, D the largest deficit
T - (A + U - R), at least 0, after any take since its free (A the entries ahead of its blocks
then; since then T the blocks taken, U those pushed to the front, R those ahead adopted as hits),
and m at most (its tokens - 1) // block_size. The instrument wraps the free queue and the KV
cache manager, keeps the counts per waiting victim, and compares m with every private look-up of
a victim without a shared prefix.

    python benchmarks/check_hit_rule.py           # 3,000 requests of the overloaded case
    python benchmarks/check_hit_rule.py 10000     # all of it (a minute or two)
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_simulator import LOAD, spec_for  # noqa: E402
from simulator.configure import build_run  # noqa: E402
from simulator.engine import kv_cache  # noqa: E402
from simulator.engine.loop import simulate  # noqa: E402


def instrument(counts: Counter) -> None:
    totals = {"taken": 0, "front": 0}
    victims: dict[int, dict] = {}  # request id -> its counts since its latest free
    queue_cls, manager_cls = kv_cache.FreeBlockQueue, kv_cache.KVCacheManager
    pop_front, pop_one, push_front = queue_cls.pop_front, queue_cls.pop_one, queue_cls.push_front
    push_back, remove_many = queue_cls.push_back, queue_cls.remove_many
    free, computed_blocks = manager_cls.free, manager_cls.computed_blocks

    def deficits() -> None:
        for v in victims.values():
            d = (totals["taken"] - v["taken"]) - (v["ahead"] + totals["front"] - v["front"] - v["adopted"])
            v["deficit"] = max(v["deficit"], d)

    def counted_pop_front(self, n):
        totals["taken"] += n
        out = pop_front(self, n)
        deficits()
        return out

    def counted_pop_one(self):
        totals["taken"] += 1
        out = pop_one(self)
        deficits()
        return out

    def counted_push_front(self, blocks):
        totals["front"] += len(blocks)
        return push_front(self, blocks)

    def counted_remove_many(self, blocks):
        if victims:
            rids = list(victims)
            tails = self._pos[np.array([victims[r]["tail"] for r in rids])]
            before = np.searchsorted(np.sort(self._pos[blocks]), tails)  # removed entries ahead
            for rid, tail, n in zip(rids, tails.tolist(), before.tolist(), strict=True):
                if tail >= 0:
                    victims[rid]["adopted"] += n
        return remove_many(self, blocks)

    def counted_free(self, rid, finished=False):
        victims.pop(rid, None)
        if finished or not self.enable_caching:
            return free(self, rid, finished)
        seen = {}

        def first_push_back(queue, blocks):
            if queue is self.free_queue and not seen and len(blocks):
                seen.update(ahead=len(queue), named=len(blocks), tail=int(blocks[0]))
            return push_back(queue, blocks)

        queue_cls.push_back = first_push_back
        try:
            free(self, rid, finished)
        finally:
            queue_cls.push_back = push_back
        if seen:
            victims[rid] = dict(seen, taken=totals["taken"], front=totals["front"], adopted=0, deficit=0)

    def checked_computed_blocks(self, req, num_tokens, private=True):
        hits = computed_blocks(self, req, num_tokens, private)
        v = victims.get(req.rid)
        if private and v is not None and not req.num_shared_blocks:
            m = min(v["named"] - min(v["named"], v["deficit"]), (num_tokens - 1) // self.block_size)
            counts["look-ups"] += 1
            counts["with hits"] += bool(hits)
            counts["agree" if m == len(hits) else "disagree"] += 1
        return hits

    queue_cls.pop_front, queue_cls.pop_one = counted_pop_front, counted_pop_one
    queue_cls.push_front, queue_cls.remove_many = counted_push_front, counted_remove_many
    manager_cls.free, manager_cls.computed_blocks = counted_free, checked_computed_blocks


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    counts: Counter = Counter()
    instrument(counts)
    spec = build_run(spec_for(4.0, n, extra=LOAD))
    simulate(spec.workload, spec.engine, spec.perf, slo=spec.slo, seed=spec.seed, fast=True)
    print(f"{n} overloaded requests: {counts['look-ups']:,} private look-ups of returning victims, "
          f"{counts['with hits']:,} with hits; the rule agrees in {counts['agree']:,}, "
          f"disagrees in {counts['disagree']:,}")
    return 1 if counts["disagree"] else 0


if __name__ == "__main__":
    sys.exit(main())
