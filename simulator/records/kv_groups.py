"""vLLM's KV cache groups for models mixing full-attention and sliding-window layers (a record).

vLLM's hybrid allocator (``vllm/v1/core/kv_cache_utils.py``,
``_get_kv_cache_groups_uniform_page_size``) splits the layers of each attention
kind into groups of ``group_size`` layers: the smallest layer count among the
kinds, or the largest when that is under 1.5 times the smallest (padding the
smaller kind). Every group has its own block table but all draw on one block
pool, whose block holds ``block_size`` tokens of one group, so the pool gets
``available bytes / (page bytes per layer x group_size x block_size)`` blocks.
The allocator itself is simulator.engine.kv_layout.
"""

from __future__ import annotations

from dataclasses import dataclass


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVGroups:
    """How vLLM groups one model's attention layers (one group per ``group_size`` layers)."""

    group_size: int
    full_groups: int = 1
    sliding_groups: int = 0
    sliding_window: int = 0

    @property
    def hybrid(self) -> bool:
        return self.sliding_groups > 0

    def skipped_blocks(self, num_computed: int, block_size: int) -> int:
        """Blocks at a sliding-window group's start that no token after ``num_computed`` reads."""
        return max(0, num_computed - self.sliding_window + 1) // block_size

    def blocks_held(self, num_tokens: int, num_computed: int, block_size: int) -> int:
        """Pool blocks a request holds with slots for ``num_tokens`` after computing ``num_computed``."""
        blocks = cdiv(num_tokens, block_size)
        live_sliding = max(0, blocks - self.skipped_blocks(num_computed, block_size))
        return self.full_groups * blocks + self.sliding_groups * live_sliding


def kv_groups(full_layers: int, sliding_layers: int = 0, sliding_window: int = 0) -> KVGroups:
    """vLLM's grouping of ``full_layers`` full-attention and ``sliding_layers`` sliding-window layers."""
    if not sliding_layers:
        return KVGroups(group_size=full_layers)
    counts = (full_layers, sliding_layers)
    size = min(counts)
    if max(counts) < 1.5 * size:
        size = max(counts)
    return KVGroups(size, cdiv(full_layers, size), cdiv(sliding_layers, size), sliding_window)


def model_kv_groups(arch) -> KVGroups:
    """The groups of a ModelArchitecture (one group of all layers unless it has sliding windows)."""
    return kv_groups(arch.full_attention_layers, arch.sliding_window_layers, arch.sliding_window)
