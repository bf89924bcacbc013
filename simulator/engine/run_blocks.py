"""The new KV blocks of a run planned while requests wait, made step window by step window.

A walk through such a run (``waiting_runs._WaitingRun``) reads its blocks near the step it has
reached; it makes them only so far (``RunBlocks.extend``), so that admitting requests inside
the run, whose blocks go in among the others, costs the blocks made past the admission's step,
not the whole run's.
"""

from __future__ import annotations

import numpy as np

from simulator.engine.run_plan import decode_blocks, decode_blocks_of


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
        #: prompt blocks of steps not made yet (a cut prefill's rest): steps, owners, entry
        self._later = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int8))

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
        return decode_blocks(self.needs, np.minimum(self.cap, u), self.block_size)

    def decodes_of(self, i: int, u: int) -> int:
        """Member ``i``'s decode blocks in steps 1..``u`` (within its cap)."""
        return decode_blocks_of(int(self.needs[i]), min(int(self.cap[i]), u), self.block_size)

    def _decodes(self, lo: int, hi: int, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(steps, owners) of the decode blocks ``members`` take in steps lo..hi, by step then member."""
        bs = self.block_size
        needs = self.needs[members]
        low = np.maximum(-(-(lo - needs) // bs), 0)  # the first block's rank at lo or later
        high = (np.minimum(self.cap[members], hi) - needs) // bs  # the last one's at hi or before
        counts = np.maximum(high - low + 1, 0)
        owners = members.repeat(counts)
        rank = np.arange(len(owners)) - (counts.cumsum() - counts).repeat(counts)
        steps = self.needs[owners] + bs * (rank + low.repeat(counts))
        if len(steps):
            small = hi - lo < 1 << 16
            order = ((steps - lo).astype(np.uint16) if small else steps).argsort(kind="stable")
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
        entry = np.zeros(len(steps), dtype=np.int8)
        if len(self._later[0]):  # prompt blocks of later steps: among the others, by member
            due = self._later[0] <= upto
            if due.any():
                steps, owners, entry = (np.concatenate((mine, later[due]))
                                        for mine, later in zip((steps, owners, entry), self._later, strict=True))
                order = np.lexsort((owners, steps))
                steps, owners, entry = steps[order], owners[order], entry[order]
                self._later = tuple(later[~due] for later in self._later)
        n, m = self.n, len(steps)
        self._room(n + m)
        self._steps[n: n + m] = steps
        self._owners[n: n + m] = owners
        self._entry[n: n + m] = entry
        self.n = n + m
        self.upto = upto

    def stop_at(self, i: int, step: int) -> None:
        """Member ``i`` takes no block after ``step`` (those made already stay)."""
        self.cap[i] = min(int(self.cap[i]), step)

    def add(self, t: int, needs: np.ndarray, cap: np.ndarray, steps: np.ndarray, owners: np.ndarray,
            entry: np.ndarray) -> None:
        """New members admitted in step ``t`` (after every member), their prompt blocks (``steps``
        t or t + 1, ``owners`` by member then rank, ``entry``) before their decodes' (``needs``,
        ``cap``). The blocks made past step t go: they are made again with the new members'."""
        self.n = int(self.steps.searchsorted(t, side="right"))
        self.upto = min(self.upto, t)
        self.needs = np.concatenate((self.needs, needs.astype(np.int64)))
        self.cap = np.concatenate((self.cap, cap.astype(np.int64)))
        now = steps <= t
        m = int(np.count_nonzero(now))
        self._room(self.n + m)
        self._steps[self.n: self.n + m] = steps[now]
        self._owners[self.n: self.n + m] = owners[now]
        self._entry[self.n: self.n + m] = entry[now]
        self.n += m
        if m < len(steps):
            later = ~now
            self._later = tuple(np.concatenate((was, new[later]))
                                for was, new in zip(self._later, (steps, owners, entry), strict=True))

    def drop_from(self, j0: int) -> None:
        """Members ``j0`` on go, with their blocks."""
        keep = (self.owners < j0).nonzero()[0]
        m = len(keep)
        for name in ("_steps", "_owners", "_entry"):
            buf = getattr(self, name)
            buf[:m] = buf[keep]
        self.n = m
        self.needs, self.cap = self.needs[:j0], self.cap[:j0]
        mine = self._later[1] < j0
        self._later = tuple(later[mine] for later in self._later)
