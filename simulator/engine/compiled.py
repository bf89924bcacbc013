"""The compiled scheduler: one replica's step-by-step path run in machine code, behind the
scheduler interface.

``simulator.engine.compiled_kernel`` is the step-by-step engine (the engine loop, the native
scheduler, the paged KV cache with its prefix cache, client timeouts, the composed performance
model's step time) written over arrays and compiled with numba. ``CompiledScheduler`` is that
kernel as a ``Scheduler``: the engine drives it with ``advance`` alone, run after run, as it drives
the fast path's runs, and gets the same records, bit for bit, as the step-by-step path gives
(tests/simulator/engine/test_compiled.py). With ``routed`` it is a cluster's replica, its
requests added as the router sends them and its clock held before each routing decision
(simulator.cluster.compiled_cluster). This module also decides where it applies
(``why_not``: one replica with the native scheduler, no speculative decoding, no sliding-window
layers, a performance model that gives its step time as tables,
``PerformanceModel.step_time_tables``, and numba installed) and where it pays (``wanted``).
Elsewhere the engine takes its Python paths.
"""

from __future__ import annotations

import bisect
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from simulator.engine.interface import Advance, InFlight, Scheduler
from simulator.engine.kv_cache import TICKS_PER_S
from simulator.engine.native import NativeScheduler
from simulator.engine.request import SimRequest, Status
from simulator.engine.rules import admission_error
from simulator.engine.run_log import StepLog
from simulator.records.engine_config import EngineConfig
from simulator.records.performance import KVCapacity, PerformanceModel
from simulator.records.workload import Workload

if TYPE_CHECKING:
    from simulator.engine.loop import Engine

#: block-table slots and request rows a cluster's replica starts with (grown as requests are
#: routed to it)
ROUTED_ROOM = 1 << 16
ROUTED_ROWS = 1 << 10
#: steps the kernel logs between two returns to Python (progress, Ctrl-C, the log's chunks)
LOG_CHUNK = 1 << 16
_STATUS = {-1: Status.WAITING, 0: Status.WAITING, 1: Status.RUNNING, 2: Status.PREEMPTED, 3: Status.FINISHED,
           4: Status.REJECTED, 5: Status.ABORTED}


def available() -> bool:
    """Whether numba is installed (the compiled engine's one extra dependency; not imported here:
    a run that does not take the compiled engine does not load it)."""
    return importlib.util.find_spec("numba") is not None


def why_not(engine: Engine, factory: Callable[..., object]) -> str:
    """Why ``engine``'s run, whose scheduler ``factory`` would make otherwise, cannot take the
    compiled scheduler ('' if it can)."""
    if engine.decisions is not None:
        return "its decisions are kept step by step"
    if not (isinstance(factory, type) and issubclass(factory, NativeScheduler)):
        return f"scheduler {engine.config.scheduler!r}"
    return unsupported(engine.config, engine.perf, engine.kv_capacity)


def unsupported(config: EngineConfig, perf: PerformanceModel, kv: KVCapacity) -> str:
    """What in an engine's settings, model or KV layout the kernel does not cover ('' if nothing),
    or "numba is not installed"."""
    if config.speculative.enabled:
        return "speculative decoding"
    if getattr(perf, "shape_cache", None) is not None:
        return "the engine's per-shape set-up cost (a CPU profile)"
    groups = getattr(kv, "groups", None)
    if groups is not None and groups.hybrid:
        return "sliding-window KV groups"
    if perf.step_time_tables() is None:
        return f"performance model {perf.name} gives no step-time tables"
    if not available():
        return "numba is not installed"
    return ""


#: "auto" compiles runs of at least this many requests (fewer: the fast path is done within about a
#: second, before numba and the compiled code would have loaded, ~0.6 s, let alone compiled the
#: first time on a machine, ~15-25 s)
AUTO_MIN_REQUESTS = 2000
#: ... whose offered decode load is at least this share of the replica's decode capacity (lighter:
#: a few requests decoding at a time, long steady runs of steps, which the fast path covers in
#: closed form, quicker; on 1,000 reasoning requests the fast path wins at a load of 0.04, the
#: compiled engine at 0.46: docs/benchmarks.md)
AUTO_MIN_LOAD = 0.15


def offered_load(w: Workload, config: EngineConfig, kv: KVCapacity, perf: PerformanceModel,
                 replicas: int = 1) -> float:
    """The workload's output tokens per second (its mean arrival rate times its mean output) over
    what ``replicas`` replicas decode per second with their KV caches full of average requests (as
    many as fit at their mean context, within max_num_seqs, one decode step of them): above 1, a
    queue grows and every step has events (admissions, preemptions); well below, steps are steady."""
    from simulator.records.performance import StepBatch

    n = len(w)
    span = float(w.arrival_s[-1] - w.arrival_s[0]) if n else 0.0
    if n < 2 or span <= 0:
        return math.inf
    output = float(np.mean(w.output_tokens))
    context = max(float(np.mean(w.prompt_tokens)) + output / 2, 1.0)
    seats = int(min(config.max_num_seqs, max((kv.num_blocks - 1) * kv.block_size // context, 1)))
    counts = dict(getattr(perf, "extrapolations", None) or {})  # (an estimate, not a step: not counted)
    step_s = perf.step_time(StepBatch(decode_context=[int(context)] * seats, decode_spec_tokens=[0] * seats))
    if counts:
        perf.extrapolations.update(counts)
    return (n - 1) / span * output / (replicas * seats / step_s)


def wanted(engine: Engine, compiled: bool | str) -> bool:
    """Whether ``compiled`` ("auto", True or False) asks for the compiled engine on this run:
    "auto" where it pays (``AUTO_MIN_REQUESTS``, ``AUTO_MIN_LOAD``) on the fast path. Whether it
    applies is ``why_not``'s to say."""
    if compiled == "auto":
        return (engine.fast_requested and len(engine.workload) >= AUTO_MIN_REQUESTS
                and offered_load(engine.workload, engine.config, engine.kv_capacity, engine.perf) >= AUTO_MIN_LOAD)
    return bool(compiled)


def cold() -> bool:
    """Whether numba would compile the engine now, finding no cache of it on this machine (False
    where that cannot be told)."""
    from simulator.engine import compiled_kernel as k

    try:
        return not k.advance._cache._cache_file._load_index()  # (numba's cache index for this source)
    except Exception:  # noqa: BLE001  (numba's private layout: then say nothing)
        return False


def say_if_cold() -> None:
    """A line above the progress bar when numba is about to compile the engine (``cold``)."""
    if cold():
        from tqdm import tqdm

        tqdm.write("[simulator] compiling the engine: the first such run on this machine, about 25 s "
                   "(cached for the next ones)", file=sys.stderr)


def _grid(table) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([table.res, table.nx, table.ny, table.x_top, table.y_top, table.x_power, table.y_power,
                      table.width], dtype=np.float64), np.ascontiguousarray(table.log, dtype=np.float64))


@dataclass(frozen=True)
class RequestRows:
    """A workload's requests as the kernel's rows (``ri``, ``rf``) and where their names and block
    tables go: the shared prefixes' names first (``shared_slots``), then each request's block table
    and private names, one after the other, up to ``total``."""

    ri: np.ndarray
    rf: np.ndarray
    total: int
    shared_slots: int

    @classmethod
    def of(cls, w: Workload, config: EngineConfig, kv: KVCapacity) -> RequestRows:
        from simulator.engine import compiled_kernel as k

        n, bs = len(w), config.block_size
        prompt = np.asarray(w.prompt_tokens, dtype=np.int64)
        max_tokens = np.asarray(w.output_tokens, dtype=np.int64)
        # (rules.admission_error, asked only of the requests some limit could refuse)
        limit = min(config.max_model_len, (kv.num_blocks - 1) * kv.block_size)
        refused = [rid for rid in np.flatnonzero(prompt + max_tokens > limit).tolist()
                   if admission_error(int(prompt[rid]), int(max_tokens[rid]), config, kv)]
        ri = np.zeros((n, k.NRI), dtype=np.int64)
        ri[:, k.PROMPT], ri[:, k.MAXTOK] = prompt, max_tokens
        ri[:, k.REASON] = np.asarray(w.reasoning_tokens, dtype=np.int64)
        ri[:, k.STATUS] = k.NOT_ARRIVED
        ri[:, k.CACHEDTOK] = -1
        ri[:, k.TBASE] = -1
        ri[refused, k.REJECTED] = 1
        # a request's block table and cached names: room for its whole sequence (a step in flight
        # may hold one slot past it) and one block more
        cap = -(-np.minimum(prompt + max_tokens + 2, config.max_model_len) // bs) + 1
        ri[:, k.CAP] = cap
        shared_slots = _shared_names(w, bs, ri, 0)
        ri[:, k.OFF] = shared_slots + (np.concatenate(([0], np.cumsum(cap)[:-1])) if n else cap)
        total = shared_slots + int(cap.sum())
        rf = np.full((n, k.NRF), -1.0)
        rf[:, k.ARRIVAL] = np.asarray(w.arrival_s, dtype=np.float64)
        return cls(ri, rf, total, shared_slots)


class KernelKV:
    """The compiled scheduler's KV cache as the engine and the results read it (``KVView``)."""

    def __init__(self, S: np.ndarray, num_blocks: int, block_size: int) -> None:
        from simulator.engine import compiled_kernel

        self._k = compiled_kernel
        self._S = S
        self.num_blocks, self.block_size = num_blocks, block_size
        self.clock = 0.0  # (the kernel keeps its own clock)
        #: block-seconds per request, once the run is over (``CompiledScheduler.materialize``)
        self.block_seconds: dict[int, float] = {}

    @property
    def prefix_queries(self) -> int:
        k = self._k
        return int(self._S[k.PQUERIES])

    @property
    def prefix_hits(self) -> int:
        k = self._k
        return int(self._S[k.PHITS])

    @property
    def num_free_blocks(self) -> int:
        k = self._k
        return int(self._S[k.QLEN])

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - self.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / (self.num_blocks - 1)


class CompiledScheduler(Scheduler):
    """The native scheduler, its engine loop and its step time, compiled (``compiled_kernel``):
    ``advance`` covers every step, in runs that end when the kernel's step log is full, when
    another ``finish_every`` requests have finished (progress, a stop between steps) or when every
    request has ended (None then). Like the fast path's runs it takes the arrivals from the
    workload's columns itself, keeps its step in flight (async scheduling) to itself, and hands the
    engine what it did: the steps as whole log columns (``Advance.columns``), the requests it
    finished, the first arrival it has not taken in. The engine makes a request's record when its
    arrival has been taken in (``add_request``); ``materialize`` writes the kernel's state into
    them. It is not a ``StepScheduler``: the engine never asks it for a single step. (An Advance's columns
    are the kernel's log buffer: valid until the next call.)"""

    def __init__(self, config: EngineConfig, kv: KVCapacity, workload: Workload, perf: PerformanceModel,
                 *, async_scheduling: bool, finish_every: int = 0, rows: RequestRows | None = None,
                 routed: bool = False) -> None:
        """``rows``: the workload's rows (``RequestRows.of``; made here if None); ``routed``: the
        requests come one by one as a cluster's router sends them (``arrive``, ``close``), each
        before the engine's events of its arrival time (no client timeouts)."""
        from simulator.engine import compiled_kernel as k

        self._k = k
        self.config, self.perf, self.step = config, perf, 0
        self.requests: dict[int, SimRequest] = {}
        tables = perf.step_time_tables()
        rows = rows if rows is not None else RequestRows.of(workload, config, kv)
        n, bs, total = len(rows.ri), config.block_size, rows.total
        #: (routed) the template's rows arrive one by one (``arrive``), else all are known
        self.routed = routed
        if routed:  # (rows and block tables grown as requests come: ``arrive``)
            n = min(n, ROUTED_ROWS)
            ri = np.zeros((n, k.NRI), dtype=np.int64)
            ri[:, k.STATUS] = k.NOT_ARRIVED
            rf = np.full((n, k.NRF), -1.0)
            self._template, self._next_off = rows, rows.shared_slots
            total = rows.shared_slots + ROUTED_ROOM
            #: (routed) the template's row of each request here, by local id
            self.row_of = np.zeros(n, dtype=np.int64)
            #: (routed) the arrival times of the requests rejected here, in order
            self.rejected_s: list[float] = []
        else:
            ri, rf = rows.ri.copy(), rows.rf.copy()
        nb = kv.num_blocks
        bk = np.zeros((nb, k.NBK), dtype=np.int64)
        bk[:, k.OWNER] = -1
        bk[:, k.CPREV] = bk[:, k.CNEXT] = -1
        S = np.zeros(k.NS, dtype=np.int64)
        F = np.zeros(k.NF)
        # the free queue: blocks 1.. in order (block 0 is vLLM's null block)
        if nb > 1:
            order = np.arange(1, nb)
            bk[1:, k.QPREV] = order - 1
            bk[1:, k.QNEXT] = order + 1
            bk[1, k.QPREV] = -1
            bk[nb - 1, k.QNEXT] = -1
            bk[1:, k.INQ] = 1
            S[k.QHEAD], S[k.QTAIL], S[k.QLEN] = 1, nb - 1, nb - 1
        else:
            S[k.QHEAD] = S[k.QTAIL] = -1
        S[k.NUM_BLOCKS], S[k.BLOCK_SIZE], S[k.MAX_LEN] = nb, bs, config.max_model_len
        S[k.MAX_SEQS], S[k.BUDGET] = config.max_num_seqs, config.max_num_batched_tokens
        S[k.THRESHOLD] = config.long_prefill_token_threshold
        S[k.CHUNKED] = int(config.enable_chunked_prefill)
        S[k.CACHING] = int(config.enable_prefix_caching)
        S[k.ASYNC] = int(async_scheduling)
        S[k.ASEQ] = -1
        S[k.KNOWN] = 0 if routed else n
        S[k.OPEN] = S[k.URGENT] = int(routed)
        F[k.UNTIL] = math.inf
        self._finish_every = finish_every if finish_every > 0 else len(rows.ri) + 1
        S[k.TARGET] = self._finish_every
        seats = max(config.max_num_seqs, 1)
        self._arrays = dict(
            S=S, F=F, ri=ri, rf=rf, bk=bk, bt=np.zeros(total, dtype=np.int32),
            chead=np.full(total if config.enable_prefix_caching else 0, -1, dtype=np.int32),
            running=np.zeros(max(n, 1), dtype=np.int64), waiting=np.zeros(max(n, 1), dtype=np.int64),
            hits=np.zeros(int(rows.ri[:, k.CAP].max()) if n else 1, dtype=np.int64),
            skipped=np.zeros(max(n, 1), dtype=np.int64),
            fl_rid=np.zeros((2, seats), dtype=np.int64), fl_n=np.zeros((2, seats), dtype=np.int64),
            fl_i=np.zeros((2, k.NFLI), dtype=np.int64), fl_f=np.zeros((2, 2)),
            lg_f=np.zeros((LOG_CHUNK, 2)), lg_i=np.zeros((LOG_CHUNK, 7), dtype=np.int64),
            **(_deadlines(workload, rows.rf[:, k.ARRIVAL], rows.ri[:, k.REJECTED]) if not routed
               else {"dl_t": np.zeros(0), "dl_rid": np.zeros(0, dtype=np.int64)}))
        gc, lc = _grid(tables.context)
        gg, lg = _grid(tables.generation)
        self._model = (np.array([tables.overhead_s, tables.dense_slope, tables.max_tokens, tables.head_slope,
                                 tables.max_rows, tables.kv_read_s_per_token]),
                       np.ascontiguousarray(tables.dense, dtype=np.float64),
                       np.ascontiguousarray(tables.head, dtype=np.float64), gc, lc, gg, lg,
                       np.asarray(tables.limits, dtype=np.float64))
        self._S, self._F, self._ri, self._rf = S, F, ri, rf
        self._flushed_kv = 0  # KV blocks used after the last step flushed (``flush``)
        self._ended = np.zeros(n, dtype=bool)  # finished or aborted, as the engine has been told
        self.kv = KernelKV(S, nb, bs)
        if routed:
            pass
        elif n:
            k._arrivals_from(S, F, ri, rf, self._arrays["waiting"], 0)  # (the arrivals process starts first)
        else:
            S[k.DONE] = 1

    # --- the scheduler interface -------------------------------------------------------------
    def add_request(self, request: SimRequest) -> None:
        """The engine's record of a request whose arrival a run has taken in."""
        self.requests[request.rid] = request

    def has_requests(self) -> bool:
        """Whether any request runs, waits or is still to arrive (it takes its arrivals itself)."""
        k = self._k
        return self._S[k.ENDED] == 0

    @property
    def num_running(self) -> int:
        k = self._k
        return int(self._S[k.NRUN])

    @property
    def num_waiting(self) -> int:
        k = self._k
        return int(self._S[k.WLEN])

    def advance(self, now: float, pace: float = 0.0, next_arrival: int = 0,
                in_flight: InFlight | None = None) -> Advance | None:
        """Run the compiled engine loop from where it stopped (its clock is ``now``) to the next
        pause; None once every request has ended."""
        k = self._k
        S, F = self._S, self._F
        if S[k.ENDED] == 1:
            return None
        S[k.TARGET] = S[k.NFINISHED] + self._finish_every
        waiting = int(S[k.WLEN])
        self._call()
        rows = int(S[k.NLOG])
        S[k.NLOG] = 0
        times, counts = self._arrays["lg_f"][:rows], self._arrays["lg_i"][:rows]
        self.step += rows
        arrived = int(S[k.ARRIVED])
        status = self._ri[:arrived, k.STATUS]
        ended = (status == k.FINISHED) | (status == k.ABORTED)
        finished = np.flatnonzero(ended & ~self._ended[:arrived]).tolist()
        self._ended[:arrived] = ended
        ends = times[:, 0]
        return Advance(k=rows, end_s=float(F[k.NOW]), starts=ends - times[:, 1], token_times=ends,
                       kv_blocks_used=counts[:, k.LG_KV], segments=[], finished=finished, waiting=waiting,
                       waiting_changes={}, preempted={}, in_flight_s=None, in_flight_preempted=[],
                       next_arrival=arrived, last_step_s=float(times[-1, 1]) if rows else pace,
                       columns=(times, counts))

    # --- a cluster's replica (``routed``) ------------------------------------------------------
    def arrive(self, row: int) -> int:
        """The template's request ``row`` comes here, at its arrival time (not before the times of
        those come before it, nor before the clock's horizon, ``run_until``); its local id."""
        k = self._k
        S, F, t = self._S, self._F, self._template
        j = int(S[k.KNOWN])
        if j == len(self._ri):
            self._grow_rows(2 * j)
        self._ri[j] = t.ri[row]
        self._ri[j, k.OFF] = self._next_off
        self._next_off += int(t.ri[row, k.CAP])
        if self._next_off > len(self._arrays["bt"]):  # (room for its block table and names)
            self._grow(max(self._next_off, 2 * len(self._arrays["bt"])))
        self._rf[j] = t.rf[row]
        self.row_of[j] = row
        if t.ri[row, k.REJECTED]:
            self.rejected_s.append(float(t.rf[row, k.ARRIVAL]))
        S[k.KNOWN] = j + 1
        if S[k.ASEQ] < 0 and S[k.NEXT] == j:  # (the next arrival the engine waits for)
            F[k.ATIME] = t.rf[row, k.ARRIVAL]
            S[k.ASEQ] = S[k.SEQ]
            S[k.SEQ] += 1
        return j

    def _grow_rows(self, size: int) -> None:
        """Rows for ``size`` requests (the ones so far kept): theirs and the queues'."""
        k, arrays = self._k, self._arrays
        old = len(self._ri)
        for name, fill in (("ri", 0), ("rf", -1.0), ("running", 0), ("skipped", 0)):
            array = arrays[name]
            grown = np.full((size, *array.shape[1:]), fill, dtype=array.dtype)
            grown[:old] = array
            arrays[name] = grown
        S, waiting = self._S, arrays["waiting"]  # (a ring: unrolled from its head)
        queue = np.zeros(size, dtype=waiting.dtype)
        queue[: S[k.WLEN]] = waiting[(S[k.WHEAD] + np.arange(S[k.WLEN])) % len(waiting)]
        arrays["waiting"], S[k.WHEAD] = queue, 0
        arrays["ri"][old:, k.STATUS] = k.NOT_ARRIVED
        self._ri, self._rf = arrays["ri"], arrays["rf"]
        self.row_of = np.concatenate((self.row_of, np.zeros(size - old, dtype=np.int64)))
        self._ended = np.concatenate((self._ended, np.zeros(size - old, dtype=bool)))

    def _grow(self, size: int) -> None:
        """Block tables and names for ``size`` slots (the ones so far kept)."""
        arrays = self._arrays
        bt = np.zeros(size, dtype=np.int32)
        bt[: len(arrays["bt"])] = arrays["bt"]
        arrays["bt"] = bt
        if len(arrays["chead"]):
            chead = np.full(size, -1, dtype=np.int32)
            chead[: len(arrays["chead"])] = arrays["chead"]
            arrays["chead"] = chead

    def close(self) -> None:
        """No more requests come: the engine runs to its end."""
        k = self._k
        S = self._S
        S[k.OPEN] = 0
        if S[k.ASEQ] < 0:
            S[k.DONE] = 1
        self._F[k.UNTIL] = math.inf

    def until(self, t: float) -> None:
        """Nothing may happen at or after ``t`` until asked again (a cluster's next decision)."""
        k = self._k
        self._F[k.UNTIL] = t

    def run_routed(self, log: StepLog, go_on: Callable[[], bool] | None = None) -> None:
        """(routed) Run up to the horizon (``until``), or, once closed, to the end. The steps go to
        ``log`` a buffer at a time (when the kernel's is full, and at the end: ``flush``), not at
        every horizon: a cluster stops its replicas at every decision. At each pause on the way
        (the buffer full, ``finish_every`` more requests ended) ``go_on()`` may say to stop there."""
        k, S = self._k, self._S
        while True:
            code = self._call()
            if code == k.PAUSED:
                self.flush(log)
                S[k.TARGET] = S[k.NFINISHED] + self._finish_every
                if go_on is not None and not go_on():
                    return
                continue
            if code == k.DONE_CODE:
                self.flush(log)
            return

    def _call(self) -> int:
        """One call of the kernel's loop; what it returned (an error raised: a stall, an overflow)."""
        k, S, F = self._k, self._S, self._F
        code = k.advance(*self._arrays.values(), *self._model)
        if code == k.STALLED:
            raise RuntimeError(f"scheduler stalled at t={F[k.NOW]:.3f}s: running={S[k.NRUN]} "
                               f"waiting={S[k.WLEN]} free_blocks={S[k.QLEN]}")
        if code == k.OVERFLOW:
            raise RuntimeError("a request's block table outgrew its room in the compiled engine")
        return code

    def flush(self, log: StepLog) -> None:
        """The steps logged in the kernel's buffer, appended to ``log``."""
        k, S = self._k, self._S
        rows = int(S[k.NLOG])
        if rows:
            log.add_columns(self._arrays["lg_f"][:rows], self._arrays["lg_i"][:rows])
            self._flushed_kv = int(self._arrays["lg_i"][rows - 1, k.LG_KV])
            self.step += rows
            S[k.NLOG] = 0

    @property
    def last_kv_blocks(self) -> int:
        """KV blocks used after the last step applied (0 before any)."""
        k, S = self._k, self._S
        rows = int(S[k.NLOG])
        return int(self._arrays["lg_i"][rows - 1, k.LG_KV]) if rows else self._flushed_kv

    def finished_before(self, t: float) -> int:
        """Requests ended here before ``t``, once ``run_routed`` has stopped at the horizon ``t``:
        those the engine completed (every step ending before ``t`` has been applied, none after)
        and those rejected at an arrival before ``t``."""
        k = self._k
        S = self._S
        return int(S[k.NFINISHED] - S[k.NREJ]) + bisect.bisect_left(self.rejected_s, t)

    @property
    def num_arrived(self) -> int:
        """Arrivals taken in so far (queued or rejected)."""
        k = self._k
        return int(self._S[k.ARRIVED])

    @property
    def num_ended(self) -> int:
        """Requests ended so far: completed, aborted or rejected."""
        k = self._k
        return int(self._S[k.NFINISHED])

    @property
    def clock(self) -> float:
        k = self._k
        return float(self._F[k.NOW])

    def materialize(self) -> None:
        """Write the kernel's state into the engine's request records, the KV cache's
        block-seconds and the performance model's extrapolation counts."""
        k = self._k
        S, ri, rf = self._S, self._ri, self._rf
        self.perf.counted(dict(zip(("tokens", "prefill_kv_heads", "prefill_batch", "prefill_length",
                                    "decode_kv_heads", "decode_batch", "decode_context"),
                                   S[k.X_TOKENS : k.X_DCTX + 1].tolist(), strict=True)))
        S[k.X_TOKENS : k.X_DCTX + 1] = 0  # (counted once)
        rids = sorted(self.requests)
        ints, floats = ri[rids].tolist(), rf[rids].tolist()
        for rid, i, f in zip(rids, ints, floats, strict=True):
            req = self.requests[rid]
            req.status = _STATUS[i[k.STATUS]]
            req.num_output, req.num_computed, req.num_preemptions = i[k.NOUT], i[k.NCOMP], i[k.NPRE]
            req.num_cached_tokens = i[k.CACHEDTOK]
            req.first_scheduled_s, req.first_token_s = f[k.FSCHED], f[k.FTOKEN]
            req.first_visible_s, req.last_token_s, req.finish_s = f[k.FVISIBLE], f[k.LTOKEN], f[k.FINISH]
        ticks = ri[:, k.BTICKS].tolist()
        self.kv.block_seconds = {rid: ticks[rid] / TICKS_PER_S for rid in np.flatnonzero(ri[:, k.HASTICKS]).tolist()}


def _shared_names(w, bs: int, ri: np.ndarray, first: int) -> int:
    """Each request's shared prefix blocks (SimRequest.num_shared_blocks, num_outer_blocks) and
    where their names' copies are listed: one stretch per prefix group, from ``first`` on, as long
    as its longest shared prefix; returns the stretches' length in all."""
    from simulator.engine import compiled_kernel as k

    group = np.asarray(w.prefix_group, dtype=np.int64)
    tokens = np.where(group >= 0, np.asarray(w.prefix_tokens, dtype=np.int64), 0)
    outer = np.where(group >= 0, np.asarray(w.outer_group, dtype=np.int64), -1)
    shared = tokens // bs
    outer_blocks = np.where(outer >= 0, np.minimum(np.asarray(w.outer_tokens, dtype=np.int64), tokens) // bs, 0)
    ri[:, k.NSHARED], ri[:, k.NOUTER] = shared, outer_blocks
    own, inner = group[shared > 0], outer[outer_blocks > 0]
    if not len(own) and not len(inner):
        return 0
    names = np.unique(np.concatenate((own, inner)))
    longest = np.zeros(len(names), dtype=np.int64)
    np.maximum.at(longest, np.searchsorted(names, own), shared[shared > 0])
    np.maximum.at(longest, np.searchsorted(names, inner), outer_blocks[outer_blocks > 0])
    starts = first + np.concatenate(([0], np.cumsum(longest)[:-1]))
    ri[shared > 0, k.SBASE_PRE] = starts[np.searchsorted(names, own)]
    ri[outer_blocks > 0, k.SBASE_OUT] = starts[np.searchsorted(names, inner)]
    return int(longest.sum())


def _deadlines(w, arrival: np.ndarray, rejected: np.ndarray) -> dict[str, np.ndarray]:
    """When each client gives up (arrival + workload.timeout_s; requests rejected at arrival and
    those without a timeout left out), in the order the engine aborts them: deadline, then id."""
    deadline = np.array([a + t for a, t in zip(arrival.tolist(), np.asarray(w.timeout_s, dtype=float).tolist(),
                                               strict=True)]) if len(arrival) else np.zeros(0)
    keep = np.flatnonzero(np.isfinite(deadline) & (rejected == 0))
    order = keep[np.lexsort((keep, deadline[keep]))]
    return {"dl_t": deadline[order], "dl_rid": order.astype(np.int64)}
