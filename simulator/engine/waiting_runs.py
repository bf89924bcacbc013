"""Runs of decode steps while requests wait.

Under overload the queue never empties and nearly every step has an event whose outcome depends
on it: a decode short of a KV block preempts the last running request, a request's last token
frees blocks that may admit the queue's head. Such a run goes on through those events when their
outcome is known from the run's own state: a preemption is the scheduler's (the last running
member, as ``NativeScheduler._make_room`` picks it, carried out by ``NativeScheduler._preempt``),
a finish frees its blocks when its last output comes (``NativeScheduler.finish``), and a step
that admits waiting requests goes on inside the run when each is prefilled in it (the last one's
rest, where the token budget cuts it, in the next step after that step's decodes) and its
prefix-cache hits follow from the free queue's counts (the queue as the run leaves it: its
victims, latest first, then the requests waiting before it; carried out by the scheduler's own
``_schedule_waiting``, ``NativeScheduler.admit_in_run``). Otherwise the run stops before the
first step in which the queue's head would be admitted (under async scheduling it covers that
step and leaves it in flight, for the scheduler's own admission to fill:
``NativeScheduler.decode_step(admit=True)``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from simulator.engine.kv_cache import tick_sums
from simulator.engine.native import NativeScheduler
from simulator.engine.request import Status
from simulator.engine.rules import deliver_tokens, has_seat
from simulator.engine.run_blocks import RunBlocks
from simulator.engine.run_plan import (
    DecodeRun,
    Members,
    Preemption,
    Resumption,
    decode_blocks_of,
    deliver,
    first_block_step,
    give_blocks,
)
from simulator.records.performance import PerformanceModel, StepBatch


def plan_waiting_run(
    sched, members: Members, times: np.ndarray | None, k: int, perf: PerformanceModel, lag: int,
    resume: bool = False, cut: bool = False,
) -> DecodeRun | None:
    """A run of decode steps while requests wait. It goes on through steps
    short of a KV block: there, as ``NativeScheduler._make_room``, the last running member is
    preempted and its blocks serve the step's remaining blocks; and through members' last
    tokens, their blocks freed when their last output comes. It stops before a step in which
    the queue's head (the latest victim, or the head it started with) would be admitted, and
    before a step whose victim would be a member that cannot be handled here (one with a shared
    prefix, whose admission would depend on other requests' blocks; one whose last token is in
    flight; the last one decoding). Blocks, finishes and preemptions are taken in time order,
    each admission checked after the event that could allow it (``_WaitingRun``). ``times``: the
    times of steps 1..k as the members were before the walk, or None (computed after it).
    ``resume``: the run goes on through a step that admits waiting requests when each is
    prefilled in it (or the last one's rest in the next step) and its prefix-cache hits follow
    from the free queue's counts (``_WaitingRun._resume``); ``cut``: also where the budget cuts
    the last one's prefill (``_WaitingRun._cut_fits``)."""
    plan = _WaitingRun(sched, members, k, lag, resume, cut)
    k = plan.walk()
    if k < 1:
        return None
    plan.run_blocks.extend(k)
    keep = plan.alive & (plan.steps <= k) & (plan.entry == 0)
    last = plan.last
    changed = min([p.step for p in plan.preemptions] + [r.step for r in plan.resumptions], default=k + 1)
    if times is None or changed <= k:
        timed = Members.from_arrays(plan.first, plan.computed, last, plan.held)
        if times is None:
            # a member's steps before its preemption are its steps as planned: the same times
            times = timed.step_times(perf, 1, k)
        else:
            times = np.concatenate((times[: changed - 1], timed.step_times(perf, changed, k)))
        if plan.resumptions:
            times = times.copy()
            for t in sorted({r.step for r in plan.resumptions} | {r.prefilled for r in plan.resumptions}):
                times[t - 1] = plan.resume_step_time(perf, t)
    return DecodeRun(k=k, step_times=times[:k], first_steps=plan.first, computed=plan.computed, last_steps=last,
                     block_steps=plan.steps[keep], block_owners=plan.owners[keep], preemptions=plan.preemptions,
                     waiting=True, admits=plan.admits, resumptions=plan.resumptions,
                     joined=plan.reqs[len(sched.running):])


@dataclass
class _Deficits:
    """A step's front pushes for ``_WaitingRun._hits``: the largest of (takes - pushes) from each
    push on (``suffix``), (takes - pushes) just after each push, each victim's push by member,
    and (takes - pushes) now less the step's admissions so far (``more``: their takes)."""

    suffix: np.ndarray
    after: np.ndarray
    at: dict[int, int]
    now: int
    more: int = 0

    def largest(self, own: int) -> int:
        """The largest deficit since member ``own``'s push (-1: since the run began), as
        (takes - pushes) then less (takes - pushes) just after it."""
        now = self.now + self.more
        if own < 0:
            return max(int(self.suffix[0]), now) if len(self.suffix) else now
        p = self.at[own]
        best = max(int(self.suffix[p + 1]), now) if p + 1 < len(self.suffix) else now
        return best - int(self.after[p])


_NONE = np.iinfo(np.int64).min  # a step before every other
_EMPTY = np.zeros(0, dtype=np.int64)
_WINDOW = 256  # blocks searched first for the next one short (``_WaitingRun._first_short``)
_REACH, _REACH_STEPS = 1024, 16  # blocks (and steps at least) made at a time (``_WaitingRun._reach``)


class _WaitingRun:
    """The events of a run planned while requests wait, walked in time order (see
    ``plan_waiting_run``): ``walk`` returns the run's length and leaves its blocks (``steps``,
    ``owners`` where ``alive``), members' last steps and preemptions."""

    def __init__(self, sched, members: Members, k: int, lag: int, resume: bool = False, cut: bool = False):
        self.sched, self.lag = sched, lag
        self.kv = sched.kv
        n = len(sched.running)
        self.held = np.array(members.held, dtype=np.int64)
        self.first, self.computed, last = members.arrays()
        self.last = last.copy()
        self.k = min(k, int(self.last.max()) - (1 - lag))
        bs = sched.block_size
        #: the run's blocks (made as far as the walk reads them), a block live unless it is a
        #: victim's from its preemption's step on (``_live``)
        self.run_blocks = RunBlocks(bs, first_block_step(self.computed, self.held, self.first, bs),
                                    np.minimum(self.last, max(self.k, 0)))
        #: blocks each member frees when it finishes (those it holds and those the run gives it)
        self.blocks = self.held + self.run_blocks.decodes_through(max(self.k, 0))
        self.prompt = np.zeros(n, dtype=np.int64)  # an admitted member's prompt blocks
        self.gone = np.zeros(n, dtype=bool)  # preempted
        #: blocks held by several members, by their holders (looked up once a holder finishes)
        self.together: dict[tuple[int, ...], int] | None = None
        self.free = self.kv.num_free_blocks  # before the run, plus the victims' blocks so far
        self.preemptions: list[Preemption] = []
        self.head_need = sched._blocks_to_admit(sched.waiting[0])
        self.admits = False  # the run's last step admits the queue's head (left in flight)
        # the queue as the walk leaves it: the run's victims waiting (latest first), then
        # ``sched.waiting`` from ``wpos`` on
        self.front: list[int] = []
        self.wpos = 0
        self.resume = resume and not sched.config.speculative.enabled
        self.reqs = list(sched.running)  # the members' requests (those the run admits after)
        self.resumptions: list[Resumption] = []
        #: the run's victims' pushes to the free queue's front: (step, block, takes before, count),
        #: and per victim (index into it, its named blocks, entries ahead of them)
        self.pushes: list[tuple[int, int, int, int]] = []
        #: the pushes and finishes up to step ``_events_to`` in time order (``_deficits``): the
        #: blocks taken before each, its count, a push's place by its index into ``pushes``; the
        #: pushes in them; the first block after that step and the blocks taken before it
        self._event_takes = np.zeros(0, dtype=np.int64)
        self._event_counts = np.zeros(0, dtype=np.int64)
        self._event_of: dict[int, int] = {}
        self._pushes_in = 0
        self._events_to = _NONE
        self._events_ref = (0, 0)
        #: the hits the run's admissions adopt (all before the walk's ``pos``, with their step:
        #: the blocks taken before it are the live ones less these)
        self._hits_in = 0
        self._served = 0  # the live blocks before the latest block short (``_first_short``)
        #: the latest ``_first_short``'s last window: its (pos, before_pos), the window's first
        #: block, the live blocks before it and the live blocks in it through each (``_served_before``)
        self._window: tuple[tuple[int, int], int, int, np.ndarray] = ((-1, -1), 0, 0, _EMPTY)
        self._ahead = 1  # steps the blocks are made ahead of the walk at least
        self._admitted_in: dict[int, list[Resumption]] | None = None  # (``resume_step_time``)
        self.freed_as: dict[int, tuple[int, int, int]] = {}
        self.remaining: dict[int, int] = {}  # a victim's steps left when it was preempted
        #: members the run admitted whose earlier named blocks all left the free queue (hits
        #: adopted, the others evicted): their look-up when they come back again is the in-order one
        self.clean: set[int] = set()
        self.cached = np.zeros(n, dtype=np.int64)  # blocks registered before the run (a floor)
        if self.resume and self.kv.enable_caching:
            self.cached[:] = [self.kv.num_cached_blocks_of(r.rid) for r in sched.running]
        #: a member holds shared prefix blocks (its finish would free them with others')
        self.shared = self.kv.enable_caching and any(r.num_shared_blocks for r in sched.running)
        #: step -> the tokens of a cut prefill's rest prefilled in it (after its decodes)
        self.rests: dict[int, int] = {}
        self.cut = cut and sched.config.enable_chunked_prefill
        #: how many members' last steps bound the run (``k``: the largest less 1 - lag), those at
        #: k + 1 - lag or later (``walk``)
        self._bounding = 0
        #: no victim (``_victim``) comes after this member: those after it are not listed, or
        #: their last output came before the step of a victim (the steps only grow)
        self._victim_from = n - 1
        #: the listed members (``walk``) by the step their blocks come back in: how many
        self._releasing: Counter[int] = Counter()

    @property
    def steps(self) -> np.ndarray:
        return self.run_blocks.steps

    @property
    def owners(self) -> np.ndarray:
        return self.run_blocks.owners

    @property
    def entry(self) -> np.ndarray:
        """Each block: 0 a decode's, 1 a new block of an admission, 2 a prefix hit it adopts
        (taken from the free queue by the scheduler's own admission, not the run)."""
        return self.run_blocks.entry

    @property
    def alive(self) -> np.ndarray:
        return self._live(0, self.run_blocks.n)

    def _live(self, lo: int, hi: int) -> np.ndarray:
        """Which of blocks lo..hi-1 are live: not a victim's from its preemption's step on (a
        member's blocks are all in its steps, and a preemption ends them)."""
        return self.run_blocks.steps[lo:hi] <= self.last[self.run_blocks.owners[lo:hi]]

    def _live_count(self, lo: int, hi: int) -> int:
        return int(np.count_nonzero(self._live(lo, hi)))

    def _reach(self, listed: np.ndarray) -> int:
        """The steps the walk makes blocks for at a time: some thousands of blocks."""
        return max(_REACH_STEPS, (_REACH * self.sched.block_size) // max(1, int(np.count_nonzero(listed))))

    def walk(self) -> int:
        lag = self.lag
        caching = self.kv.enable_caching
        if self.k < 1:
            return self.k
        release = self.last + (lag + 1)  # the first step scheduled after a member's last output
        # (computed once: a preemption takes its victim out of it, a shorter run reads less of it)
        freed = self._finish_frees(release, self.k)
        listed = ~self.gone  # members not preempted
        self._bounding = int(np.count_nonzero(self.last >= self.k + 1 - lag))
        self._releasing = Counter(release[listed].tolist())
        checked = 0  # admissions are checked for the steps up to this one
        pos, before_pos = 0, 0  # the first block not known to be served; live blocks before it
        at_step = None  # the walk's state before the preemptions of the latest step that preempts
        while self.k >= 1:
            k = self.k
            # the blocks of steps 1..reach, made so far (the blocks before ``pos`` are settled: a
            # preemption ends its victim's blocks from its step on, an admission adds blocks
            # from its step on, both after step ``checked``)
            if self.run_blocks.upto < min(k, checked + self._ahead):
                self._ahead = self._reach(listed)
                self.run_blocks.extend(min(k, checked + self._ahead))
                self._ahead = max(1, self._ahead // 4)  # (made again when the walk comes within a quarter)
            reach = min(k, self.run_blocks.upto)
            steps, owners = self.steps, self.owners
            # (the blocks made are those of steps through upto)
            end = len(steps) if reach == self.run_blocks.upto else int(steps.searchsorted(reach, side="right"))
            e = self._first_short(pos, end, before_pos, freed)
            s = int(steps[e]) if e < end else reach + 1
            t = self._first_admission(checked + 1, s - 1, release, freed, listed, pos, before_pos)
            if t is not None and self.resume and self._resume(t, release, freed, listed, pos, before_pos):
                release, freed, listed = self._release, self._freed, self._listed
                checked = t
                # every block through step t is served (the admissions' blocks fit by their gate)
                new_pos = int(self.steps.searchsorted(t, side="right"))
                pos, before_pos = new_pos, before_pos + self._live_count(pos, new_pos)
                self._events_ref = (pos, before_pos - self._hits_in)  # (the first block after step t)
                continue
            if t is not None:
                # under async scheduling the run may cover step t, left in flight: the scheduler's
                # own admission then fills it, unless a member's last output comes after t is
                # scheduled (it still holds its seat and blocks then; the run would have freed them)
                self.admits = lag == 1 and t >= 2 and not np.any(listed & (self.last == t - 1))
                self.k = t if self.admits else t - 1
                break
            if e == end:
                if reach == k:
                    break
                # no block short through step reach
                pos, before_pos = end, before_pos + self._live_count(pos, end)
                checked = reach
                continue
            v = self._victim(s, listed, release)
            last_v = int(self.last[v])
            if (last_v < s or not self._others_decode(v, int(owners[e]), s + 1 - lag, listed)
                    or (caching and self.reqs[v].num_shared_blocks) or self.first[v] > s):
                if at_step is not None and at_step[0] == s:
                    # step s already preempted in this walk: the ordinary path takes the whole step
                    _, pos, before_pos = self._restore(at_step)
                self.k = s - 1  # the ordinary path takes that step
                break
            if at_step is None or at_step[0] != s:
                at_step = self._save(s, pos, before_pos)
            # (a listed member's blocks are all live: those before e, all its blocks before step s
            # (the victim is the member short or after it), were served)
            blocks_v = int(self.held[v] + self.prompt[v]) + self.run_blocks.decodes_of(v, s - 1)
            served = self._served  # (live blocks before e, from ``_first_short``)
            if self.resume:
                self._note_free(v, s, e, blocks_v, served, served - self._hits_in, freed)
            self.free += blocks_v
            self.run_blocks.stop_at(v, s - 1)  # its blocks from step s on are not live (``last``)
            if release[v] <= len(freed) - 2:  # its blocks no longer come back at its last output
                freed[release[v]:] -= self.blocks[v]
            self.last[v] = s - 1
            self._unlist(int(release[v]))
            release[v] = s + lag
            self.gone[v] = True
            listed[v] = False
            self.preemptions.append(Preemption(s, int(owners[e]), v))
            self.remaining[v] = last_v - s + 1
            self.front.insert(0, v)
            if last_v >= k + 1 - lag:
                self._bounding -= 1
                if not self._bounding:  # (else another member's last step still bounds the run: k stays)
                    self.k = min(k, int(self.last.max()) - (1 - lag))
                    self._bounding = int(np.count_nonzero(self.last >= self.k + 1 - lag))
            before_pos = served
            pos = e
            checked = s  # (a step that preempts admits nobody)
        if self.resumptions:
            self._trim()
        return self.k

    def _unlist(self, release: int) -> None:
        """A listed member whose blocks come back in step ``release`` is listed no more."""
        left = self._releasing[release] - 1
        if left:
            self._releasing[release] = left
        else:
            del self._releasing[release]

    def _victim(self, s: int, listed: np.ndarray, release: np.ndarray) -> int:
        """The last member of the running list at step ``s`` (listed, its last output not in
        before ``s``): the scheduler's victim. Usually the last listed one; the search starts
        where the latest one ended (``_victim_from``)."""
        i = min(self._victim_from, len(listed) - 1)
        while not (listed[i] and release[i] > s):
            i -= 1
        self._victim_from = i
        return i

    def _others_decode(self, v: int, short: int, step: int, listed: np.ndarray) -> bool:
        """Whether a listed member other than ``v`` decodes in ``step`` or later (``short``, the
        member short of a block, usually does)."""
        if short != v and self.last[short] >= step:
            return True
        last_v = int(self.last[v])
        self.last[v] = _NONE  # (the others' latest step: _NONE if there is no other)
        latest = int(self.last[listed].max())
        self.last[v] = last_v
        return latest >= step

    def _first_short(self, pos: int, end: int, before_pos: int, freed: np.ndarray) -> int:
        """The first live block of ``pos..end-1`` that finds no free block (``end``: none does),
        ``before_pos`` live blocks before it served: the free blocks are those before the run,
        the victims' so far and the finishes' by its step (``freed``). The next preemption is
        usually near, so a first window is searched before the rest."""
        start = (pos, before_pos)
        if pos >= end:
            self._window = (start, pos, before_pos, _EMPTY)
            return end
        all_steps, all_owners, last = self.steps, self.owners, self.last
        stop = min(end, pos + _WINDOW)
        while True:
            steps = all_steps[pos:stop]
            live = steps <= last[all_owners[pos:stop]]  # (``_live``)
            count = live.cumsum()  # the live blocks through each, from pos
            self._window = (start, pos, before_pos, count)
            # short: its place among the live blocks (before_pos + count - 1) reaches the free ones
            short = live & (count >= freed[steps] + (self.free - before_pos + 1))
            first = int(short.argmax())
            if short[first]:
                self._served = int(count[first]) + before_pos - 1
                return pos + first
            if stop == end:
                return end
            pos, before_pos, stop = stop, int(count[-1]) + before_pos, end

    def _served_before(self, end: int, pos: int, before_pos: int) -> int:
        """The live blocks before block ``end`` (``before_pos`` of them before ``pos <= end``): from
        the counts the latest ``_first_short`` from ``pos`` made where they reach that far."""
        start, w0, before_w, count = self._window
        if start == (pos, before_pos) and w0 <= end <= w0 + len(count):
            return int(count[end - w0 - 1]) + before_w if end > w0 else before_w
        return before_pos + self._live_count(pos, end)

    def _save(self, step: int, pos: int, before_pos: int) -> tuple:
        return (step, pos, before_pos, self.free, len(self.preemptions))

    def _restore(self, saved: tuple) -> tuple[int, int, int]:
        """Undo the preemptions of step ``saved[0]`` (a later victim of that step cannot be
        handled here): their victims' last steps and listing as before them; returns (step,
        pos, before_pos) as they were."""
        step, pos, before_pos, self.free, count = saved
        for p in self.preemptions[count:]:
            self.last[p.victim] = p.step - 1 + self.remaining[p.victim]
            self.gone[p.victim] = False
        del self.preemptions[count:]
        return step, pos, before_pos

    def _finish_frees(self, release: np.ndarray, k: int) -> np.ndarray:
        """By step t (0..k+1): the blocks of the members whose last output came before t."""
        ending = np.flatnonzero(~self.gone & (release <= k))
        if self.together is None and self.kv.enable_caching and len(ending):
            running = self.sched.running
            if any(running[i].num_shared_blocks for i in ending.tolist()):
                self._hold_together()
        # (whole block counts: exact in float64)
        freed = np.bincount(release[ending], self.blocks[ending], k + 2).astype(np.int64)
        for holders, count in (self.together or {}).items():
            last = int(release[list(holders)].max())
            if last <= k:  # (no holder is a victim: a victim holds no shared prefix)
                freed[last] += count
        return np.cumsum(freed)

    def _hold_together(self) -> None:
        """Blocks several members hold are freed with the last of them, not with each."""
        self.together = self.kv.blocks_held_together(self.sched.running)
        for holders, count in self.together.items():
            self.blocks[list(holders)] -= count

    def _first_admission(self, lo: int, hi: int, release: np.ndarray, freed: np.ndarray,
                         listed: np.ndarray, pos: int, before_pos: int) -> int | None:
        """The first step in lo..hi after an event (a preemption, a member's last output) in
        which the queue's head would be admitted: a seat, and the blocks of its whole sequence
        free once the step's running requests have theirs. Between events the free blocks only
        shrink, so the steps right after events are the only ones to check."""
        if lo > hi:
            return None
        sched = self.sched
        if self.front:  # the head is the latest victim: its tokens once its last output is in
            v = self.front[0]
            need = -(-min(self._tokens(v), sched.max_model_len) // sched.block_size)
        elif self.wpos == 0:
            need = self.head_need
        elif self.wpos < len(sched.waiting):
            need = sched._blocks_to_admit(sched.waiting[self.wpos])
        else:
            return None  # nobody waits
        last = len(freed) - 1
        if need > self.free + int(freed[min(hi, last)]) - before_pos:
            # (the finishes' blocks only grow with the step, and the live blocks before ``pos``
            # are served by lo: not even by hi)
            return None
        # (the walk checked the steps up to its latest preemption: only that one's next step is new)
        checks = {self.preemptions[-1].step + 1} if self.preemptions and lo <= self.preemptions[-1].step + 1 <= hi \
            else set()
        # (a step that ends a cut prefill may admit with no event before it: the budget it leaves)
        if self.rests:
            for t in [t for t in self.rests if t < lo]:
                del self.rests[t]  # (steps before lo are not read again)
            checks.update(t for t in self.rests if t <= hi)
        releasing = self._releasing
        if hi - lo < len(releasing):
            checks.update(releasing.keys() & range(lo, hi + 1))
        else:
            checks.update(t for t in releasing if lo <= t <= hi)
        max_num_seqs = sched.config.max_num_seqs
        releases = release[listed] if checks else _EMPTY  # the listed members' (read once)
        seated = len(releases) >= max_num_seqs  # (else a seat is free)
        for t in sorted(checks):
            if seated and int(np.count_nonzero(releases > t)) >= max_num_seqs:
                continue
            # (the blocks before ``pos``, those of steps before lo, are counted: ``before_pos``)
            served = self._served_before(int(self.steps.searchsorted(t, side="right")), pos, before_pos)
            if need <= self.free + int(freed[min(t, last)]) - served:
                return t
        return None

    # --- admissions inside the run (``resume``) ---------------------------------------------
    def _tokens(self, v: int) -> int:
        """A victim's tokens once its last output is in (as the scheduler finds it waiting)."""
        return int(self.computed[v] + self.last[v] - self.first[v] + 2)

    def _registered(self, i: int, tokens: int, blocks: int) -> int:
        """Member i's blocks registered in the prefix cache with ``tokens`` computed (named
        when freed, they go to the back of the free queue; the others to the front)."""
        if not self.kv.enable_caching:
            return 0
        return max(int(self.cached[i]), min(tokens // self.sched.block_size, blocks))

    def _note_free(self, v: int, s: int, e: int, blocks: int, served: int, taken: int, freed: np.ndarray) -> None:
        """Victim ``v`` frees ``blocks`` before block ``e`` of step ``s`` (``served`` blocks of the
        run taken or adopted before it, ``taken`` of them taken): as ``KVCacheManager.free``,
        those without a name go to the front of the free queue, its named ones (registered by
        ``apply_waiting_run``) to the back, behind every entry then in the queue."""
        tokens = int(self.computed[v] + (s - 1) - self.first[v] + 1) - self.lag
        named = self._registered(v, tokens, blocks)
        ahead = self.free + int(freed[s]) - served + (blocks - named)
        self.freed_as[v] = (len(self.pushes), named, ahead)
        self.pushes.append((s, e, taken, blocks - named))

    def _hits(self, t: int, v: int | None, req, tokens: int, deficits: _Deficits) -> tuple[int, bool] | None:
        """The prefix-cache hits of the queue's head admitted in step ``t`` (victim ``v`` of the
        run, or ``req`` waiting before it), and whether none of its named copies stays in the
        free queue after it (the last-token cap did not cut them); None where they do not follow
        from the counts. Its blocks 0..m-1 are cached, m = h - min(h, D): h its named blocks, D
        the largest deficit T - (A + U) after any take since its free (A the entries ahead of
        them then; T the blocks taken since, U those pushed to the front since; blocks adopted
        as hits since were behind them: the queue admits its victims latest first)."""
        kv = self.kv
        if not kv.enable_caching:
            return 0, True
        bs = self.sched.block_size
        if v is None:
            got = kv.private_blocks_queued(req.rid)
            if got is None:
                return None
            h, ahead = got
            own = -1
        else:
            if v not in self.clean if v >= len(self.sched.running) else kv.has_named_free(req.rid):
                return None
            own, h, ahead = self.freed_as[v]
        if h == 0:
            return 0, True
        deficit = max(0, deficits.largest(own) - ahead)
        m = h - min(h, deficit)
        cap = (tokens - 1) // bs
        return (m, True) if m <= cap else (cap, False)

    def _deficits(self, t: int, end: int, listed: np.ndarray, release: np.ndarray) -> _Deficits:
        """The free queue's front pushes up to step ``t`` (the run's victims' and finishing
        members' blocks without a name) and the takes before each, in time order (all before
        block ``end``, the first after step ``t``). Those up to the last step asked for are
        kept: the new ones all come after them (a push at a step after that one's admissions,
        a finish after its step)."""
        ref, taken_ref = self._events_ref  # the first block after step ``_events_to``
        taken_before = self._live(ref, end).cumsum()  # (no hits among them: ``_hits_in``)
        events = [((s, 1, e), took, count, i)
                  for i, (s, e, took, count) in enumerate(self.pushes[self._pushes_in:], self._pushes_in)]
        ending = (listed & (release > self._events_to) & (release <= t)).nonzero()[0]
        if len(ending):
            cuts = self.steps[ref:end].searchsorted(release[ending], side="left")
            for i, cut in zip(ending.tolist(), cuts.tolist(), strict=True):
                tokens_i = int(self.computed[i] + self.last[i] - self.first[i] + 1)
                blocks_i = int(self.blocks[i])
                before = taken_ref + (int(taken_before[cut - 1]) if cut else 0)
                events.append(((int(release[i]), 0, i), before, blocks_i - self._registered(i, tokens_i, blocks_i),
                               -1))
        events.sort()
        base = len(self._event_takes)
        self._event_of.update((x[3], p) for p, x in enumerate(events, base) if x[3] >= 0)
        self._event_takes = np.concatenate((self._event_takes, np.array([x[1] for x in events], dtype=np.int64)))
        self._event_counts = np.concatenate((self._event_counts, np.array([x[2] for x in events], dtype=np.int64)))
        self._pushes_in, self._events_to = len(self.pushes), t
        takes, counts = self._event_takes, self._event_counts
        pushed_after = counts.cumsum()
        g = takes - (pushed_after - counts)  # just before each push
        suffix = np.maximum.accumulate(g[::-1])[::-1] if len(g) else g
        pushed = int(pushed_after[-1]) if len(counts) else 0
        now = taken_ref + (int(taken_before[-1]) if len(taken_before) else 0) - pushed
        return _Deficits(suffix, takes - pushed_after, self._event_of, now)

    def _resume(self, t: int, release: np.ndarray, freed: np.ndarray, listed: np.ndarray, pos: int,
                before_pos: int) -> bool:
        """Admit the queue's head(s) in step ``t`` as ``NativeScheduler._schedule_waiting`` would
        (a seat; the budget after the step's decodes and a cut prefill's rest; the blocks of
        the whole sequence free), each prefilled after the decodes, its prefix-cache hits from
        ``_hits``; they become members from step t + 1, or t + 2 for the last one if the budget
        cuts its prefill (its rest in step t + 1, ``_cut_fits``). False (nothing changed) where
        the step is not one this handles: a prefill the long-prefill threshold would cut, or
        the budget in a way ``_cut_fits`` declines, a head with a shared prefix or whose hits do
        not follow from the counts, one whose output or context would end within a step, a
        budget used up by whole prefills (the next head could come in the next step, no event
        between), a queue the step would empty (the run's arrivals come next)."""
        sched, kv, lag = self.sched, self.kv, self.lag
        cfg = sched.config
        bs = sched.block_size
        if t < 2 or self.shared:
            return False
        budget = cfg.max_num_batched_tokens - int(np.count_nonzero(listed & (self.first <= t) & (self.last >= t)))
        budget -= self.rests.get(t, 0)
        running = int(np.count_nonzero(listed & (release > t)))
        waiting = sched.waiting
        threshold = cfg.long_prefill_token_threshold
        if running + len(self.front) + len(waiting) - self.wpos <= 1:
            threshold = 0
        end = int(self.steps.searchsorted(t, side="right"))
        served = self._served_before(end, pos, before_pos)
        free = self.free + int(freed[min(t, len(freed) - 1)]) - served
        front, wpos = list(self.front), self.wpos
        admitted = []
        more = 0
        deficits = None
        while True:
            if not front and wpos >= len(waiting):
                return False  # the queue would empty: the run's arrivals could be admitted next
            if budget <= 0:
                if admitted and admitted[-1][5]:
                    break  # (the next step is checked: ``rests``)
                return False
            if not has_seat(running + len(admitted), cfg.max_num_seqs):
                break
            if front:
                v = front[0]
                req, tokens, remaining = self.reqs[v], self._tokens(v), self.remaining[v]
            else:
                v, req = None, waiting[wpos]
                if req.stale_tokens or req.num_computed or req.status not in (Status.PREEMPTED, Status.WAITING):
                    return False
                tokens, remaining = req.num_tokens, req.max_tokens - req.num_output
            if kv.enable_caching and req.num_shared_blocks:
                return False
            need = -(-min(tokens, sched.max_model_len) // bs)
            if need > free:
                break
            if deficits is None:
                deficits = self._deficits(t, end, listed, release)
            deficits.more = more
            got = self._hits(t, v, req, tokens, deficits)
            if got is None:
                return False
            hits, clean = got
            prefill = tokens - hits * bs
            if 0 < threshold < prefill or remaining < 2 or tokens + remaining >= sched.max_model_len:
                return False
            rest = max(prefill - budget, 0)
            if rest and not self._cut_fits(t, budget, rest, listed, len(admitted)):
                return False
            admitted.append((req, clean, tokens, hits, remaining, rest))
            free -= need
            budget -= prefill - rest
            more += need - hits
            if front:
                front.pop(0)
            else:
                wpos += 1
        if not admitted:
            return False
        j0 = len(self.reqs)
        last, blocks = self._add_members(t, admitted)
        self._bounding += int(np.count_nonzero(last >= self.k + 1 - lag))
        self.clean.update(j0 + i for i, a in enumerate(admitted) if a[1])
        r = last + (lag + 1)  # their releases: the first step scheduled after each one's last output
        release = np.concatenate((release, r))
        listed = np.concatenate((listed, np.ones(len(r), dtype=bool)))
        top = len(freed) - 1
        if np.count_nonzero(r <= top):
            freed += np.bincount(np.minimum(r, top + 1), blocks, top + 2)[: top + 1].cumsum().astype(np.int64)
        self._release, self._freed, self._listed = release, freed, listed
        self._releasing.update(r.tolist())
        self._victim_from = len(release) - 1  # (the new members are last)
        self.front, self.wpos = front, wpos
        return True

    def _cut_fits(self, t: int, chunk: int, rest: int, listed: np.ndarray, decoding: int) -> bool:
        """Whether a prefill the budget cuts in step ``t`` (``chunk`` tokens) is one the run
        takes: such admissions asked for (``cut``, chunked prefill on); a chunk and a rest of 2
        tokens or more (each a prefill in vLLM's batch); the rest within step t + 1's budget
        after the decodes of the members then and of the ``decoding`` requests admitted whole
        in step t before it (one at least)."""
        if not self.cut or chunk < 2 or rest < 2:
            return False
        u = t + 1
        decoders = int(np.count_nonzero(listed & (self.first <= u) & (self.last >= u))) + decoding
        return decoders >= 1 and rest <= self.sched.config.max_num_batched_tokens - decoders

    def _add_members(self, t: int, admitted: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
        """The requests admitted in step ``t`` (request, clean, tokens, hits, steps left, the
        rest of a cut prefill), in order: members from step t + 1 (one whose prefill is cut
        from t + 2), their blocks (hits adopted first, then new ones) after the step's decodes
        (those of a cut prefill's rest after the decodes of step t + 1, taken by the run), their
        decodes' blocks in the run's order. Returns their last steps and their blocks."""
        bs = self.sched.block_size
        j0 = len(self.reqs)
        k = self.k
        caching = self.kv.enable_caching
        # per member: first step, tokens, last step, prompt blocks, blocks, cached blocks, first
        # decode needing a block, last step within the run
        rows = []
        # its prompt blocks by rank, in stretches (entry, step, count): hits prefilled in step t,
        # hits in the rest's step (none: a cut prefill's chunk goes past its hits), new blocks
        # prefilled in step t, the rest's new blocks (step t + 1)
        entries, steps, counts = [], [], []
        hits_in = 0
        for j, (req, _, n, h, remaining, r) in enumerate(admitted, j0):
            self.reqs.append(req)
            self.resumptions.append(Resumption(t, j, req.rid, n, h, n - h * bs - r, r))
            cut = 1 if r > 0 else 0
            if r:
                self.rests[t + 1] = r
            last = t - 1 + remaining + cut
            need = -(-n // bs)
            first = t + 1 + cut
            needs = first_block_step(n, need, first, bs)  # its first decode needing a block
            cap = min(last, k)
            blocks = need + decode_blocks_of(needs, cap, bs)
            rows.append((first, n, last, need, blocks, n // bs if caching else 0, needs, cap))
            whole = -(-(n - r) // bs)  # blocks prefilled in step t (the rest's after them)
            entries += (2, 2, 1, 0)
            steps += (t, t + 1, t, t + 1)
            counts += (min(h, whole), max(h - whole, 0), max(whole - h, 0), need - max(h, whole))
            hits_in += h
        cols = np.array(rows, dtype=np.int64).T
        first, tokens, last, need, blocks, cached, needs, cap = cols
        self.run_blocks.add(t, needs, cap, np.repeat(np.array(steps, dtype=np.int64), counts),
                            np.repeat(np.arange(j0, j0 + len(admitted)), need),
                            np.repeat(np.array(entries, dtype=np.int8), counts))
        self.first = np.concatenate((self.first, first))
        self.computed = np.concatenate((self.computed, tokens))
        self.last = np.concatenate((self.last, last))
        self.held = np.concatenate((self.held, np.zeros(len(admitted), dtype=np.int64)))
        self.prompt = np.concatenate((self.prompt, need))
        self.blocks = np.concatenate((self.blocks, blocks))
        self.gone = np.concatenate((self.gone, np.zeros(len(admitted), dtype=bool)))
        self.cached = np.concatenate((self.cached, cached))
        self._hits_in += hits_in
        return last, blocks

    def _trim(self) -> None:
        """Admissions whose prefill does not end inside the run go, with their step: under async
        scheduling the run's last step is left in flight, its output not in the run (admissions
        in it are the scheduler's, ``admits``; a cut prefill's rest must come before it); under
        sync a cut prefill's rest must be in the run. Without them the run ends before their
        step (async: it may cover that step, left in flight, unless a member's last output comes
        after it is scheduled), and so on."""
        lag = self.lag
        while self.resumptions and self.resumptions[-1].prefilled > self.k - lag:
            t = self.resumptions[-1].step
            j0 = min(r.member for r in self.resumptions if r.step >= t)
            self.resumptions = [r for r in self.resumptions if r.member < j0]
            del self.reqs[j0:]
            for name in ("first", "computed", "last", "held", "prompt", "blocks", "gone", "cached"):
                setattr(self, name, getattr(self, name)[:j0])
            self.run_blocks.drop_from(j0)
            self.admits = lag == 1 and t >= 2 and not np.any(~self.gone & (self.last == t - 1))
            self.k = t if self.admits else t - 1

    def resume_step_time(self, perf: PerformanceModel, t: int) -> float:
        """The time of step ``t``, which admits or ends a cut prefill: the members decoding in it
        (in running order), the rest of a prefill cut in step t - 1 (the last running request),
        then the admissions' prefills (a one-token prefill is a decode in vLLM's batch)."""
        f, c, last = self.first, self.computed, self.last
        decoding = (f <= t) & (last >= t)
        context = (c + (t - f) + 1)[decoding].tolist()
        tokens, prefill_context = [], []
        bs = self.sched.block_size
        if self._admitted_in is None:
            self._admitted_in = {}
            for r in self.resumptions:
                self._admitted_in.setdefault(r.step, []).append(r)
        for r in self._admitted_in.get(t - 1, ()):
            if r.rest:
                tokens.append(r.rest)
                prefill_context.append(r.hits * bs + r.prefill)
        for r in self._admitted_in.get(t, ()):
            n = r.prefill
            if n == 1:
                context.append(r.hits * bs + 1)
            else:
                tokens.append(n)
                prefill_context.append(r.hits * bs)
        return perf.step_time(StepBatch(prefill_tokens=tokens, prefill_context=prefill_context,
                                        decode_context=context, decode_spec_tokens=[0] * len(context)))


_FINISH, _PREEMPT, _ADMIT = 0, 1, 2


def apply_waiting_run(sched: NativeScheduler, run: DecodeRun, sched_at: np.ndarray, token_times: np.ndarray,
                       lag: int, taken_at: np.ndarray) -> list[int]:
    """Carry out a run planned while requests wait (``plan_waiting_run``) and return the ids of
    the requests that finished in it. Its events, in time order: a preemption when its step is
    scheduled (the victim's full blocks registered as its last scheduling left them, then
    ``NativeScheduler._preempt``), the admissions of a step after its decodes (the scheduler's
    own ``_schedule_waiting``, which must admit what the run planned), a finish when its last
    output comes (``NativeScheduler.finish``); the blocks taken before each event are handed
    out first. Victims get their tokens through their last step; the others that do not finish
    go on running, those admitted after the running ones."""
    kv = sched.kv
    running = sched.running
    k = run.k
    reqs = running + run.joined if run.joined else running
    m = len(reqs)
    first, computed, last = run.first_steps, run.computed, run.last_steps
    steps, owners = run.block_steps, run.block_owners
    preemptions = run.preemptions
    victims = {p.victim for p in preemptions}
    # members whose prefill the budget cut: their tokens, registered when its rest was scheduled
    cut_tokens = {r.member: r.tokens for r in run.resumptions if r.rest}
    # (time key, blocks handed out before it, member or step, kind): a preemption in step s
    # comes at 2s, the admissions of step t at 2t (no step both preempts and admits), a last
    # output between the scheduling of steps last + lag and last + lag + 1 (the blocks before
    # each event found by one search for all)
    events = []
    if preemptions:
        order = steps * (m + 1) + owners  # the blocks' order: by step, then member
        cuts = np.searchsorted(order, [p.step * (m + 1) + p.short for p in preemptions], side="left")
        events = [(2 * p.step, cut, p.victim, _PREEMPT) for p, cut in zip(preemptions, cuts.tolist(), strict=True)]
    ending = [i for i in np.flatnonzero(last + lag <= k).tolist() if i not in victims]
    if ending:
        ends = last[ending] + lag
        cuts = np.searchsorted(steps, ends, side="right")
        events += [(2 * end + 1, cut, i, _FINISH) for i, end, cut in zip(ending, ends.tolist(), cuts.tolist(), strict=True)]
    admitting: dict[int, list[Resumption]] = {}
    for r in run.resumptions:
        admitting.setdefault(r.step, []).append(r)
    if admitting:
        cuts = np.searchsorted(steps, list(admitting), side="right")
        events += [(2 * t, cut, t, _ADMIT) for t, cut in zip(admitting, cuts.tolist(), strict=True)]
    events.sort()
    finished = []
    taken = 0
    # blocks leave the free queue in order, each event's after those before it; a member gets
    # its blocks when it is freed, the others all at once at the end
    block_of = np.empty(len(steps), dtype=np.int64)
    acquired = sched_at[steps - 1]
    # each event's member's blocks, grouped by member once (a member's blocks all come before its
    # event: a victim's from its preemption step on are not the run's, a finishing member's end
    # with its last step), with their acquisition ticks summed per member
    at_event = np.zeros(m, dtype=bool)
    at_event[[i for _, _, i, kind in events if kind != _ADMIT]] = True
    theirs = np.flatnonzero(at_event[owners])
    theirs = theirs[np.argsort(owners[theirs], kind="stable")]  # by member, each in step order
    bounds, sums = {}, {}  # member -> its stretch of ``theirs``, its acquisition ticks
    if len(theirs):
        members = owners[theirs]
        starts = np.flatnonzero(np.concatenate(([True], members[1:] != members[:-1])))
        ids = members[starts].tolist()
        bounds = dict(zip(ids, pairwise([*starts.tolist(), len(theirs)]), strict=True))
        sums = dict(zip(ids, tick_sums(acquired[theirs], starts), strict=True))
    # with admissions: the running list as the events leave it (a dict's keys, in order), who is
    # in it, the victims not yet settled (``_admit``)
    current, listed, pending = (dict.fromkeys(running), np.ones(m, dtype=bool), []) if admitting else (None, None, None)
    readmitted: set[int] = set()  # victims settled before an admission (their tokens delivered then)
    times = token_times.tolist() if admitting else None
    for _, cut, i, kind in events:
        if cut > taken:
            block_of[taken:cut] = kv.take_free_blocks(cut - taken)
            taken = cut
        if kind == _ADMIT:
            _admit(sched, run, admitting, i, reqs, current, listed, pending, readmitted, taken_at, sched_at,
                   times, lag)
            continue
        if current is not None:
            del current[reqs[i]]
            listed[i] = False
            if kind == _PREEMPT:
                pending.append(i)
        if i in bounds:
            lo, hi = bounds[i]
            kv.add_taken_blocks(reqs[i].rid, block_of[theirs[lo:hi]].tolist(), sums[i])
        req = reqs[i]
        before = kv.num_used_blocks
        if kind == _PREEMPT:
            step = int(last[i]) + 1
            kv.clock = float(sched_at[step - 1])
            # the full blocks as its last scheduling (sync) or last output before now (async) left them
            kv.cache_full_blocks(req, max(int(computed[i] + last[i] - first[i] + 1) - lag, cut_tokens.get(i, 0)))
            sched._preempt(req)
            taken_at[step - 1] -= before - kv.num_used_blocks
        else:
            row = int(last[i]) + lag - 1  # the row bringing its last token
            now = kv.clock = float(token_times[row])
            kv.cache_full_blocks(req, int(computed[i] + last[i] - first[i] + 1))
            sched.finish(req, now)
            req.placeholders = req.in_flight_tokens = 0  # as its last output leaves them
            finished.append(req.rid)
            taken_at[row] -= before - kv.num_used_blocks
    if taken < len(steps):
        block_of[taken:] = kv.take_free_blocks(len(steps) - taken)
    done = {i for _, _, i, kind in events if kind != _ADMIT}
    going = np.ones(m, dtype=bool)
    going[list(done)] = False
    rest = np.flatnonzero(going[owners])
    give_blocks(kv, reqs, owners[rest], block_of[rest], acquired[rest])
    if not admitting:
        deliver(running, k, token_times, np.minimum(last + lag, k).tolist(), np.minimum(last, k).tolist())
    else:
        counts, scheduled = np.minimum(last + lag, k).tolist(), np.minimum(last, k).tolist()
        for i, r in enumerate(running):
            if i not in readmitted:
                deliver_tokens(r, counts[i], times)
                r.num_computed += scheduled[i]
        for r in run.resumptions:  # from the output of the step that ends its prefill
            if r.member in readmitted:
                continue
            req, row = reqs[r.member], r.prefilled - 1 + lag
            if counts[r.member] > row:
                deliver_tokens(req, counts[r.member] - row, times, start=row)
            req.num_computed = r.tokens + scheduled[r.member] - r.prefilled
            if going[r.member]:
                req.placeholders = req.in_flight_tokens = lag
    for v in victims:  # their last output (already stale when it came) is in
        if v not in readmitted:
            req = reqs[v]
            req.num_computed = req.in_flight_tokens = req.stale_tokens = 0
    going_on = np.flatnonzero(going).tolist()
    sched.replace_running([reqs[i] for i in going_on])
    kv.cache_many(sched.running, (computed[going_on] + (k + 1 - lag) - first[going_on]).tolist())
    return finished


def _admit(sched: NativeScheduler, run: DecodeRun, admitting: dict[int, list[Resumption]], t: int, reqs: list,
           current: dict, listed: np.ndarray, pending: list[int], settled: set[int], taken_at: np.ndarray,
           sched_at: np.ndarray, times: list[float], lag: int) -> None:
    """The admissions of step ``t`` (``admitting``: the run's, by step): the scheduler's own ``_schedule_waiting`` over the requests
    running then (``current``, members ``listed``), within the budget their decodes and the
    rest of a prefill cut in step t - 1 leave, which must admit what the run planned (else the
    plan is wrong: an error). First the victims preempted since the last admissions
    (``pending``) get their tokens through their last step (their last output is in: the
    scheduler finds them waiting so); ``settled`` gains them."""
    kv = sched.kv
    n = len(sched.running)
    if pending:
        for v in pending:
            req = reqs[v]
            count = int(min(run.last_steps[v] + lag, run.k))
            if v < n:
                deliver_tokens(req, count, times)
            else:  # admitted inside the run: its tokens from the output of the step that ends its prefill
                row = int(run.first_steps[v]) - 2 + lag
                if count > row:
                    deliver_tokens(req, count - row, times, start=row)
            req.num_computed = req.in_flight_tokens = req.stale_tokens = 0
            settled.add(v)
        pending.clear()
    used = int(np.count_nonzero(listed & (run.first_steps <= t) & (run.last_steps >= t)))
    used += sum(r.rest for r in admitting.get(t - 1, ()))
    kv.clock = float(sched_at[t - 1])
    before = kv.num_used_blocks
    running = list(current)
    out = sched.admit_in_run(running, sched.config.max_num_batched_tokens - used)
    current.update(dict.fromkeys(running[len(current):]))
    expected = [(r.rid, r.prefill) for r in admitting[t]]
    if list(out.num_scheduled.items()) != expected:
        raise RuntimeError(f"a waiting run planned the admissions {expected} in its step {t}; the scheduler "
                           f"admitted {list(out.num_scheduled.items())}")
    taken_at[t - 1] += kv.num_used_blocks - before
