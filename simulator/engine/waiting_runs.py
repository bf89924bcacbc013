"""Runs of decode steps while requests wait.

Under overload the queue never empties and nearly every step has an event whose outcome depends
on it: a decode short of a KV block preempts the last running request, a request's last token
frees blocks that may admit the queue's head. Such a run goes on through those events when their
outcome is known from the run's own state: a preemption is the scheduler's (the last running
member, as ``NativeScheduler._make_room`` picks it, carried out by ``NativeScheduler._preempt``),
a finish frees its blocks when its last output comes (``NativeScheduler.finish``), and the run
stops before the first step in which the queue's head would be admitted (under async scheduling
it covers that step and leaves it in flight, for the scheduler's own admission to fill:
``NativeScheduler.decode_step(admit=True)``).
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from simulator.engine.kv_cache import tick_sums
from simulator.engine.native import NativeScheduler
from simulator.engine.run_plan import (
    DecodeRun,
    Members,
    Preemption,
    crossing_steps,
    deliver,
    give_blocks,
)
from simulator.records.performance import PerformanceModel


def plan_waiting_run(
    sched, members: Members, times: np.ndarray | None, k: int, perf: PerformanceModel, lag: int
) -> DecodeRun | None:
    """A run of decode steps while requests wait (none is admitted). It goes on through steps
    short of a KV block: there, as ``NativeScheduler._make_room``, the last running member is
    preempted and its blocks serve the step's remaining blocks; and through members' last
    tokens, their blocks freed when their last output comes. It stops before a step in which
    the queue's head (the latest victim, or the head it started with) would be admitted, and
    before a step whose victim would be a member that cannot be handled here (one with a shared
    prefix, whose admission would depend on other requests' blocks; one whose last token is in
    flight; the last one decoding). Blocks, finishes and preemptions are taken in time order,
    each admission checked after the event that could allow it (``_WaitingRun``). ``times``: the
    times of steps 1..k as the members were before the walk, or None (computed after it)."""
    plan = _WaitingRun(sched, members, k, lag)
    k = plan.walk()
    if k < 1:
        return None
    keep = plan.alive & (plan.steps <= k)
    last = plan.last
    changed = min([p.step for p in plan.preemptions], default=k + 1)
    if times is None:
        # a member's steps before its preemption are its steps as planned: the same times
        planned = Members(plan.computed, last, list(members.held))
        times = planned.step_times(perf, 1, k)
    elif changed <= k:
        fixed = Members(plan.computed, last, list(members.held))
        times = np.concatenate((times[: changed - 1], fixed.step_times(perf, changed, k)))
    return DecodeRun(k=k, step_times=times[:k], first_steps=plan.first, computed=plan.computed, last_steps=last,
                     block_steps=plan.steps[keep], block_owners=plan.owners[keep], preemptions=plan.preemptions,
                     waiting=True, admits=plan.admits)


_NONE = np.iinfo(np.int64).min  # a step before every other
_WINDOW = 256  # blocks searched first for the next one short (``_WaitingRun._first_short``)


class _WaitingRun:
    """The events of a run planned while requests wait, walked in time order (see
    ``plan_waiting_run``): ``walk`` returns the run's length and leaves its blocks (``steps``,
    ``owners`` where ``alive``), members' last steps and preemptions."""

    def __init__(self, sched, members: Members, k: int, lag: int):
        self.sched, self.lag = sched, lag
        self.kv = sched.kv
        n = len(sched.running)
        self.held = np.array(members.held, dtype=np.int64)
        self.first, self.computed, last = members.arrays()
        self.last = last.copy()
        self.k = min(k, int(self.last.max()) - (1 - lag))
        self.steps, self.owners = crossing_steps(self.computed, self.held, sched.block_size,
                                                  np.minimum(self.last, max(self.k, 0)), self.first)
        self.alive = np.ones(len(self.steps), dtype=bool)
        #: blocks each member frees when it finishes (those it holds and those the run gives it)
        self.blocks = self.held + np.bincount(self.owners, minlength=n)
        self.gone = np.zeros(n, dtype=bool)  # preempted
        #: blocks held by several members, by their holders (looked up once a holder finishes)
        self.together: dict[tuple[int, ...], int] | None = None
        self.free = self.kv.num_free_blocks  # before the run, plus the victims' blocks so far
        self.preemptions: list[Preemption] = []
        self.head_need = sched._blocks_to_admit(sched.waiting[0])
        self.admits = False  # the run's last step admits the queue's head (left in flight)

    def walk(self) -> int:
        lag, steps, owners = self.lag, self.steps, self.owners
        caching = self.kv.enable_caching
        running = self.sched.running
        if self.k < 1:
            return self.k
        release = self.last + (lag + 1)  # the first step scheduled after a member's last output
        # (computed once: a preemption takes its victim out of it, a shorter run reads less of it)
        freed = self._finish_frees(release, self.k)
        listed = ~self.gone  # members not preempted
        checked = 0  # admissions are checked for the steps up to this one
        pos, before_pos = 0, 0  # the first block not known to be served; live blocks before it
        at_step = None  # the walk's state before the preemptions of the latest step that preempts
        while self.k >= 1:
            k = self.k
            end = int(np.searchsorted(steps, k, side="right"))  # the blocks of steps 1..k
            e = self._first_short(pos, end, before_pos, freed)
            s = int(steps[e]) if e < end else k + 1
            t = self._first_admission(checked + 1, s - 1, release, freed, listed)
            if t is not None:
                # under async scheduling the run may cover step t, left in flight: the scheduler's
                # own admission then fills it, unless a member's last output comes after t is
                # scheduled (it still holds its seat and blocks then; the run would have freed them)
                self.admits = lag == 1 and t >= 2 and not np.any(listed & (self.last == t - 1))
                self.k = t if self.admits else t - 1
                break
            if e == end:
                break
            v = self._victim(s, listed, release)
            last_v = int(self.last[v])
            if (last_v < s or not self._others_decode(v, int(owners[e]), s + 1 - lag, listed)
                    or (caching and running[v].num_shared_blocks)):
                if at_step is not None and at_step[0] == s:
                    # step s already preempted in this walk: the ordinary path takes the whole step
                    _, pos, before_pos = self._restore(at_step)
                self.k = s - 1  # the ordinary path takes that step
                break
            if at_step is None or at_step[0] != s:
                at_step = self._save(s, pos, before_pos)
            # (a listed member's blocks are all live: those before e were served)
            first_of_s = int(np.searchsorted(steps, s, side="left"))
            self.free += int(self.held[v]) + int(np.count_nonzero(owners[:e] == v))
            after = self.alive[first_of_s:]
            after[owners[first_of_s:] == v] = False  # its blocks from step s on
            if release[v] <= len(freed) - 2:  # its blocks no longer come back at its last output
                freed[release[v]:] -= self.blocks[v]
            self.last[v] = s - 1
            release[v] = s + lag
            self.gone[v] = True
            listed[v] = False
            self.preemptions.append(Preemption(s, int(owners[e]), v))
            self.k = min(k, int(self.last.max()) - (1 - lag))
            before_pos += int(np.count_nonzero(self.alive[pos:e]))
            pos = e
            checked = s  # (a step that preempts admits nobody)
        return self.k

    def _victim(self, s: int, listed: np.ndarray, release: np.ndarray) -> int:
        """The last member of the running list at step ``s`` (listed, its last output not in
        before ``s``): the scheduler's victim. Usually the last listed one."""
        i = len(listed) - 1
        while not (listed[i] and release[i] > s):
            i -= 1
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
        stop = min(end, pos + _WINDOW)
        while True:
            live = self.alive[pos:stop]
            rank = np.cumsum(live)  # each live block's place among live blocks, from 1
            rank += before_pos - 1
            short = np.flatnonzero(live & (rank >= self.free + freed[self.steps[pos:stop]]))
            if len(short):
                return pos + int(short[0])
            if stop == end:
                return end
            pos, before_pos, stop = stop, int(rank[-1]) + 1 if len(rank) else before_pos, end

    def _save(self, step: int, pos: int, before_pos: int) -> tuple:
        return (step, pos, before_pos, self.free, self.alive.copy(), self.last.copy(), self.gone.copy(),
                len(self.preemptions))

    def _restore(self, saved: tuple) -> tuple[int, int, int]:
        """Undo the preemptions of step ``saved[0]`` (a later victim of that step cannot be
        handled here); returns (step, pos, before_pos) as they were."""
        step, pos, before_pos, self.free, self.alive, self.last, self.gone, count = saved
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
                         listed: np.ndarray) -> int | None:
        """The first step in lo..hi after an event (a preemption, a member's last output) in
        which the queue's head would be admitted: a seat, and the blocks of its whole sequence
        free once the step's running requests have theirs. Between events the free blocks only
        shrink, so the steps right after events are the only ones to check."""
        if lo > hi:
            return None
        sched = self.sched
        if self.preemptions:  # the head is the latest victim: its tokens once its last output is in
            p = self.preemptions[-1]
            v = p.victim
            tokens = int(self.computed[v] + (p.step - 1) - self.first[v] + 2)
            need = -(-min(tokens, sched.max_model_len) // sched.block_size)
        else:
            need = self.head_need
        last = len(freed) - 1
        if need > self.free + int(freed[min(hi, last)]):
            return None  # (the finishes' blocks only grow with the step: not even by hi)
        checks = {p.step + 1 for p in self.preemptions if lo <= p.step + 1 <= hi}
        releases = release[listed]
        checks.update(releases[(releases >= lo) & (releases <= hi)].tolist())
        max_num_seqs = sched.config.max_num_seqs
        for t in sorted(checks):
            if len(releases) >= max_num_seqs and int(np.count_nonzero(releases > t)) >= max_num_seqs:
                continue
            served = int(np.count_nonzero(self.alive[: int(np.searchsorted(self.steps, t, side="right"))]))
            if need <= self.free + int(freed[min(t, last)]) - served:
                return t
        return None


def apply_waiting_run(sched: NativeScheduler, run: DecodeRun, sched_at: np.ndarray, token_times: np.ndarray,
                       lag: int, taken_at: np.ndarray) -> list[int]:
    """Carry out a run planned while requests wait (``plan_waiting_run``) and return the ids of
    the requests that finished in it. Its events, in time order: a preemption when its step is
    scheduled (the victim's full blocks registered as its last scheduling left them, then
    ``NativeScheduler._preempt``), a finish when its last output comes (``NativeScheduler.finish``);
    the blocks taken before each event are handed out first. Victims get their tokens through
    their last step; the others that do not finish go on running."""
    kv = sched.kv
    running = sched.running
    n, k = len(running), run.k
    first, computed, last = run.first_steps, run.computed, run.last_steps
    steps, owners = run.block_steps, run.block_owners
    preemptions = run.preemptions
    victims = {p.victim for p in preemptions}
    # (time key, blocks handed out before it, member, preemption?): a preemption in step s comes
    # at 2s, a last output between the scheduling of steps last + lag and last + lag + 1 (the
    # blocks before each event found by one search for all)
    events = []
    if preemptions:
        order = steps * (n + 1) + owners  # the blocks' order: by step, then member
        cuts = np.searchsorted(order, [p.step * (n + 1) + p.short for p in preemptions], side="left")
        events = [(2 * p.step, cut, p.victim, True) for p, cut in zip(preemptions, cuts.tolist(), strict=True)]
    ending = [i for i in np.flatnonzero(last + lag <= k).tolist() if i not in victims]
    if ending:
        ends = last[ending] + lag
        cuts = np.searchsorted(steps, ends, side="right")
        events += [(2 * end + 1, cut, i, False) for i, end, cut in zip(ending, ends.tolist(), cuts.tolist(), strict=True)]
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
    at_event = np.zeros(n, dtype=bool)
    at_event[[i for _, _, i, _ in events]] = True
    theirs = np.flatnonzero(at_event[owners])
    theirs = theirs[np.argsort(owners[theirs], kind="stable")]  # by member, each in step order
    bounds, sums = {}, {}  # member -> its stretch of ``theirs``, its acquisition ticks
    if len(theirs):
        members = owners[theirs]
        starts = np.flatnonzero(np.concatenate(([True], members[1:] != members[:-1])))
        ids = members[starts].tolist()
        bounds = dict(zip(ids, pairwise([*starts.tolist(), len(theirs)]), strict=True))
        sums = dict(zip(ids, tick_sums(acquired[theirs], starts), strict=True))
    for _, cut, i, preempting in events:
        if cut > taken:
            block_of[taken:cut] = kv.take_free_blocks(cut - taken)
            taken = cut
        if i in bounds:
            lo, hi = bounds[i]
            kv.add_taken_blocks(running[i].rid, block_of[theirs[lo:hi]].tolist(), sums[i])
        req = running[i]
        before = kv.num_used_blocks
        if preempting:
            step = int(last[i]) + 1
            kv.clock = float(sched_at[step - 1])
            # the full blocks as its last scheduling (sync) or last output before now (async) left them
            kv.cache_full_blocks(req, int(computed[i] + last[i] - first[i] + 1) - lag)
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
    done = {r for _, _, r, _ in events}
    going = np.ones(n, dtype=bool)
    going[list(done)] = False
    rest = np.flatnonzero(going[owners])
    give_blocks(kv, running, owners[rest], block_of[rest], acquired[rest])
    deliver(running, k, token_times, np.minimum(last + lag, k).tolist(), np.minimum(last, k).tolist())
    for v in victims:  # their last output (already stale when it came) is in
        req = running[v]
        req.num_computed = req.in_flight_tokens = req.stale_tokens = 0
    going_on = np.flatnonzero(going).tolist()
    sched.replace_running([running[i] for i in going_on])
    kv.cache_many(sched.running, (computed[going_on] + (k + 1 - lag) - first[going_on]).tolist())
    return finished
