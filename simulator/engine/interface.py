"""What the engine asks of a scheduler (as vLLM's vllm/v1/core/sched/interface.py).

Every scheduler queues requests, reports its state and may cover many steps in one
``advance()`` call (``Scheduler``). A ``StepScheduler`` can also be asked for one step
at a time: the engine loop calls ``schedule()`` for a step's batch and, once the step
has run, ``update_from_output()`` with the tokens it sampled; where ``advance()`` answers
None the engine takes one step so. The step schedulers: the native model of vLLM's
(simulator.engine.native), the same with lazy steady decoders and runs of steps
(simulator.engine.steady), and vLLM's own (simulator.engine.vllm_oracle). The compiled
scheduler (simulator.engine.compiled) covers every step with ``advance()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from simulator.engine.request import SimRequest
from simulator.records.engine_config import EngineConfig
from simulator.records.performance import StepBatch


@dataclass(slots=True)
class SchedulerOutput:
    """One step's decisions, in the order vLLM makes them."""

    step: int
    num_scheduled: dict[int, int] = field(default_factory=dict)
    spec_tokens: dict[int, int] = field(default_factory=dict)
    #: requests whose draft slots are padding (vLLM pads a resumed one-token decode to the
    #: uniform speculative size); padding drafts are never accepted
    spec_padding: set[int] = field(default_factory=set)
    sampling: set[int] = field(default_factory=set)
    new: list[int] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)
    batch: StepBatch = field(default_factory=StepBatch)
    #: running requests decoding one token in this step without being listed in
    #: num_scheduled (the steady decoders of simulator.engine.steady; 0 otherwise)
    num_steady: int = 0

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled.values()) + self.num_steady

    @property
    def has_work(self) -> bool:
        """Whether the step runs anything."""
        return bool(self.num_scheduled) or self.num_steady > 0


class KVView(Protocol):
    """What the engine and the results read of a scheduler's KV cache."""

    num_blocks: int
    block_size: int
    clock: float
    block_seconds: dict[int, float]
    prefix_queries: int
    prefix_hits: int

    @property
    def num_free_blocks(self) -> int: ...

    @property
    def num_used_blocks(self) -> int: ...

    @property
    def usage(self) -> float: ...


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """A scheduler's state in numbers (vLLM's SchedulerStats, the part the simulator keeps)."""

    num_running: int
    num_waiting: int
    kv_usage: float
    kv_blocks_used: int
    prefix_queries: int
    prefix_hits: int


class Scheduler(ABC):
    """The scheduler interface: a queue of requests, its state, and runs of steps (``advance``)."""

    config: EngineConfig
    kv: KVView
    requests: dict[int, SimRequest]
    step: int

    @abstractmethod
    def add_request(self, request: SimRequest) -> None:
        """Queue a request that just arrived."""

    @abstractmethod
    def has_requests(self) -> bool:
        """Whether any request runs or waits."""

    @property
    @abstractmethod
    def num_running(self) -> int: ...

    @property
    @abstractmethod
    def num_waiting(self) -> int: ...

    @property
    def kv_usage(self) -> float:
        """vLLM's kv_cache_usage: the used share of the usable blocks."""
        return self.kv.usage

    def stats(self) -> SchedulerStats:
        """The counts vLLM's loggers report."""
        kv = self.kv
        return SchedulerStats(self.num_running, self.num_waiting, kv.usage, kv.num_used_blocks,
                              kv.prefix_queries, kv.prefix_hits)

    def advance(self, now: float, pace: float = 0.0, next_arrival: int = 0,
                in_flight: InFlight | None = None) -> Advance | None:
        """Cover many steps at once from ``now`` and return what they did (a
        Advance), or None (the default): the engine then takes one step
        with ``schedule()`` (a scheduler that is not a ``StepScheduler`` answers None only once
        every request has ended). ``pace``: the latest step's time; ``next_arrival``: the first
        arrival not queued yet; ``in_flight``: the step in flight (async scheduling)."""
        return None

    def materialize(self) -> None:
        """Bring every request's state up to date (schedulers that keep some lazily)."""
        return None


class StepScheduler(Scheduler):
    """A scheduler the engine can also ask for one step at a time."""

    @abstractmethod
    def schedule(self) -> SchedulerOutput:
        """Decide the next step's batch."""

    @abstractmethod
    def update_from_output(self, out: SchedulerOutput, sampled: dict[int, int], now: float) -> list[SimRequest]:
        """Apply a finished step (``sampled[rid]`` tokens per sampling request) at time ``now``;
        return the requests that finished."""

    @abstractmethod
    def finish_requests(self, rids: Iterable[int], now: float) -> list[SimRequest]:
        """Finish requests from outside (an abort): their blocks are freed; return them."""


@dataclass(slots=True)
class InFlight:
    """A step scheduled and not yet applied (async scheduling): its decisions, start and end."""

    out: SchedulerOutput
    start_s: float
    end_s: float


@dataclass
class Advance:
    """What one ``Runs.advance`` covered: ``k`` steps, for the engine's clock and step log."""

    k: int
    end_s: float  # when the last output the run applies arrives (the clock then)
    starts: np.ndarray  # each row's step start
    token_times: np.ndarray  # when each row's output arrives
    kv_blocks_used: np.ndarray  # after each row's output
    #: from row 0 on, each row where one of these changes: (row, requests in its step,
    #: requests running after its output, prompt tokens prefilled in its step, requests prefilling)
    segments: list[tuple[int, int, int, int, int]]
    finished: list[int]  # the ids of the requests that finished inside the run
    waiting: int  # the queue's length at the first row
    waiting_changes: dict[int, int]  # row -> change of the queue's length
    #: row -> preemptions of its step (row 0: those of the step the run started from)
    preempted: dict[int, int]
    #: async: start and end of the step the run leaves in flight, a decode step of the running
    #: requests (``NativeScheduler.decode_step`` once the run's arrivals have come)
    in_flight_s: tuple[float, float] | None
    #: async: the requests the step left in flight preempted
    in_flight_preempted: list[int]
    next_arrival: int  # the first arrival neither queued nor admitted by the run
    last_step_s: float  # the time of the run's last step
    #: async: the step left in flight also admits from the queue (``decode_step(admit=True)``)
    admits: bool = False
    #: the rows as whole step-log columns (``StepLog.add_columns``: end and duration; the counts),
    #: from a scheduler that logs every step itself; ``segments`` and the changes are then unused
    columns: tuple[np.ndarray, np.ndarray] | None = None
