"""The highest arrival rate a layout sustains within the SLO, by bisection on rate.

The workload keeps its shape and its span: the same requests (lengths, arrival pattern,
burstiness) arriving faster and repeated to fill the workload's own span, or arriving slower
(``scale_rate``), so that the probe at rate ``r`` has a mean rate of ``r`` requests per second and
lasts as long as the workload. (A rate-varying workload's windows are compressed with its
arrivals: the search rates the layout against the shape repeated, not stretched.)

A layout *sustains* a rate when both hold on that scaled workload:

1. the SLO: at least ``slo.attainment`` of the requests meet every limit of the SLO (the
   planner's goodput rule; rejected requests count as missing it), and
2. no unbounded queue growth: when the last request arrives, at most ``max_backlog`` of the
   requests are still waiting to be scheduled. A layout slower than its arrivals accumulates a
   queue growing with the run (a share of about 1 - capacity / rate); one keeping up holds at most
   a burst's worth. This catches overload that an SLO without a TTFT limit would not.

The search assumes "sustains" falls from true to false once as the rate rises (more load never
helps). Every probe lies between the highest sustained and the lowest failing rate seen so far,
so a model that is not monotone near its edge still gets a consistent bracket, of one of its
edges.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulator.records.errors import ConfigError
from simulator.records.metrics import SLO
from simulator.records.workload import Workload


@dataclass(frozen=True)
class SearchSettings:
    """How the rate search runs (``plan.search``)."""

    rel_tol: float = 0.05      # stop when the failing rate is within this share of the sustained one
    max_probes: int = 12       # simulations per layout at most
    max_backlog: float = 0.05  # share of requests still waiting at the last arrival
    min_rate: float = 1e-3     # below this (req/s) a layout sustains nothing
    step: float = 2.0          # growth/shrink factor while no bracket is known

    @classmethod
    def from_dict(cls, data) -> SearchSettings:
        data = dict(data or {})
        allowed = {f for f in cls.__dataclass_fields__}
        values = {}
        for key, value in data.items():
            if key not in allowed:
                continue  # other plan.search keys belong to the planner (prune, latency, ...)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"plan.search.{key}", f"must be a number > 0, got {value!r}")
            values[key] = value
        settings = cls(**values)
        if settings.step <= 1:
            raise ConfigError("plan.search.step", f"must be > 1, got {settings.step}")
        if settings.max_backlog >= 1:
            raise ConfigError("plan.search.max_backlog", f"must lie in (0, 1), got {settings.max_backlog}")
        if int(settings.max_probes) != settings.max_probes or settings.max_probes < 2:
            raise ConfigError("plan.search.max_probes", f"must be an integer >= 2, got {settings.max_probes}")
        return settings


@dataclass(frozen=True)
class Probe:
    """One simulation at one rate and its verdict."""

    rate: float
    sustains: bool
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Capacity:
    """The search's answer: ``rate`` is sustained (0 when even ``min_rate`` is not), ``upper``
    is not (inf when no failing rate was found within the probes)."""

    rate: float
    upper: float
    probes: tuple[Probe, ...]

    @property
    def at_capacity(self) -> Probe | None:
        """The probe at the sustained rate (None when nothing was sustained)."""
        hits = [p for p in self.probes if p.sustains and p.rate == self.rate]
        return hits[0] if hits else None

    @property
    def limit(self) -> str:
        """Why the lowest failing probe failed ('' when none failed)."""
        fails = [p for p in self.probes if not p.sustains and p.rate == self.upper]
        return fails[0].reason if fails else ""


def mean_rate(workload: Workload) -> float:
    """Requests per second from time 0 to the last arrival."""
    span = workload.duration_s
    if len(workload) == 0 or not span > 0:
        raise ConfigError("workload", "a rate search needs at least two requests arriving at different times")
    return len(workload) / span


def scale_rate(workload: Workload, rate: float) -> Workload:
    """The workload at a mean rate of ``rate`` over its own span.

    Faster than its own rate, its requests (in order, with their lengths) arrive ``k = rate / own``
    times faster and are repeated to fill the span: ``ceil(k)`` copies, each compressed to
    ``span / k``, the last one cut at the span. Slower, its arrivals are stretched. Keeping the
    span keeps the time the layout has to show a growing queue or a filling KV cache.
    """
    n, span = len(workload), workload.duration_s
    k = float(rate) / mean_rate(workload)
    if k <= 1:
        return _with_arrivals(workload, np.arange(n), workload.arrival_s / k)
    copies = math.ceil(k)
    arrivals = np.concatenate([workload.arrival_s / k + i * span / k for i in range(copies)])
    index = np.tile(np.arange(n), copies)
    keep = arrivals <= span * (1 + 1e-12)
    return _with_arrivals(workload, index[keep], arrivals[keep])


def _with_arrivals(workload: Workload, index: np.ndarray, arrival_s: np.ndarray) -> Workload:
    return Workload(arrival_s, workload.prompt_tokens[index], workload.output_tokens[index],
                    workload.reasoning_tokens[index], workload.domain[index], workload.prefix_group[index],
                    workload.prefix_tokens[index], name=workload.name, seed=workload.seed,
                    outer_group=workload.outer_group[index], outer_tokens=workload.outer_tokens[index],
                    timeout_s=workload.timeout_s[index])


def sustains(metrics: dict[str, Any], slo: SLO, max_backlog: float) -> tuple[bool, str]:
    """(whether a run's metrics sustain its rate, why not)."""
    if not metrics["attainment"] >= slo.attainment:
        return False, f"SLO attainment {metrics['attainment']:.1%} < {slo.attainment:.0%}"
    if metrics["backlog"] > max_backlog:
        return False, f"queue grows: {metrics['backlog']:.1%} of requests waiting at the last arrival"
    return True, ""


def find_capacity(run: Callable[[float], Probe], start: float, settings: SearchSettings,
                  step: float | None = None, known: Iterable[Probe] = ()) -> Capacity:
    """Bracket then bisect (geometrically) the highest sustained rate, from a first probe at
    ``start``: grow (or shrink) by ``step`` until one rate sustains and another fails, then halve
    the bracket until the failing rate is within ``rel_tol`` of the sustained one. ``known``
    probes (already simulated) narrow the bracket and count towards ``max_probes``."""
    step = float(step or settings.step)
    probes: list[Probe] = list(known)
    lo = max((p.rate for p in probes if p.sustains), default=0.0)
    hi = min((p.rate for p in probes if not p.sustains), default=math.inf)
    if lo >= hi:  # inconsistent known probes: trust the failure
        lo = max((p.rate for p in probes if p.sustains and p.rate < hi), default=0.0)

    def following() -> float:
        """The next rate: past the bracket by ``step``, or within it, at most a ``step`` from
        the last probe (which the caller's ``start`` put near the edge) and at most halfway."""
        if lo > 0 and hi < math.inf:  # every probe lies between the two, so lo < hi
            middle = math.sqrt(lo * hi)
            if probes and probes[-1].sustains:
                return min(middle, lo * step)
            return max(middle, hi / step)
        return lo * step if lo > 0 else hi / step

    rate = float(start) if lo < float(start) < hi and start > 0 else following()
    while len(probes) < settings.max_probes:
        if lo > 0 and hi <= lo * (1 + settings.rel_tol):
            break
        if rate < settings.min_rate:
            break
        p = run(rate)
        probes.append(p)
        if p.sustains:
            lo = rate
        else:
            hi = rate
        rate = following()
    return Capacity(lo, hi, tuple(probes))
