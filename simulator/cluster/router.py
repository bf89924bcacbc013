"""Routers: which replica gets a request, from what a real router can see.

A router sees, per replica, its report (``ReplicaReport``): the requests it has
outstanding and its KV usage, as of the last report (``cluster.staleness_s``),
and it keeps what it sent itself (the prefix-affinity router remembers which
prefixes went where, as llm-d's approximate prefix scorer and vLLM's production
stack do). Routers register by name (``@register``); ``make_router`` builds one
from its name.
"""

from __future__ import annotations

import heapq
import math
import random
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from simulator.records.errors import ConfigError

#: name -> router class (see ``register``)
ROUTERS: dict[str, type[Router]] = {}


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    """One replica as the router sees it.

    ``outstanding``: requests the router sent it and not finished by the report (the router
    counts its own sends at once); ``kv_usage``: the used share of its KV cache after its
    last step before the report.
    """

    index: int
    outstanding: int
    kv_usage: float


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What the router knows of a request: its id, arrival, prompt and shared prefix."""

    rid: int
    arrival_s: float
    prompt_tokens: int
    prefix_group: int
    prefix_tokens: int


class Outlook(Protocol):
    """What the cluster knows, before routing them, of the next arrivals and of the reports the
    router will read for them (``Router.first_may_get``), for one replica: arrival ``k`` (0: the
    next not routed yet) of ``len`` looked through."""

    def __len__(self) -> int: ...

    def request(self, k: int) -> RouteRequest:
        """Arrival ``k``."""

    def own(self, k: int) -> int | None:
        """The replica's outstanding count in its report for arrival ``k`` if no arrival before
        ``k`` goes to it (None: not known)."""

    def others(self) -> list[tuple[int, int]]:
        """(an upper bound on the outstanding count in its report for arrival 0, index) for each
        other replica (requests sent and not finished, reported or foreseen: finishes only lower
        it)."""


class Router(ABC):
    """Chooses a replica for each request, in arrival order."""

    name: ClassVar[str]
    #: False: the choice depends on nothing but the order of requests (the cluster may route
    #: every request up front, so the replicas' fast path sees their arrivals ahead)
    needs_reports: ClassVar[bool] = True
    #: False: the choice reads no KV usage, only outstanding requests (which change only when a
    #: request finishes, so the cluster can often decide ahead)
    needs_kv: ClassVar[bool] = False

    def __init__(self, num_replicas: int, seed: int = 0, load_cap: int = 16):
        self.num_replicas = num_replicas
        self.seed = seed
        self.load_cap = load_cap

    @abstractmethod
    def choose(self, request: RouteRequest, reports: Sequence[ReplicaReport]) -> int:
        """The replica for ``request`` (``reports[i]`` is replica i's report)."""

    def sent(self, request: RouteRequest, replica: int) -> None:  # noqa: B027  (a hook: most need nothing)
        """The request went to ``replica``."""

    def first_may_get(self, replica: int, outlook: Outlook) -> int:
        """The first of the arrivals ``outlook`` looks through that may go to ``replica``, given
        what is known of the reports for them (``len(outlook)``: none of them): none before it
        does, whatever the reports turn out to be. The cluster lets the replica's runs go past
        the arrivals before it. Changes nothing. The default, 0 (the next arrival may), makes its
        runs stop at every arrival; a router whose choice rules replicas out ahead implements it."""
        return 0


def report_time(t: float, staleness_s: float) -> float:
    """When the reports a decision at ``t`` sees were made (every ``staleness_s``; 0: at ``t``)."""
    return min(math.floor(t / staleness_s) * staleness_s, t) if staleness_s > 0 else t


def register(cls: type[Router]) -> type[Router]:
    """Class decorator: make a router available under its ``name``."""
    ROUTERS[cls.name] = cls
    return cls


def make_router(name: str, num_replicas: int, seed: int = 0, load_cap: int = 16,
                field: str = "cluster.router") -> Router:
    """The router named ``name``; ConfigError naming ``field`` if there is none."""
    cls = ROUTERS.get(name)
    if cls is None:
        raise ConfigError(field, f"unknown router {name!r}; allowed: {', '.join(ROUTERS)}")
    return cls(num_replicas, seed=seed, load_cap=load_cap)


def _least_loaded(reports: Sequence[ReplicaReport]) -> int:
    return min(reports, key=lambda r: (r.outstanding, r.index)).index


def _first_least_loaded(replica: int, outlook: Outlook, shared_prefix_stops: bool = False) -> int:
    """``first_may_get`` for the least loaded choice (ties: the lowest index): ``replica`` gets
    no arrival while another has fewer outstanding for certain. Each other replica has at most
    its bound (``outlook.others``); an arrival ``replica`` does not get goes to the fewest of the
    others, so the others' bounds, sorted, rise as water filling the lowest (the sorted counts
    stay at most their sorted bounds). The least bound, one more for each arrival since (it may
    have got each), keeps the ties' order (the lower index wins a tie). ``shared_prefix_stops``:
    the look through ends at an arrival with a shared prefix (prefix_affinity's)."""
    bounds: list[int] | None = None
    for k in range(len(outlook)):
        if shared_prefix_stops:
            request = outlook.request(k)
            if request.prefix_group >= 0 and request.prefix_tokens > 0:
                return k
        mine = outlook.own(k)
        if mine is None:
            return k
        if bounds is None:
            others = outlook.others()
            if not others:
                return k
            least = min(others)
            bounds = [count for count, _ in others]
            heapq.heapify(bounds)
        if bounds[0] >= mine and (least[0] + k, least[1]) >= (mine, replica):
            return k
        heapq.heapreplace(bounds, bounds[0] + 1)
    return len(outlook)


@register
class RoundRobin(Router):
    """Request i goes to replica i mod N."""

    name = "round_robin"
    needs_reports = False

    def __init__(self, num_replicas: int, seed: int = 0, load_cap: int = 16):
        super().__init__(num_replicas, seed, load_cap)
        self._next = 0

    def choose(self, request: RouteRequest, reports: Sequence[ReplicaReport]) -> int:
        replica = self._next
        self._next = (self._next + 1) % self.num_replicas
        return replica


@register
class LeastOutstanding(Router):
    """The replica with the fewest outstanding requests (ties: the lowest index)."""

    name = "least_outstanding"

    def choose(self, request: RouteRequest, reports: Sequence[ReplicaReport]) -> int:
        return _least_loaded(reports)

    def first_may_get(self, replica: int, outlook: Outlook) -> int:
        return _first_least_loaded(replica, outlook)


@register
class LeastKV(Router):
    """The replica with the lowest reported KV usage (ties: fewer outstanding, lowest index)."""

    name = "least_kv"
    needs_kv = True

    def choose(self, request: RouteRequest, reports: Sequence[ReplicaReport]) -> int:
        return min(reports, key=lambda r: (r.kv_usage, r.outstanding, r.index)).index


@register
class PrefixAffinity(Router):
    """The replica holding the longest cached prefix of the request, among those within
    ``load_cap`` outstanding requests of the least loaded (ties and no prefix: the least
    loaded). What each replica holds is what this router sent it (no eviction seen)."""

    name = "prefix_affinity"

    def __init__(self, num_replicas: int, seed: int = 0, load_cap: int = 16):
        super().__init__(num_replicas, seed, load_cap)
        self._held: dict[tuple[int, int], int] = {}  # (replica, group) -> prefix tokens sent there

    def choose(self, request: RouteRequest, reports: Sequence[ReplicaReport]) -> int:
        least = min(r.outstanding for r in reports)
        eligible = [r for r in reports if r.outstanding <= least + self.load_cap]
        group = request.prefix_group
        if group < 0 or request.prefix_tokens <= 0:
            return _least_loaded(eligible)

        def match(r: ReplicaReport) -> int:
            return min(request.prefix_tokens, self._held.get((r.index, group), 0))

        return min(eligible, key=lambda r: (-match(r), r.outstanding, r.index)).index

    def first_may_get(self, replica: int, outlook: Outlook) -> int:
        """A request without a shared prefix goes as least_outstanding sends it (the least loaded
        replica is always eligible); the look through ends at one with a prefix."""
        return _first_least_loaded(replica, outlook, shared_prefix_stops=True)

    def sent(self, request: RouteRequest, replica: int) -> None:
        if request.prefix_group >= 0 and request.prefix_tokens > 0:
            key = (replica, request.prefix_group)
            self._held[key] = max(self._held.get(key, 0), request.prefix_tokens)


@register
class PowerOfTwo(Router):
    """Two replicas drawn at random (seeded); the one with fewer outstanding requests (ties:
    the first drawn)."""

    name = "power_of_two"

    def __init__(self, num_replicas: int, seed: int = 0, load_cap: int = 16):
        super().__init__(num_replicas, seed, load_cap)
        self._rng = random.Random(seed)
        self._pairs: deque[tuple[int, int]] = deque()  # the next draws, drawn ahead on a copy
        self._copy: random.Random | None = None  # the generator after them

    def choose(self, request: RouteRequest, reports: Sequence[ReplicaReport]) -> int:
        if self.num_replicas == 1:
            return 0
        a, b = self._rng.sample(range(self.num_replicas), 2)
        if self._pairs:
            self._pairs.popleft()
        return b if reports[b].outstanding < reports[a].outstanding else a

    def first_may_get(self, replica: int, outlook: Outlook) -> int:
        """The first arrival it will draw ``replica`` for (whatever the reports)."""
        for k in range(len(outlook)):
            if self.may_choose(replica, k):
                return k
        return len(outlook)

    def may_choose(self, replica: int, ahead: int) -> bool:
        """Whether the request ``ahead`` places after the next one (0: the next) may go to
        ``replica``: only the two replicas it will draw for it (changes nothing)."""
        if self.num_replicas == 1:
            return True
        if not self._pairs:
            self._copy = random.Random()
            self._copy.setstate(self._rng.getstate())
        while len(self._pairs) <= ahead:
            a, b = self._copy.sample(range(self.num_replicas), 2)
            self._pairs.append((a, b))
        return replica in self._pairs[ahead]
