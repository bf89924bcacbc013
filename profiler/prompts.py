"""Deterministic prompt token ids for the profiler's requests.

A *stream* is a seeded sequence of random token ids; a request's prompt is the
first n tokens of a stream. Requests that use the same stream share a prefix,
which is what lets the prefix cache skip recomputing long contexts between grid
points; different streams share nothing. Special token ids (the first
``FIRST_TOKEN_ID``) are never used.
"""

from __future__ import annotations

import hashlib

import numpy as np

FIRST_TOKEN_ID = 16


class TokenStreams:
    """Seeded random token streams over a vocabulary."""

    def __init__(self, vocab_size: int, seed: int, max_len: int):
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        self.max_len = int(max_len)
        self._cache: dict[str, np.ndarray] = {}

    def _stream(self, key: str) -> np.ndarray:
        if key not in self._cache:
            digest = int.from_bytes(hashlib.sha256(f"{self.seed}:{key}".encode()).digest()[:8], "little")
            rng = np.random.default_rng(digest)
            self._cache[key] = rng.integers(FIRST_TOKEN_ID, self.vocab_size, size=self.max_len)
        return self._cache[key]

    def tokens(self, key: str, n: int) -> list[int]:
        """The first n tokens of stream ``key``."""
        if n > self.max_len:
            raise ValueError(f"asked for {n} tokens, streams hold {self.max_len}")
        return self._stream(key)[:n].tolist()

    def repetitive(self, key: str, n: int, pattern_tokens: int) -> list[int]:
        """n tokens repeating a random pattern: n-gram drafters find matches in it."""
        pattern = self._stream(key)[:pattern_tokens]
        reps = -(-n // pattern_tokens)
        return np.tile(pattern, reps)[:n].tolist()

    def forget(self, key: str) -> None:
        """Drop a stream from memory (one-off suffixes)."""
        self._cache.pop(key, None)
