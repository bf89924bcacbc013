"""The new KV blocks of a run planned while requests wait, made step window by step window.

A walk through such a run (``waiting_runs._WaitingRun``) reads its blocks near the step it has
reached; it makes them only so far (``RunBlocks.extend``), so that admitting requests inside
the run, whose blocks go in among the others, costs the blocks made past the admission's step,
not the whole run's.
"""

from __future__ import annotations

import numpy as np


class RunBlocks:
    """The blocks members take in steps 1..``upto`` (those made so far), in vLLM's order (by step,
    then member): ``steps``, ``owners`` and ``entry`` (0 a decode's block, 1 a new block of an
    admission's prompt, 2 a prefix hit it adopts). A member takes its decode blocks as
    ``run_plan.crossing_steps`` has it: from its first step needing one (``needs``), one every
    ``block_size`` steps, through its ``cap``. Members the run admits (``add``) come after the
    others, their prompt blocks before their decodes'."""

    def __init__(self, block_size: int, needs: np.ndarray, cap: np.ndarray):
        self.block_size = block_size
        self.needs = needs.astype(np.int64)
        self.cap = cap.astype(np.int64)
        self.upto = 0
        self.n = 0
        self._steps = np.empty(1024, dtype=np.int64)
        self._owners = np.empty(1024, dtype=np.int64)
        self._entry = np.empty(1024, dtype=np.int8)

    @property
    def steps(self) -> np.ndarray:
        return self._steps[: self.n]

    @property
    def owners(self) -> np.ndarray:
        return self._owners[: self.n]

    @property
    def entry(self) -> np.ndarray:
        return self._entry[: self.n]

    def decodes_through(self, u) -> np.ndarray:
        """Each member's decode blocks in steps 1..``u`` (within its cap)."""
        last = np.minimum(self.cap, u)
        return np.maximum((last - self.needs) // self.block_size + 1, 0)

    def decodes_of(self, i: int, u: int) -> int:
        """Member ``i``'s decode blocks in steps 1..``u`` (within its cap)."""
        last = min(int(self.cap[i]), u)
        needs = int(self.needs[i])
        return (last - needs) // self.block_size + 1 if last >= needs else 0

    def _decodes(self, lo: int, hi: int, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(steps, owners) of the decode blocks ``members`` take in steps lo..hi, by step then member."""
        bs = self.block_size
        needs = self.needs[members]
        low = np.maximum(-(-(lo - needs) // bs), 0)  # the first block's rank at lo or later
        high = (np.minimum(self.cap[members], hi) - needs) // bs  # the last one's at hi or before
        counts = np.maximum(high - low + 1, 0)
        owners = np.repeat(members, counts)
        rank = np.arange(len(owners)) - np.repeat(np.cumsum(counts) - counts, counts)
        steps = self.needs[owners] + bs * (rank + np.repeat(low, counts))
        if len(steps):
            small = hi - lo < 1 << 16
            order = np.argsort((steps - lo).astype(np.uint16) if small else steps, kind="stable")
            steps, owners = steps[order], owners[order]
        return steps, owners

    def _room(self, size: int) -> None:
        if size > len(self._steps):
            grown = max(size, 2 * len(self._steps))
            for name in ("_steps", "_owners", "_entry"):
                was = getattr(self, name)
                new = np.empty(grown, dtype=was.dtype)
                new[: self.n] = was[: self.n]
                setattr(self, name, new)

    def extend(self, upto: int) -> None:
        """Make the blocks of steps through ``upto``."""
        if upto <= self.upto:
            return
        steps, owners = self._decodes(self.upto + 1, upto, np.arange(len(self.needs)))
        n, m = self.n, len(steps)
        self._room(n + m)
        self._steps[n: n + m] = steps
        self._owners[n: n + m] = owners
        self._entry[n: n + m] = 0
        self.n = n + m
        self.upto = upto

    def stop_at(self, i: int, step: int) -> None:
        """Member ``i`` takes no block after ``step`` (those made already stay)."""
        self.cap[i] = min(int(self.cap[i]), step)

    def add(self, needs: np.ndarray, cap: np.ndarray, steps: np.ndarray, owners: np.ndarray,
            entry: np.ndarray) -> None:
        """New members (after every member), their prompt blocks (``steps``, ``owners`` by member
        then rank, ``entry``) before their decodes' (``needs``, ``cap``); blocks through ``upto``
        are made (the prompt blocks of later steps move it on)."""
        if len(steps) and int(steps.max()) > self.upto:
            self.extend(int(steps.max()))
        j0 = len(self.needs)
        self.needs = np.concatenate((self.needs, needs.astype(np.int64)))
        self.cap = np.concatenate((self.cap, cap.astype(np.int64)))
        lo = int(steps.min()) if len(steps) else self.upto + 1
        ds, downers = self._decodes(lo, self.upto, np.arange(j0, len(self.needs)))
        steps = np.concatenate((steps, ds))
        owners = np.concatenate((owners, downers))
        entry = np.concatenate((entry, np.zeros(len(ds), dtype=np.int8)))
        if not len(steps):
            return
        order = np.lexsort((owners, steps))  # by step, then member (stable: prompt blocks first)
        steps, owners, entry = steps[order], owners[order], entry[order]
        # each new block goes after the blocks of its step made before (members before them)
        start = int(np.searchsorted(self.steps, steps[0], side="right"))
        tail = slice(start, self.n)
        old_steps = self._steps[tail].copy()
        at = np.searchsorted(old_steps, steps, side="right") + np.arange(len(steps))
        size = self.n - start + len(steps)
        old = np.ones(size, dtype=bool)
        old[at] = False
        self._room(self.n + len(steps))
        for name, new in (("_steps", steps), ("_owners", owners), ("_entry", entry)):
            buf = getattr(self, name)
            merged = np.empty(size, dtype=buf.dtype)
            merged[old] = buf[tail]
            merged[at] = new
            buf[start: start + size] = merged
        self.n += len(steps)

    def drop_from(self, j0: int) -> None:
        """Members ``j0`` on go, with their blocks."""
        keep = np.flatnonzero(self.owners < j0)
        m = len(keep)
        for name in ("_steps", "_owners", "_entry"):
            buf = getattr(self, name)
            buf[:m] = buf[keep]
        self.n = m
        self.needs, self.cap = self.needs[:j0], self.cap[:j0]
