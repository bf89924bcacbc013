"""One replica of a cluster: the single-replica engine on the cluster's SimPy clock.

The replica is ``simulator.engine.loop.Engine`` with its native scheduler and fast
path; what differs is where its requests come from. A router hands them over
one by one (``add`` then ``deliver`` at the arrival time), so the replica's
arrivals grow as the run goes and are known only up to the cluster's next
routing decision: the fast path is told so (``Arrivals.known_until_s``) and
ends its runs before it, which keeps its results equal to the step-by-step
path's. A run planned as if no more requests came is instead held, not applied,
until it ends or a request is routed here (``ReplicaEngine.hold``): a request
that the run admits whole extends it (``ReplicaEngine.extend_held``), any other
has it applied up to that request's arrival, and arrivals routed elsewhere cost
it nothing (a request it admits later waits in it until its step is scheduled
where a request routed here after it might still cut it: ``ReplicaEngine._defer``);
a run held to the end of the steps it timed goes on, timing more (``ReplicaEngine._go_on``).
The replica also reports what a router may read: how many of its requests had
finished by a time, and its KV usage then (``report``).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import simpy

from simulator.cluster.router import ReplicaReport
from simulator.engine import fast_forward
from simulator.engine.interface import Advance, InFlight
from simulator.engine.loop import Engine, ExactEnvironment
from simulator.engine.request import SimRequest, Status
from simulator.engine.run_log import EngineRun
from simulator.engine.run_plan import DecodeRun, decode_blocks, first_block_step
from simulator.engine.steady import SteadyScheduler

#: the most steps a held run's walk times past a request routed here that it admits (a later one
#: times them again; when the clock reaches their end, the run goes on, timing as many again and
#: at least this many: ``ReplicaEngine._go_on``)
HELD_TAIL = 512

#: the columns a replica keeps per request routed to it (by its local request id)
COLUMNS = ("gid", "time_s", "prompt", "max_tokens", "reasoning", "group", "prefix_tokens", "outer_group",
           "outer_tokens")


class ClusterEnvironment(ExactEnvironment):
    """The cluster's clock: the engine's (exact waits; ``call_at`` runs a callback before the
    engines' own events of its time, so a request that arrives at ``t`` is routed and queued
    before any replica schedules a step at ``t``, whichever path, fast or step by step, got
    there), noting when each timeout ends (``Timeout.at_s``) and telling the cluster
    (``on_timeout``) whenever a replica is about to wait: the router may then decide arrivals
    ahead of their time (simulator.cluster.cluster)."""

    on_timeout: Callable[[simpy.Timeout], None] | None = None
    #: the latest timeout made (``ReplicaEngine._release``: the one a loop is about to wait for)
    last_timeout: simpy.Timeout | None = None

    def timeout(self, delay: float = 0, value=None) -> simpy.Timeout:
        event = super().timeout(delay, value)
        event.at_s = self.now + delay  # (as SimPy schedules it)
        self.last_timeout = event
        if self.on_timeout is not None:
            self.on_timeout(event)
        return event

    def timeout_at(self, t: float) -> simpy.Timeout:
        """A timeout to exactly ``t`` (``ExactEnvironment.timeout_at``), noted as ``timeout``'s."""
        event = super().timeout_at(t)
        event.at_s = t
        self.last_timeout = event
        if self.on_timeout is not None:
            self.on_timeout(event)
        return event

    def move_wait(self, process: simpy.Process, timeout: simpy.Timeout, t: float) -> simpy.Timeout:
        """``ExactEnvironment.move_wait``, the new wait noted as ``timeout``'s (the cluster is not
        told: it is no new wait)."""
        event = super().move_wait(process, timeout, t)
        event.at_s = t
        return event


@dataclass
class HeldRun:
    """A run planned from ``now`` and not applied yet (``ReplicaEngine.hold``): the loop waits for
    its end; a request routed here first cuts it (``ReplicaEngine._release``)."""

    now: float
    pace: float
    next_arrival: int
    in_flight: InFlight | None
    base: float
    run: DecodeRun
    ends: np.ndarray  # base + the step times summed in order (as ``Runs.advance``)
    adv: Advance  # what the loop holds: filled in when the run is applied
    #: the plan's walk through the arrivals (``fast_forward.ArrivalWalk``): a request routed here
    #: that the run admits whole extends it (``ReplicaEngine._extend_held``); None: it cannot
    walk: fast_forward.ArrivalWalk | None = None
    #: the blocks each member of the walk held before its first decode step (for the blocks of
    #: a run extended: ``fast_forward.with_blocks``)
    member_held: list[int] | None = None
    #: (each row's end, the KV blocks used after it) as the run applied gives them
    #: (``ReplicaEngine._held_rows``; None: not worked out since the run last changed)
    rows: tuple[np.ndarray, np.ndarray] | None = None
    #: rows worked out before the run last changed, and the latest report time they still answer
    #: (their rows before the steps the change touched: ``ReplicaEngine._keep_rows``)
    stale: tuple[np.ndarray, np.ndarray] | None = None
    stale_until: float = -math.inf
    #: per request running when it was planned (which the run held leaves as they are): the
    #: blocks it held then that its finish frees (``ReplicaEngine._freed_at_finish``; None: not yet)
    freed_at_finish: np.ndarray | None = None
    #: when a check whether the run goes on is due (``ReplicaEngine._go_on_later``; -inf: none)
    go_on_at: float = -math.inf


class ReplicaEngine(Engine):
    """An engine whose requests a cluster routes to it (local ids 0, 1, ... in routing order)."""

    def __init__(self, index: int, role: str, capacity: int, *args,
                 known_until: Callable[[float], float],
                 on_finish: Callable[[ReplicaEngine, int, float, bool], None], **kwargs):
        """``on_finish(replica, j, finish_s, dropped)`` hears of every request that ends here
        (``dropped``: rejected or aborted, not completed)."""
        self.index = index
        self.role = role  # "replica", "prefill" or "decode"
        self._cols = {name: np.zeros(capacity, dtype=np.float64 if name == "time_s" else np.int64)
                      for name in COLUMNS}
        self._queued = np.ones(capacity, dtype=bool)  # joins the queue on arrival (False: too long, rejected)
        self._view: fast_forward.Arrivals | None = None  # ``arrivals_view`` with no bound, kept
        self._private = np.zeros(capacity, dtype=bool)  # no prompt block can be a prefix hit
        self._deadline_s = np.full(capacity, math.inf)  # when the client gives up (workload.timeout_s)
        self._timeouts = False  # a request routed here has a client timeout
        self.count = 0  # requests routed here so far
        self.sent = 0  # requests the router sent here (its own count)
        self._known_until = known_until
        #: a lower bound on ``known_until`` quicker to read (the cluster sets it: its next arrival
        #: not routed yet, before which no request routed from now on arrives)
        self.known_from: Callable[[], float] = lambda: -math.inf
        self._on_finish = on_finish
        self._finish_times: list[float] = []  # heap of finish times reported, not yet counted
        self._finished_before = 0
        self._reported: set[int] = set()
        self.pending = 0  # deliveries scheduled for later
        self._pending_s: deque[float] = deque()  # their times, in order
        self.loop: simpy.Process | None = None
        #: called before each run is planned (the cluster may route arrivals ahead then)
        self.look_ahead: Callable[..., None] | None = None
        #: foresee the finishes of each run before it is planned (``foreseen``)
        self.foresee = False
        self.closed = False  # no more requests will be routed here
        #: runs are held, not applied, until they end or a request routed here cuts them (only
        #: runs planned as if no more requests came: ``ClusterRuns.advance``)
        self.hold = False
        #: ... and a request routed here that a held run admits whole extends it, not cuts it
        self.extend_held = True
        #: ... and such a request, arriving before the step admitting it is scheduled, waits in the
        #: run until then (``_defer``) where its admission is not yet certain at its arrival
        self.defer_held = True
        #: ... and a run held to the end of the steps its walk timed goes on, timing more (``_go_on``)
        self.go_on_held = True
        #: its reports read the KV usage in the finishes' foreseen span too (a router reading it:
        #: the held run's or the run applied not logged yet, from their rows)
        self.report_kv = False
        self._held: HeldRun | None = None
        #: requests delivered while a run was held, their admission in it not settled yet: (local
        #: id, when the step admitting it is scheduled) (``_defer``)
        self._deferred: list[tuple[int, float]] = []
        self._moving: float | None = None  # where the loop's wait moves once it waits (``_move_wait``)
        #: a run applied, logged when it ends: (its advance, next arrival, admissions, arrivals admitted)
        self._unlogged: tuple[Advance, int, list, range] | None = None
        self._changes = 0  # steps applied and runs taken (keys ``_fewest_steps_left``'s cache)
        self._fewest: tuple[tuple[int, int, int] | None, float] = (None, math.inf)
        #: (finish times, valid until): this replica's finishes after its latest planning point,
        #: as its run would give them if no more requests came (``ClusterRuns.finishes_ahead``);
        #: every finish before the second entry is among them (a request routed here later
        #: changes only what comes after its arrival)
        self.foreseen: tuple[np.ndarray, float] | None = None
        self._foreseen_from = math.inf  # the planning point it was foreseen at
        self._foreseen_reported: list[float] = []  # finishes reported since (sorted)
        #: finishes counted on the progress bar as the clock passed them and not reported yet (a run
        #: held reports its finishes when it is applied: ``unshown_finishes``)
        self.shown_ahead = 0
        self.end_s = 0.0
        super().__init__(*args, **kwargs)
        if isinstance(self.scheduler, SteadyScheduler):
            self.scheduler.use_runs(ClusterRuns(self, self.scheduler, self._decode_model,
                                                self._arrivals_columns(), self.async_scheduling))

    # --- requests routed here -------------------------------------------------------
    def add(self, gid: int, time_s: float, prompt: int, max_tokens: int, reasoning: int, group: int,
            prefix_tokens: int, outer_group: int = -1, outer_tokens: int = 0, deadline_s: float = math.inf) -> int:
        """Append a routed request (its arrival here at ``time_s``; ``deadline_s``: when its client
        gives up, as the Engine's ``_abort_due`` reads it); return its local id."""
        j = self.count
        values = (gid, time_s, prompt, max_tokens, reasoning, group, prefix_tokens, outer_group, outer_tokens)
        for name, value in zip(COLUMNS, values, strict=True):
            self._cols[name][j] = value
        cfg, kv = self.config, self.kv_capacity
        self._queued[j] = prompt + max_tokens <= min(cfg.max_model_len, (kv.num_blocks - 1) * kv.block_size)
        self._private[j] = (prefix_tokens if group >= 0 else 0) < cfg.block_size  # as Engine._arrivals_columns
        self._deadline_s[j] = deadline_s
        self.count = j + 1
        extended = False
        if self._held is not None:
            extended = self._queued[j] and deadline_s == math.inf and self._extend_held(j)
            if not extended:
                self._release(time_s)  # (its steps scheduled from the arrival on are not taken)
        self._timeouts = self._timeouts or deadline_s < math.inf
        if not extended and self.foreseen is not None and time_s < self.foreseen[1]:
            self.foreseen = (self.foreseen[0], time_s)
        if not self._queued[j]:  # rejected on arrival: known now, so a router deciding ahead counts it
            self._report_finish(j, time_s, dropped=True)
        return j

    def deliver(self, j: int) -> None:
        """Request ``j`` arrives now (unless a run of steps already admitted it)."""
        if self._held is not None:
            if self._held_admits(j) or self._defer(j):
                return  # (made when the run is applied: ``_arrive``; or queued then: ``_apply_held``)
            self._release(self.env.now)
        self._queue(j)

    def _queue(self, j: int) -> None:
        """Request ``j``, arrived, joins the queue (unless a run of steps already admitted it)."""
        if j < self._next_arrival:
            return
        self._next_arrival = j + 1
        req = self._new_request(j)
        if req.status != Status.REJECTED:
            self.scheduler.add_request(req)
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def deliver_at(self, j: int, t: float) -> None:
        """Request ``j`` arrives at ``t`` (now or later)."""
        if t <= self.env.now:
            self.deliver(j)
            return
        self.pending += 1
        self._pending_s.append(t)

        def arrive(_event) -> None:
            self.pending -= 1
            self._pending_s.popleft()
            self.deliver(j)
            if self.closed and not self.pending:
                self.close()

        self.env.call_at(t, arrive)

    def close(self) -> None:
        """No more requests: the loop ends once the replica is idle."""
        self.closed = True
        if self.pending:
            return  # the last delivery closes it
        self._arrivals_done = True
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def gid(self, j: int) -> int:
        return int(self._cols["gid"][j])

    def column(self, name: str) -> np.ndarray:
        """A column of the requests routed here (COLUMNS), by local id."""
        return self._cols[name][: self.count]

    # --- what a router reads ---------------------------------------------------------
    def report(self, view_s: float, position: int, finishes_ahead: np.ndarray | None = None) -> ReplicaReport:
        """This replica as reported at ``view_s`` (``position``: its place in its pool): requests
        sent and not finished before it, and the KV usage after its last step that ended before it
        (``finishes_ahead``: finishes of a run not taken yet; then the KV usage is not known, nan;
        nan too where the finishes foreseen count, unless ``report_kv``: then from the run held,
        ``_kv_before``)."""
        heap = self._finish_times
        while heap and heap[0] < view_s:
            heapq.heappop(heap)
            self._finished_before += 1
        if finishes_ahead is not None:
            ahead = int(finishes_ahead.searchsorted(view_s, side="left"))
            return ReplicaReport(position, self.sent - self._finished_before - ahead, math.nan)
        if self.foreseen is not None and self._foreseen_from < view_s <= self.foreseen_until():
            return ReplicaReport(position, self.sent - self._finished_before - self._foreseen_unreported(view_s),
                                 self._kv_before(view_s) / max(self.kv_capacity.num_blocks - 1, 1)
                                 if self.report_kv else math.nan)
        used = self._kv_before(view_s) if self.report_kv else self.steps.kv_before(view_s)
        return ReplicaReport(position, self.sent - self._finished_before,
                             used / max(self.kv_capacity.num_blocks - 1, 1))

    def _kv_before(self, view_s: float) -> int:
        """KV blocks used after the last step that ended before ``view_s`` (``StepLog.kv_before``),
        the steps of the run held (from its plan: ``_held_rows``) or of the run applied and not
        logged yet counted. (A query reaches no run's last row: the run is applied, and its last
        row settled, when the clock reaches its end.)"""
        rows = None
        held = self._held
        if held is not None:
            if view_s > held.now:
                rows = held.rows
                if rows is None:
                    rows = held.stale if view_s <= held.stale_until else self._held_rows()
        elif self._unlogged is not None:
            adv = self._unlogged[0]
            rows = (adv.token_times, adv.kv_blocks_used)
        if rows is not None:
            i = int(rows[0].searchsorted(view_s, side="left"))
            if i:
                return int(rows[1][i - 1])
        return self.steps.kv_before(view_s)

    def _held_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The run held's rows: their ends and the KV blocks used after each, as ``apply_run``
        gives them (blocks taken in each step's row, those of each member finishing inside the
        run freed in the row of its last output, last steps in order; a block held together is
        freed with its last holder), worked out from the plan and the scheduler's state (which
        the run held leaves as it is), without applying it."""
        held = self._held
        if held.rows is not None:
            return held.rows
        sched = self.scheduler
        kv = sched.kv
        lag = self.scheduler._runs.lag
        run = held.run
        k = run.k
        running = sched.running
        n = len(running)
        last = run.last_steps
        if run.block_steps is not None:
            delta = np.bincount(run.block_steps - 1, minlength=k).astype(np.int64)
            taken = np.bincount(run.block_owners, minlength=len(last))
        else:  # the blocks ``with_blocks`` gives it, counted by step (each member's every bs steps)
            m = len(last)
            hold = np.array(held.member_held[:m], dtype=np.int64)
            bs = sched.block_size
            first = first_block_step(run.computed, hold, run.first_steps, bs)
            taken = decode_blocks(first, np.minimum(last, k), bs)
            delta = every_bs_steps(first, taken, bs, k)
            if run.admissions:  # their prompts' blocks, taken in their prefill steps
                for a, blocks in zip(run.admissions, hold[n:].tolist(), strict=True):
                    delta[a.step - 1] += blocks
                taken[n:] += hold[n:]
        finishing = np.flatnonzero(last + lag <= k)
        if len(finishing):  # each frees in the row of its last output (an arrival admitted: its prompt's too)
            freed = taken[finishing]
            before = finishing < n
            if before.any():
                freed[before] += self._freed_at_finish(held)[finishing[before]]
            delta -= np.bincount(last[finishing] + (lag - 1), weights=freed, minlength=k).astype(np.int64)
        used = np.cumsum(delta)
        used += kv.num_used_blocks
        e = held.ends
        held.rows = (e[1 - lag: k + 1 - lag], used)
        return held.rows

    def _freed_at_finish(self, held: HeldRun) -> np.ndarray:
        """Per request running when the run held was planned: the blocks it held then that its
        finish frees (a block held together is freed with its last holder, last steps in order;
        the same for every run the held one becomes: their last steps are fixed)."""
        if held.freed_at_finish is None:
            kv = self.scheduler.kv
            running = self.scheduler.running
            freed = np.zeros(len(running), dtype=np.int64)
            refs: dict[int, int] = {}  # blocks held together: holders left
            ref = kv._ref
            for i in np.argsort(held.run.last_steps[: len(running)], kind="stable").tolist():
                rid = running[i].rid
                blocks = kv.req_blocks.get(rid, ())
                if rid in kv._holds_named:
                    for block in blocks:
                        left = refs.get(block, int(ref[block])) - 1
                        refs[block] = left
                        freed[i] += left == 0
                else:
                    freed[i] = len(blocks)
            held.freed_at_finish = freed
        return held.freed_at_finish

    def outstanding_at_most(self, view_s: float) -> int:
        """Requests sent here and not reported finished before ``view_s`` (changes nothing): its
        report at ``view_s`` counts at most these."""
        return self.sent - self._finished_before - sum(1 for t in self._finish_times if t < view_s)

    def outstanding_foreseen(self, view_s: float) -> int:
        """Its report's outstanding count at ``view_s``, from the finishes foreseen (``view_s`` in
        ``(foreseen_from, foreseen_until()]``; changes nothing)."""
        return self.outstanding_at_most(view_s) - self._foreseen_unreported(view_s)

    def _foreseen_unreported(self, view_s: float) -> int:
        """The finishes foreseen before ``view_s`` not reported yet (those reported come first;
        ``view_s`` in ``(foreseen_from, foreseen_until()]``)."""
        return (int(self.foreseen[0].searchsorted(view_s, side="left"))
                - bisect.bisect_left(self._foreseen_reported, view_s))  # (a list: no array made)

    def unshown_finishes(self, now: float) -> int:
        """Finishes of the run held before ``now`` (foreseen: exact) neither reported nor counted on
        the progress bar yet."""
        if self._held is None or self.foreseen is None or not self._foreseen_from < now <= self.foreseen_until():
            return 0
        return max(self._foreseen_unreported(now) - self.shown_ahead, 0)

    @property
    def foreseen_from(self) -> float:
        """The planning point ``foreseen`` was made at."""
        return self._foreseen_from

    def foreseen_until(self) -> float:
        """Until when ``foreseen`` holds every finish here (-inf: nothing foreseen): no request
        routed here since, and no client timeout, before it."""
        if self.foreseen is None:
            return -math.inf
        until = self.foreseen[1]
        if self._deadlines:
            until = min(until, self._deadlines[0][0])
        if self._timeouts:
            for j in range(self._next_arrival, self.count):  # routed here, not arrived yet
                until = min(until, float(self._deadline_s[j]))
        return until

    def foresee_from(self, now: float, foreseen: tuple[np.ndarray, float] | None) -> None:
        """Set ``foreseen`` at a planning point ``now`` (every finish up to now is reported)."""
        self.foreseen = foreseen
        self._foreseen_from = now
        self._foreseen_reported = []

    def determined_until(self, new_timeout: simpy.Timeout | None = None) -> float:
        """A time before which this replica's steps and finishes are all known (logged and
        reported), given the requests routed to it so far: when its loop next resumes (the end
        of the step or run it waits for; ``new_timeout`` if it is about to wait for that one),
        or its next delivery if it is idle."""
        loop = self.loop
        if loop is None or not loop.is_alive:
            return math.inf
        target = loop.target
        if self._held is not None:
            until = self._held.now  # (its state; the run's finishes are foreseen)
        elif self.env.active_process is loop:
            until = new_timeout.at_s if new_timeout is not None else self.env.now
        elif isinstance(target, simpy.Timeout) and not target.processed:
            until = target.at_s
        elif target is self._wake and not target.triggered:
            until = math.inf  # idle until a delivery wakes it
        else:
            until = self.env.now
        return min(until, self._pending_s[0]) if self._pending_s else until

    def reports_known_until(self, until: float) -> float:
        """Until when its reports are known, ``until`` its ``determined_until``: with ``report_kv``
        and a run held, to the run's end (its rows and finishes are known from its plan: a request
        routed here later keeps the steps scheduled before its arrival), or its next delivery, or
        the step admitting a request waiting in the run (``_defer``: it may be cut there)."""
        held = self._held
        if held is None or not self.report_kv:
            return until
        end = held.adv.end_s
        if self._deferred:  # (the run may be cut there)
            end = min(end, *(at for _, at in self._deferred))
        return max(until, min(end, self._pending_s[0]) if self._pending_s else end)

    def no_finish_until(self, until: float, min_step_s: float) -> float:
        """A time before which this replica reports no finish it has not reported yet, given
        that its steps before ``until`` (its ``determined_until``) are known: the later of two
        bounds, the finishes ``foreseen`` (the first at or after ``until``) and the steps every
        request still needs (``_no_finish_by_steps``); client timeouts bound both."""
        bound = self._no_finish_by_steps(until, min_step_s)
        foreseen = self.foreseen
        if foreseen is not None and bound < foreseen[1]:
            finishes = foreseen[0]
            i = int(finishes.searchsorted(until, side="left"))
            bound = max(bound, min(self.foreseen_until(), float(finishes[i]) if i < len(finishes) else math.inf))
        return max(bound, until)

    def _no_finish_by_steps(self, until: float, min_step_s: float) -> float:
        """``no_finish_until`` from the steps left: every request still to finish needs its
        tokens left, one per step (more with speculation), its steps ending at least
        ``min_step_s`` apart, the first at ``until`` at the earliest."""
        sched = self.scheduler
        cfg = self.config
        per_step = 1 + (cfg.speculative.num_speculative_tokens if cfg.speculative.enabled else 0)
        least = self._fewest_steps_left(per_step)
        if least <= 1:
            return until
        bound = until + (least - 1) * min_step_s if least < math.inf else math.inf
        runs = getattr(sched, "_runs", None)
        for rid, joining in (runs._joining.items() if runs is not None else ()):
            if joining.finish_s >= 0:
                continue  # finished inside its run: reported
            a = joining.admission
            delivered = min(joining.last, joining.k - joining.lag) - a.step + 1
            left = -(-max(int(self._cols["max_tokens"][rid]) - delivered, 1) // per_step)
            bound = min(bound, until + (left - 1) * min_step_s)
        for j in range(self._next_arrival, self.count):  # routed here, not arrived yet
            if self._queued[j]:
                left = -(-int(self._cols["max_tokens"][j]) // per_step)
                bound = min(bound, float(self._cols["time_s"][j]) + left * min_step_s)
                if self._timeouts:
                    bound = min(bound, float(self._deadline_s[j]))
        if self._deadlines:  # a client timeout aborts at the first step boundary from its deadline
            bound = min(bound, self._deadlines[0][0])
        return max(bound, until)

    def _fewest_steps_left(self, per_step: int) -> float:
        """The fewest steps any request in the scheduler needs to finish (inf: none), kept until
        its state changes (a step scheduled or applied, a run, a request added)."""
        sched = self.scheduler
        key = (sched.step, len(sched.requests), self._changes)
        if self._fewest[0] == key:
            return self._fewest[1]
        cfg = self.config
        steady = getattr(sched, "_steady", None) or {}
        applied = getattr(sched, "_applied_step", 0)
        least = math.inf
        for req in (*sched.running, *sched.waiting):
            if req.status >= Status.FINISHED:
                continue
            delivered = req.num_output
            st = steady.get(req.rid)
            if st is not None:
                delivered += max(applied - st.start + 1, 0)  # tokens the steady set has not written yet
            left = min(req.max_tokens - delivered, cfg.max_model_len - req.num_prompt - delivered)
            least = min(least, -(-max(left, 1) // per_step))
            if least <= 1:
                break
        self._fewest = (key, least)
        return least

    def _report_finish(self, j: int, finish_s: float, dropped: bool = False) -> None:
        if j in self._reported:
            return
        self._reported.add(j)
        if self.foreseen is not None and not dropped:  # (a foreseen finish)
            bisect.insort(self._foreseen_reported, finish_s)
        heapq.heappush(self._finish_times, finish_s)
        self._on_finish(self, j, finish_s, dropped)

    # --- the engine's hooks -----------------------------------------------------------
    def _new_request(self, rid: int) -> SimRequest:
        c = self._cols
        req = SimRequest(rid, float(c["time_s"][rid]), int(c["prompt"][rid]), int(c["max_tokens"][rid]),
                         int(c["reasoning"][rid]), int(c["group"][rid]), int(c["prefix_tokens"][rid]),
                         self.config.block_size, int(c["outer_group"][rid]), int(c["outer_tokens"][rid]))
        if self._enter(req, float(self._deadline_s[rid])):
            self._report_finish(rid, req.finish_s, dropped=True)
        return req

    def _abort_due(self) -> None:
        """The Engine's aborts (client timeouts due by now), each reported to the cluster."""
        now = self.env.now
        if not self._deadlines or self._deadlines[0][0] > now:
            return
        due = [rid for t, rid in self._deadlines if t <= now]
        super()._abort_due()
        requests = self.scheduler.requests
        for rid in due:
            if requests[rid].status == Status.ABORTED:
                self._report_finish(rid, now, dropped=True)

    def _arrivals_columns(self) -> fast_forward.Arrivals:
        return self.arrivals_view(0.0)

    def arrivals_view(self, now: float, known: bool = True) -> fast_forward.Arrivals:
        """The requests routed here as the fast path reads them, known until the next decision
        (``known`` False: those routed so far, with no bound)."""
        n = self.count
        view = self._view
        if view is None or len(view.time_s) != n:
            c = self._cols
            view = self._view = fast_forward.Arrivals(
                time_s=c["time_s"][:n], queued=self._queued[:n], prompt=c["prompt"][:n],
                max_tokens=c["max_tokens"][:n], private=self._private[:n], admit=self.shapes is None)
        return replace(view, known_until_s=self._known_until(now)) if known else view

    def _apply(self, out, start: float) -> None:
        self._changes += 1
        super()._apply(out, start)
        now = self.env.now
        requests = self.scheduler.requests
        for rid in out.num_scheduled:
            req = requests[rid]
            if req.status == Status.FINISHED and req.finish_s == now:
                self._report_finish(rid, now)

    # --- held runs ---------------------------------------------------------------------
    def hold_run(self, now: float, pace: float, next_arrival: int, in_flight: InFlight | None, base: float,
                 run: DecodeRun, lag: int, walk: fast_forward.ArrivalWalk | None = None) -> Advance:
        """Hold ``run`` (planned from ``now`` as if no more requests came; it admits only those
        routed here by then; ``walk``: its plan's walk through them): the loop waits for its end,
        and the run is applied then. A request routed here that the run admits whole extends it
        (``_extend_held``); any other has it applied at once, cut before its first step
        scheduled at or after that request's arrival (``_release``). Returns what the loop holds
        (filled in when the run is applied)."""
        ends = np.cumsum(np.concatenate(([base], run.step_times)))
        end_s = float(ends[run.k - lag])
        empty = np.empty(0)
        adv = Advance(0, end_s, empty, empty, empty, [], [], 0, {}, {}, None, [], next_arrival, pace)
        self._held = HeldRun(now, pace, next_arrival, in_flight, base, run, ends, adv, walk,
                             walk.members.held if walk is not None else None)
        self._go_on_later(self._held)
        return adv

    def _go_on_later(self, held: HeldRun) -> None:
        """When the clock reaches the end of the run held, its walk times more steps if it can
        (``_go_on``): a run timed a short way past its latest admission goes on lazily instead
        of being applied there and planned anew."""
        walk = held.walk
        if self.go_on_held and walk is not None and walk.open and held.run.k == len(walk.clock) < walk.k_max:
            end_s = held.adv.end_s
            if self.env.now <= held.go_on_at <= end_s:
                return  # one is due no later: it looks again then (a run extended ends later)
            held.go_on_at = end_s
            self.env.call_at(end_s, lambda _event: self._go_on(held, end_s))

    def _go_on(self, held: HeldRun, at: float) -> None:
        """(At ``at``, before the loop resumes there.) The run held, if it still ends now, goes on:
        its walk times as many steps again as it has (``ArrivalWalk.go_on``), the loop's wait moved
        to the new end, the finishes foreseen again; if it ends later now (extended), this is due
        again at its end. Nothing if the run was applied or another is due."""
        if self._held is not held or held.go_on_at != at or held.walk is None:
            return
        held.go_on_at = -math.inf
        if held.adv.end_s != at:
            self._go_on_later(held)
            return
        run = held.walk.go_on(max(held.run.k, HELD_TAIL))
        if run is None or run.k <= held.run.k:
            return
        self._keep_rows(held, run, held.run.k - 1)
        self._hold_on(held, run)
        self._go_on_later(held)

    def _hold_on(self, held: HeldRun, run: DecodeRun) -> None:
        """The run held becomes ``run`` (the same steps first, then more): its step ends, the
        loop's wait and the finishes foreseen follow it."""
        runs: ClusterRuns = self.scheduler._runs
        held.run, held.rows = run, None
        held.ends = np.cumsum(np.concatenate(([held.base], run.step_times)))
        end_s = float(held.ends[run.k - runs.lag])
        if end_s != held.adv.end_s:
            held.adv.end_s = end_s
            self._move_wait(end_s)
        self.foreseen = runs.finishes(run, held.base, held.ends)  # (those before the change are the same)

    def _release(self, t: float) -> None:
        """Apply the run held, its steps scheduled before ``t`` (the arrival of a request routed
        here, at its routing, ahead or not; inf: all): the steps the step-by-step path schedules
        before that request is queued, the request arriving during the last (as a single run's
        arrivals that it does not admit), less any admission that would be the last step (the
        run then ends when that admission's step is scheduled, at or after now: ``_held_admits``,
        ``_defer``).
        The loop then waits for the end of the steps applied."""
        held = self._held
        # step 1 is scheduled at ``held.now`` (< t), step s >= 2 at ends[s - 1 - lag]
        self._apply_held(min(held.run.k, int(np.searchsorted(held.ends, t, side="left")) + self.scheduler._runs.lag))

    def stop_held(self) -> None:
        """(A stop: ``Engine.request_stop``.) Apply the run held up to its first step boundary
        at or after now where a cut may end."""
        held = self._held
        if held is None:
            return
        lag = self.scheduler._runs.lag
        held.run = fast_forward.with_blocks(self.scheduler, held.run, held.member_held)
        k = min(held.run.k, max(int(np.searchsorted(held.ends, self.env.now, side="left")) + lag, 1))
        while k < held.run.k and held.ends[cut_run(held.run, k).k - lag] < self.env.now:
            k += 1
        self._apply_held(k)

    def _apply_held(self, k: int) -> None:
        """Apply the first ``k`` steps of the run held (``cut_run``; all: ``k`` its length)."""
        held, self._held = self._held, None
        runs: ClusterRuns = self.scheduler._runs
        run = fast_forward.with_blocks(self.scheduler, held.run, held.member_held)
        if k < run.k:
            run = cut_run(run, k)
        adv = held.adv
        end_s = adv.end_s
        applied = runs.apply_held(held, run, self.arrivals_view(self.env.now, known=False))
        adv.__dict__.update(applied.__dict__)
        admitted = self._after_run(adv)
        self._unlogged = (adv, held.next_arrival, run.admissions, admitted)
        if adv.end_s != end_s:  # (at or after now)
            self._move_wait(adv.end_s)
        deferred, self._deferred = self._deferred, []
        for j, _ in deferred:  # (those the steps applied do not admit)
            self._queue(j)

    def _move_wait(self, end_s: float) -> None:
        """The loop, waiting for the run held, resumes at ``end_s`` instead (at or after now)."""
        env, loop = self.env, self.loop
        if self._moving is None and env.active_process is not loop:
            env.move_wait(loop, loop.target, end_s)
            return
        # routed as the loop makes its wait (``on_timeout``): moved once it waits
        (env.last_timeout if env.active_process is loop else loop.target).at_s = end_s
        if self._moving is None:
            def move(_event) -> None:
                end, self._moving = self._moving, None
                env.move_wait(loop, loop.target, end)

            env.call_at(env.now, move)
        self._moving = end_s

    def _extend_held(self, j: int) -> bool:
        """Request ``j``, just routed here, joins the run held if the step after its arrival
        admits it whole (``ArrivalWalk.extend``): the run planned again from its walk, held
        on, its finishes foreseen again. False (nothing changed but the walk): the run must be
        cut."""
        held = self._held
        walk = held.walk
        if walk is None or not self.extend_held:
            return False
        held.walk = None  # (a walk that went on is kept only with its run)
        run = walk.extend(self.arrivals_view(self.env.now, known=False))
        if run is None or not run.admissions or run.admissions[-1].rid != j:
            return False
        self._keep_rows(held, run, min(run.admissions[-1].step - 2, held.run.k - 1, run.k - 1))
        held.walk = walk
        self._hold_on(held, run)  # (it ends after the arrival: its prefill is not the last step)
        self._go_on_later(held)
        return True

    @staticmethod
    def _keep_rows(held: HeldRun, run: DecodeRun, last: int) -> None:
        """Before the run held becomes ``run`` (the same steps up to row ``last``, and so the same
        rows there: an admission appended after them, or steps timed on): keep the rows worked out
        as ``stale``, for the reports that read no later row than ``last`` (rows of steps up to
        both lengths: the blocks taken and freed there are the same)."""
        rows, until = (held.rows, math.inf) if held.rows is not None else (held.stale, held.stale_until)
        if rows is None or last < 0:
            held.stale, held.stale_until = None, -math.inf
            return
        ends = rows[0]
        held.stale, held.stale_until = rows, min(until, float(ends[min(last, len(ends) - 1)]))

    def _held_admits(self, j: int) -> bool:
        """Whether the run held admits request ``j`` (arriving now) for certain: no cut can drop
        its admission, nor one that ends before now. A cut at a request's arrival keeps the steps
        scheduled before it and then none whose prefill would be its last: were ``j``'s step (or
        one of the admissions in the steps right after it) the last kept, the run would end when
        that step is scheduled, before now. So no request routed here later may arrive before
        the step after those admissions is scheduled (``known_until``: the first arrival the
        router may send here)."""
        admissions = self._held.run.admissions
        at = next((i for i in range(len(admissions) - 1, -1, -1) if admissions[i].rid == j), None)
        if at is None:
            return False
        step = admissions[at].step
        for a in admissions[at + 1 :]:  # (in step order) the admissions in the steps right after
            if a.step > step + 1:
                break
            step = a.step
        # step s >= 2 is scheduled at ends[s - 1 - lag]
        scheduled = self._held.ends[step - self.scheduler._runs.lag]
        return self.known_from() > scheduled or self._known_until(self.env.now) > scheduled

    def _defer(self, j: int) -> bool:
        """Request ``j``, arriving now, stays in the run held (not queued) until the step admitting
        it is scheduled, if that is later (``_settle``). No step is scheduled from now until then,
        so a cut meanwhile keeps the steps a cut now keeps (and then queues ``j``: ``_apply_held``),
        and a request routed here that arrives meanwhile cannot make the run end before the clock
        (a cut at its arrival keeps no step of ``j``'s admission). False: ``j`` is not admitted
        later than now."""
        held = self._held
        step = next((a.step for a in held.run.admissions if a.rid == j), None) if self.defer_held else None
        lag = self.scheduler._runs.lag
        if step is None or step - 1 - lag < 0:
            return False
        at = float(held.ends[step - 1 - lag])  # (step s >= 2 is scheduled at ends[s - 1 - lag])
        if not at > self.env.now:
            return False
        self._deferred.append((j, at))
        self.env.call_at(at, lambda _event: self._settle(held, j))
        return True

    def _settle(self, held: HeldRun, j: int) -> None:
        """(When the step admitting request ``j`` is scheduled.) ``j`` stays in the run held if it
        still admits it for certain (``_held_admits``); else the run is cut now, as at ``j``'s
        arrival, and ``j`` queued. Nothing if the run was applied since."""
        waiting = [i for i, _ in self._deferred]
        if self._held is not held or j not in waiting:
            return
        if self._held_admits(j):
            del self._deferred[waiting.index(j)]
            return
        self._release(self.env.now)

    def _log_run(self, adv: fast_forward.Advance, joined: int = 0) -> None:
        if self._held is None or adv is not self._held.adv:  # (a run held is logged once applied)
            super()._log_run(adv, joined)

    def _arrive(self, rids: range) -> None:
        """(At the end of a run's wait.) A run held to its end is applied; a run applied is logged,
        the queue's changes counted with the requests routed here by now."""
        if self._held is not None:
            self._release(math.inf)
        if self._unlogged is not None:
            adv, next_arrival, admissions, rids = self._unlogged
            self._unlogged = None
            adv.waiting_changes = self.scheduler._runs.queue_changes(
                self.arrivals_view(self.env.now, known=False), next_arrival, adv.token_times, admissions)
            super()._log_run(adv)
        super()._arrive(rids)

    def _after_run(self, adv: fast_forward.Advance) -> range:
        if self._held is not None and adv is self._held.adv:
            return range(self._next_arrival, self._next_arrival)  # (counted when applied)
        self._changes += 1
        admitted = super()._after_run(adv)
        runs = getattr(self.scheduler, "_runs", None)
        joining = runs._joining if runs is not None else {}  # arrivals a run admitted, not yet joined
        requests = self.scheduler.requests
        for rid in adv.finished:
            self._report_finish(rid, joining[rid].finish_s if rid in joining else requests[rid].finish_s)
        return admitted

    def start_loop(self) -> simpy.Process:
        """Start the engine loop (the cluster delivers the requests); note when it ends."""
        loop = self.loop = self.start(arrivals=False)
        loop.callbacks.append(lambda _event: setattr(self, "end_s", self.env.now))
        return loop

    def collect(self) -> EngineRun:
        run = super().collect()
        run.end_s = self.end_s
        return run


class ClusterRuns(fast_forward.Runs):
    """The fast path of a replica: its arrivals are re-read before each run (they grow).

    With ``replica.foresee``, each run is first planned as if no more requests came to the
    replica (its finishes then are ``replica.foreseen``, which the router may read ahead); a
    pure decode run so planned is cut before the next routing decision and taken as it is, the
    same steps a plan cut there gives (else the run is planned again). With ``replica.hold``,
    such a run is held instead (``ReplicaEngine.hold_run``; one admitting arrivals routed ahead
    only with ``replica.extend_held``)."""

    resume_waiting = False  # (its runs are cut at routing decisions: no admissions inside them)

    def __init__(self, replica: ReplicaEngine, *args):
        super().__init__(*args)
        self.replica = replica
        self._foreseen_run: tuple[float, int, DecodeRun] | None = None  # (base, routed count, run)
        self._take: DecodeRun | None = None  # the run ``_plan`` gives (a held run applied)
        self._walk: fast_forward.ArrivalWalk | None = None  # the walk of the plan ahead, if it had one

    def advance(self, now, pace, next_arrival, in_flight):
        replica = self.replica
        self._foreseen_run = None
        if replica.foresee:
            base = self.base(now, in_flight)
            # (not while requests wait: that plan takes another path than the run's, and is dropped)
            run = self._plan_ahead(now, base, pace, next_arrival) if base is not None and not self.sched.waiting \
                else None
            replica.foresee_from(now, self.finishes(run, base) if run is not None else None)
            if run is not None and not (run.preemptions or run.waiting or run.admits):
                self._foreseen_run = (base, replica.count, run)
            held = self._foreseen_run
            if replica.hold and held is not None and not replica._timeouts and (
                    replica.extend_held or not held[2].admissions):
                # (nothing decided ahead for it: a request routed here extends or cuts the run)
                run = held[2]
                self._horizon = min(max(2 * run.k, fast_forward.INITIAL_HORIZON), fast_forward.MAX_HORIZON)
                return replica.hold_run(now, pace, next_arrival, in_flight, held[0], run, self._lag, self._walk)
            if replica.look_ahead is not None:
                replica.look_ahead(replica, now, replica.foreseen)
        self.arrivals = arrivals = replica.arrivals_view(now)
        if arrivals.known_until_s - now < pace:
            return None  # hardly a step before the next routing decision: not worth planning
        return super().advance(now, pace, next_arrival, in_flight)

    @property
    def lag(self) -> int:
        """Steps in flight when a step is scheduled (1: async scheduling)."""
        return self._lag

    def apply_held(self, held: HeldRun, run: DecodeRun, arrivals: fast_forward.Arrivals) -> Advance:
        """Apply ``run`` (the run ``held``, or its first steps) as ``advance`` would have at
        ``held.now``."""
        self.arrivals = arrivals
        self._take = run
        try:
            adv = fast_forward.Runs.advance(self, held.now, held.pace, held.next_arrival, held.in_flight)
        finally:
            self._take = None
        assert adv is not None and adv.k == run.k
        return adv

    def queue_changes(self, arrivals: fast_forward.Arrivals, next_arrival: int, times: np.ndarray,
                      admissions: list) -> dict[int, int]:
        """How the queue changes over a run's rows (``Runs._waiting_changes``)."""
        self.arrivals = arrivals
        return self._waiting_changes(next_arrival, times, admissions)

    def _plan(self, now: float, base: float, pace: float, next_arrival: int) -> DecodeRun | None:
        if self._take is not None:
            return self._take
        foreseen = self._foreseen_run
        if foreseen is None or foreseen[0] != base or foreseen[1] != self.replica.count:
            return super()._plan(now, base, pace, next_arrival)
        run = foreseen[2]
        # the steps whose outputs all arrive before the next routing decision (as ``plan``)
        ends = np.cumsum(np.concatenate(([base], run.step_times)))
        k = min(run.k, int(np.searchsorted(ends, self.arrivals.known_until_s, side="left")) - 1 + self._lag)
        if k == run.k:
            self._horizon = min(max(2 * k, fast_forward.INITIAL_HORIZON), fast_forward.MAX_HORIZON)
            return run
        run = cut_run(run, k)
        self._horizon = min(max(2 * (run.k if run is not None else 0), fast_forward.INITIAL_HORIZON),
                            fast_forward.MAX_HORIZON)
        return run

    def _plan_ahead(self, now: float, base: float, pace: float, next_arrival: int) -> DecodeRun | None:
        """The run ``advance`` would take now if no more requests came. Changes nothing."""
        arrivals = self.replica.arrivals_view(now)
        horizon = self._horizon
        next_s = min(float(arrivals.time_s[next_arrival]) if next_arrival < len(arrivals.time_s) else math.inf,
                     arrivals.known_until_s)
        if pace > 0 and next_s != math.inf and not self.sched.waiting:  # at least as far as ``Runs._plan``
            reach = (next_s - now) / pace * 1.05 + 8
            horizon = max(horizon, int(min(max(reach, fast_forward.INITIAL_HORIZON // 4), fast_forward.MAX_HORIZON)))
        walks = []
        run = fast_forward.plan(self.sched, self._perf, now, base, replace(arrivals, known_until_s=math.inf),
                                next_arrival, horizon, self._lag, walks)
        self._walk = walks[0] if walks else None
        if self._walk is not None:  # (extended as requests are routed here: ``ReplicaEngine._extend_held``)
            self._walk.tail = HELD_TAIL
        return run

    def finishes(self, run: DecodeRun, base: float, ends: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """A run's finish times (sorted) and its last output's time (``ends``: its step ends from
        ``base``, where already summed)."""
        e = np.cumsum(np.concatenate(([base], run.step_times))) if ends is None else ends
        rows = e[1:] if self._lag == 0 else e[: run.k]
        last = run.last_steps + self._lag
        ends = last <= run.k
        if run.preemptions:  # a victim's last step is no finish
            ends[[p.victim for p in run.preemptions]] = False
        return np.sort(rows[last[ends] - 1]), float(rows[-1])


def every_bs_steps(first: np.ndarray, count: np.ndarray, bs: int, k: int) -> np.ndarray:
    """Per step 1..``k``, how many of ``count[i]`` blocks taken at steps ``first[i]``,
    ``first[i] + bs``, ... fall in it (each within 1..k): one start and one stop per member summed
    every ``bs`` steps, not one entry per block."""
    size = (k // bs + 2) * bs  # (room for the stop after a block in step k)
    some = count > 0
    start = first[some] - 1
    marks = np.bincount(start, minlength=size) - np.bincount(start + count[some] * bs, minlength=size)
    return marks[:size].reshape(-1, bs).cumsum(axis=0).reshape(-1)[:k]


def cut_run(run: DecodeRun, k: int) -> DecodeRun | None:
    """A run of pure decodes and admissions (no preemption) cut to its first ``k`` steps, as
    ``fast_forward._fit_kv`` cuts one: it ends before any admission whose prefill would be its
    last step or later (None: no step left)."""
    admissions = list(run.admissions)
    while admissions and admissions[-1].step >= k:
        k = min(k, admissions.pop().step - 1)
    if k < 1:
        return None
    m = len(run.first_steps) - len(run.admissions) + len(admissions)
    keep = (run.block_steps <= k) & (run.block_owners < m)
    return DecodeRun(k=k, step_times=run.step_times[:k], first_steps=run.first_steps[:m],
                     computed=run.computed[:m], last_steps=run.last_steps[:m], block_steps=run.block_steps[keep],
                     block_owners=run.block_owners[keep], admissions=admissions)
