"""A run of steps as planned: its members, the steps each decodes in, the KV blocks they take.

The pieces both kinds of run share (simulator.engine.fast_forward: while nobody waits;
simulator.engine.waiting_runs: while requests wait): the run's record (``DecodeRun``), its members'
decode steps and step times (``Members``), the order in which their new KV blocks are taken
(``crossing_steps``: vLLM's order, step then running order), and handing those blocks out and
delivering the members' tokens once the run is applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simulator.engine.kv_cache import tick_sums
from simulator.engine.request import SimRequest
from simulator.engine.rules import deliver_tokens
from simulator.records.performance import PerformanceModel, StepBatch


def first_block_step(computed, held, first_step, block_size: int):
    """The step in which a member first needs a new KV block: decoding from ``first_step`` with
    ``computed`` tokens before it, it allocates slots for ``computed + (i - first_step) + 1`` tokens
    at step i, past its ``held`` blocks at this step. Numbers or arrays."""
    return held * block_size - computed + first_step


def decode_blocks(needs: np.ndarray, upto, block_size: int) -> np.ndarray:
    """The new KV blocks members whose first is needed at step ``needs`` (``first_block_step``)
    take in steps 1..``upto`` (each its last step decoding, or the window's end): one at ``needs``,
    then one every ``block_size`` steps."""
    return np.maximum((upto - needs) // block_size + 1, 0)


def decode_blocks_of(needs: int, upto: int, block_size: int) -> int:
    """``decode_blocks`` of one member (Python integers)."""
    return (upto - needs) // block_size + 1 if upto >= needs else 0


@dataclass
class Admission:
    """An arrival the run admits: its prefill is step ``step`` of the run."""

    step: int
    rid: int
    prompt: int


@dataclass
class Preemption:
    """A running request the run preempts: in ``step``, member ``short`` found no free KV block
    and ``victim`` (the last running member) was preempted to make room; the victim's last
    step is ``step - 1``."""

    step: int
    short: int
    victim: int


@dataclass
class Resumption:
    """A waiting request the run admits while others wait (``plan_waiting_run``): in ``step``
    it becomes member ``member`` (a request preempted before or inside the run) with ``tokens``
    tokens: its prefix-cache hits ``hits`` blocks, the next ``prefill`` tokens prefilled after
    the step's decodes, and the ``rest`` (the token budget cut the prefill) in the next step,
    after that step's decodes."""

    step: int
    member: int
    rid: int
    tokens: int
    hits: int
    prefill: int
    rest: int = 0

    @property
    def prefilled(self) -> int:
        """The step that ends its prefill (its first token's)."""
        return self.step + 1 if self.rest else self.step


@dataclass
class DecodeRun:
    """k steps planned from the current state: pure decodes, and prefills of admitted arrivals.

    The run's members are the running requests (in running order), then the admitted
    ones (in admission order). Member i decodes one token in steps first..last of the
    run, with ``computed[i]`` computed tokens before its first one (an admitted request
    is prefilled in the step before its first).
    """

    k: int
    step_times: np.ndarray  # d_1..d_k (async: of S_{j+1}..S_{j+k})
    first_steps: np.ndarray
    computed: np.ndarray
    # each member's last step (it is in steps first..last): a member with last + in-flight
    # steps <= k finishes inside the run
    last_steps: np.ndarray
    # each new KV block of the run, in the order the blocks are taken: its step (1..k)
    # and the member it goes to (an admitted request's prompt blocks included); None: not
    # worked out yet (``fast_forward.with_blocks``)
    block_steps: np.ndarray | None
    block_owners: np.ndarray | None
    admissions: list[Admission] = field(default_factory=list)
    preemptions: list[Preemption] = field(default_factory=list)
    #: planned while requests wait (``plan_waiting_run``): finishes and preemptions, no admission
    waiting: bool = False
    #: (async) the queue's head is admitted in the run's last step, left in flight: the
    #: scheduler's admission fills that step (``NativeScheduler.decode_step``)
    admits: bool = False
    #: waiting requests admitted inside the run (``plan_waiting_run``): members from
    #: ``len(first_steps) - len(joined)`` on, their requests ``joined``
    resumptions: list[Resumption] = field(default_factory=list)
    joined: list[SimRequest] = field(default_factory=list)

    def truncated(self) -> DecodeRun:
        """The run without its last step (none, k 0, if an admission inside it would then end
        its prefill in its last step or later)."""
        k = self.k - 1
        if self.resumptions and self.resumptions[-1].prefilled >= k:
            k = 0
        keep = self.block_steps <= k
        return DecodeRun(k=k, step_times=self.step_times[:k], first_steps=self.first_steps, computed=self.computed,
                         last_steps=self.last_steps, block_steps=self.block_steps[keep],
                         block_owners=self.block_owners[keep], admissions=self.admissions,
                         preemptions=[p for p in self.preemptions if p.step <= k], waiting=self.waiting,
                         resumptions=self.resumptions, joined=self.joined)


def crossing_steps(c: np.ndarray, held: np.ndarray, block_size: int, k, first_steps: np.ndarray,
                    extra: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, member indices) of every new block the members need in steps 1..k, in vLLM's order.

    A member decoding from step f with c computed tokens before it allocates, at
    step i >= f, slots for c + (i - f) + 1 tokens; it needs a new block when that
    passes its held blocks. Within a step, blocks go to the members in order.
    ``k`` may be an array: each member's own last step.
    ``extra`` (steps, members) are more blocks to order along (prompt blocks).
    """
    first = first_block_step(c, held, first_steps, block_size)
    needing = np.flatnonzero(first <= k)
    last = k[needing] if isinstance(k, np.ndarray) else k
    counts = decode_blocks(first[needing], last, block_size)
    owners = np.repeat(needing, counts)
    rank = np.arange(len(owners)) - np.repeat(np.cumsum(counts) - counts, counts)
    steps = first[owners] + block_size * rank
    if extra is not None:
        steps, owners = np.concatenate((steps, extra[0])), np.concatenate((owners, extra[1]))
    if not len(owners):
        return steps, owners
    # by step, then member: a stable sort by step (a radix sort where the steps fit 16 bits)
    # keeps the order they come in within a step, member by member (the prompt blocks in
    # ``extra`` come last: no later member decodes in an earlier member's prefill step)
    small = steps.min() >= 0 and steps.max() < 1 << 16
    order = np.argsort(steps.astype(np.uint16) if small else steps, kind="stable")
    return steps[order], owners[order]


class Members:
    """The run's members while it is planned: first decode step, computed tokens before it,
    last step (running requests first). Kept as lists, with numpy copies: those given, or made
    again when needed after ``add``. A walk whose later questions are all about steps from some
    step on retires the members done before it (``retire_before``): the per-step questions then
    look at the others only."""

    #: up to this many members, ``step_times`` finds its segments in plain Python
    FEW = 64

    def __init__(self, computed: np.ndarray, last_steps: list[int] | np.ndarray, held: list[int]):
        self.first = [1] * len(last_steps)
        self.computed = computed.tolist()
        self.last = last_steps.tolist() if isinstance(last_steps, np.ndarray) else list(last_steps)
        self.held = held  # KV blocks each holds before its first decode step
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = (
            np.ones(len(computed), dtype=np.int64), computed.astype(np.int64, copy=False),
            np.asarray(last_steps, dtype=np.int64))
        self._live = list(range(len(self.last)))  # the members not retired, in order
        self._retired_blocks = 0  # the blocks the retired ones' decodes take (``new_blocks_through``)
        self._block_size = 0  # (the block size those were counted in)

    @classmethod
    def from_arrays(cls, first: np.ndarray, computed: np.ndarray, last: np.ndarray, held: np.ndarray) -> Members:
        """Members with the first decode steps ``first`` (not all 1: requests a run admitted)."""
        members = cls(computed, last, held.tolist())
        members.first = first.tolist()
        members._arrays = (first, computed, last)
        return members

    def add(self, first: int, computed: int, last: int, held: int) -> None:
        self._live.append(len(self.last))
        self.first.append(first)
        self.computed.append(computed)
        self.last.append(last)
        self.held.append(held)
        self._arrays = None

    def retire_before(self, step: int, block_size: int) -> None:
        """No later question is about a step before ``step`` (``running_after``: before
        ``step - 1``): the members whose last step is before it are done; their blocks are
        counted once (in ``block_size`` blocks, as ``new_blocks_through`` is asked)."""
        last = self.last
        kept = [i for i in self._live if last[i] >= step]
        if len(kept) == len(self._live):
            return
        if self._block_size and block_size != self._block_size:
            raise ValueError("retire_before: one block size per walk")
        self._block_size = block_size
        self._retired_blocks += sum(self._decode_blocks(i, last[i], block_size) for i in self._live if last[i] < step)
        self._live = kept

    def _decode_blocks(self, i: int, step: int, block_size: int) -> int:
        """KV blocks member ``i``'s decodes take in steps 1..``step``."""
        f, end = self.first[i], self.last[i]
        if f > step or f > end:
            return 0
        return decode_blocks_of(first_block_step(self.computed[i], self.held[i], f, block_size), min(step, end),
                                block_size)

    def new_blocks_through(self, step: int, block_size: int) -> int:
        """KV blocks the members' decodes take in steps 1..``step`` (not the prompts')."""
        if self._block_size and block_size != self._block_size:
            raise ValueError("new_blocks_through: the block size the retired members were counted in")
        total = self._retired_blocks
        first, computed, last, held = self.first, self.computed, self.last, self.held
        for i in self._live:
            f, end = first[i], last[i]
            if f <= step and f <= end:
                total += decode_blocks_of(first_block_step(computed[i], held[i], f, block_size), min(step, end),
                                          block_size)
        return total

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first steps, computed tokens, last steps) as numpy arrays."""
        if self._arrays is None:
            self._arrays = tuple(np.array(x, dtype=np.int64) for x in (self.first, self.computed, self.last))
        return self._arrays

    def decoding(self, step: int) -> int:
        """How many members decode in ``step``."""
        first, last = self.first, self.last
        return sum(1 for i in self._live if first[i] <= step <= last[i])

    def running_after(self, step: int) -> int:
        """How many members have steps after ``step`` (those with none left have finished)."""
        last = self.last
        return sum(1 for i in self._live if last[i] > step)

    def step_times(self, perf: PerformanceModel, first: int, last: int) -> np.ndarray:
        """Times of the pure-decode steps first..last: step t has the members decoding in it,
        each attending over its computed tokens before t plus the one it computes."""
        if len(self._live) <= self.FEW:  # plain Python is quicker than numpy's many small calls
            return self._few_step_times(perf, first, last)
        f, c, end = self.arrays()
        # the total context of count members in steps a..b-1: base + count * t (exact integers)
        if f.max() <= first and end.min() >= last:  # the same members throughout
            n, base = len(end), int((c - f + 1).sum())
            return perf.decode_times(n, np.arange(base + n * first, base + n * (last + 1), n, dtype=np.float64))
        # segments of steps with the same members: a member decodes in [max(f, first), min(end, last)]
        active = (f <= last) & (end >= first)
        lo = np.maximum(f[active], first)
        hi = np.minimum(end[active], last) + 1
        weight = (c - f + 1)[active]
        points = np.unique(np.concatenate(([first, last + 1], lo, hi)))  # segment starts, then last + 1
        size = len(points)
        at_lo, at_hi = np.searchsorted(points, lo), np.searchsorted(points, hi)
        counts = np.cumsum(np.bincount(at_lo, minlength=size) - np.bincount(at_hi, minlength=size))
        bases = np.cumsum(np.bincount(at_lo, weight, size) - np.bincount(at_hi, weight, size))
        if counts[:-1].min() < 1:
            raise RuntimeError("a planned decode run has a step without requests")
        lengths = np.diff(points)
        # the total context of count members in step t: base + count * t (exact integers)
        totals = np.repeat(bases[:-1].astype(np.int64), lengths) + np.repeat(counts[:-1], lengths) * np.arange(
            first, last + 1)
        return perf.decode_times_by_count(counts[:-1].tolist(), lengths.tolist(), totals)

    def _few_step_times(self, perf: PerformanceModel, first: int, last: int) -> np.ndarray:
        """``step_times`` for up to ``FEW`` members: the segments found in plain Python (a sweep
        over where members start and stop), their times in one call."""
        # each member's span in the window: +1 member and +weight (computed + 1 - first decode
        # step) from its first step on, -1 and -weight from the step after its last
        change: dict[int, list[int]] = {first: [0, 0], last + 1: [0, 0]}
        firsts, computed, lasts = self.first, self.computed, self.last
        for i in self._live:
            f, c, end = firsts[i], computed[i], lasts[i]
            lo = f if f > first else first
            hi = (end if end < last else last) + 1
            if lo < hi:
                weight = c - f + 1
                at = change.get(lo)
                if at is None:
                    change[lo] = [1, weight]
                else:
                    at[0] += 1
                    at[1] += weight
                at = change.get(hi)
                if at is None:
                    change[hi] = [-1, -weight]
                else:
                    at[0] -= 1
                    at[1] -= weight
        bounds = sorted(change)
        counts, bases = [], []
        count = base = 0
        for a in bounds[:-1]:  # (each segment's first step)
            dc, db = change[a]
            count += dc
            base += db
            if count < 1:
                raise RuntimeError("a planned decode run has a step without requests")
            counts.append(count)
            bases.append(base)
        if len(counts) == 1:
            count, base = counts[0], bases[0]
            return perf.decode_times(count, np.arange(base + count * first, base + count * (last + 1), count,
                                                      dtype=np.float64))
        # several segments: one call (bit-identical to ``decode_times`` segment by segment; the
        # totals are exact integers, given as floats as above)
        lengths = np.diff(bounds)
        totals = np.repeat(np.array(bases, dtype=np.int64), lengths) + np.repeat(
            np.array(counts, dtype=np.int64), lengths) * np.arange(first, last + 1)
        return perf.decode_times_by_count(counts, lengths.tolist(), totals.astype(np.float64))

    def prefill_step_time(self, perf: PerformanceModel, step: int, prompts: list[int]) -> float:
        """Time of ``step``: the members decoding in it, and whole prompts prefilled (in order)."""
        firsts, computed, lasts = self.first, self.computed, self.last
        context = [computed[i] + (step - firsts[i]) + 1 for i in self._live if firsts[i] <= step <= lasts[i]]
        context += [1] * prompts.count(1)  # one token to compute: vLLM's batch counts it as a decode
        long = [p for p in prompts if p > 1]
        return perf.step_time(StepBatch(prefill_tokens=long, prefill_context=[0] * len(long), decode_context=context,
                                        decode_spec_tokens=[0] * len(context)))


def hand_out(kv, running: list[SimRequest], admitted: list[int], steps: np.ndarray, owners: np.ndarray,
              sched_at: np.ndarray) -> None:
    """Take ``len(steps)`` blocks from the free queue and give each to its owner (a member's
    index: the running requests, then the ids of the ``admitted`` arrivals); each counts
    toward block-seconds from the time its step is scheduled."""
    if not len(steps):
        return
    blocks = kv.take_free_blocks(len(steps))
    n = len(running)
    order = np.argsort(owners, kind="stable")  # by member, each member's in step order
    owners = owners[order]
    starts = np.flatnonzero(np.concatenate(([True], owners[1:] != owners[:-1])))
    rids = [running[i].rid if i < n else admitted[i - n] for i in owners[starts].tolist()]
    kv.add_taken_runs(rids, blocks[order].tolist(), [*starts[1:].tolist(), len(owners)],
                      tick_sums(sched_at[steps - 1][order], starts))


def give_blocks(kv, running: list[SimRequest], owners: np.ndarray, blocks: np.ndarray, acquired_s: np.ndarray) -> None:
    """Give blocks already taken from the free queue to their owners (members' indices), each
    owner its own in order; ``acquired_s``: when each was taken."""
    if not len(owners):
        return
    order = np.argsort(owners, kind="stable")
    owners, blocks, acquired_s = owners[order], blocks[order].tolist(), acquired_s[order]
    starts = np.flatnonzero(np.concatenate(([True], owners[1:] != owners[:-1])))
    ends = [*starts[1:].tolist(), len(owners)]
    kv.add_taken_runs([running[owner].rid for owner in owners[starts].tolist()], blocks, ends,
                      tick_sums(acquired_s, starts))


def deliver(running: list[SimRequest], k: int, token_times: np.ndarray, tokens: list[int] | None = None,
            scheduled: list[int] | None = None) -> None:
    """Each running request gets one token at each of ``token_times`` (k of them), or, per
    request, its first ``tokens[i]`` of them after ``scheduled[i]`` steps of compute."""
    token_times = token_times.tolist()  # (the same floats, quicker to index)
    for i, r in enumerate(running):
        deliver_tokens(r, k if tokens is None else tokens[i], token_times)
        r.num_computed += k if scheduled is None else scheduled[i]
