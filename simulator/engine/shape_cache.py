"""The engine's recent step shapes: which token counts its kernels are set up for.

vLLM's CPU engine keeps, per linear layer, the oneDNN primitives of its most recent row
counts (``ShapeCacheCost.capacity`` of them, least recently used evicted); a step with a
token count not among them builds new ones first (``ShapeCacheCost.miss_s``). This keeps
that state for one engine: ``charge`` is called once per executed step, in order.
Decode-only steps are taken as warm and leave the state alone (their token count is the
running count: a few recurring values), so the fast path's decode runs need no charge;
steps that prefill go step by step when a model has a shape cache (``Arrivals.admit``).
"""

from __future__ import annotations

from collections import OrderedDict

from simulator.records.performance import ShapeCacheCost, StepBatch


class ShapeCache:
    """An LRU of token counts, charged per executed step that prefills."""

    def __init__(self, cost: ShapeCacheCost, warm: list[int] | None = None):
        self.cost = cost
        self._recent: OrderedDict[int, None] = OrderedDict()
        for tokens in warm or []:  # counts the engine ran before serving (its warm-up)
            self._touch(tokens)
        self.misses = 0
        #: seconds charged so far
        self.seconds = 0.0

    def _touch(self, tokens: int) -> bool:
        """Mark ``tokens`` most recent; True if it was already there."""
        recent = self._recent
        if tokens in recent:
            recent.move_to_end(tokens)
            return True
        recent[tokens] = None
        if len(recent) > self.cost.capacity:
            recent.popitem(last=False)
        return False

    def charge(self, batch: StepBatch) -> float:
        """Seconds this step adds for shapes it meets first (0 for a decode-only step)."""
        if not batch.prefill_tokens:
            return 0.0
        tokens = batch.num_tokens
        if self._touch(tokens):
            return 0.0
        self.misses += 1
        miss = self.cost.miss_s(tokens)
        self.seconds += miss
        return miss

    def report(self) -> dict:
        """The run summary's ``shape_cache`` section: misses, seconds charged, and the cost's terms."""
        return {"misses": self.misses, "seconds": self.seconds, **self.cost.to_dict()}
