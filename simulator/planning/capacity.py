"""The capacity of each candidate layout, and which layouts need not be searched.

A candidate's row (``search_point``) holds its metrics at the workload's own rate (as a plan
point's row), the highest rate it sustains within the SLO (``simulator.planning.rate_search``), its KV
usage, preemptions and latency tails at that rate, and its cost per hour and per million output
tokens there.

Layouts differing only in their replica count form a *family*. The planner searches the family's
smallest replica count from scratch; the others start from its capacity scaled by the replica
ratio (round robin splits the arrivals evenly, so N replicas sustain about N times one replica,
a little more because each sees a smoother stream) and need a few probes. A layout is *pruned*
(not searched) when another costs no more and is estimated to sustain ``1 + prune_margin`` times
its rate: it can be neither the cheapest layout for any rate nor on the cost/capacity front.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from simulator.planning.planner import PlanPoint, PointJob, base_row, cost_per_million_tokens
from simulator.planning.rate_search import (
    Capacity,
    Probe,
    SearchSettings,
    find_capacity,
    mean_rate,
    scale_rate,
    sustains,
)
from simulator.records.errors import ConfigError
from simulator.records.metrics import SLO
from simulator.records.workload import Workload

#: metrics kept from the probe at capacity, under ``cap_<name>``
AT_CAPACITY = ("attainment", "ttft_p99_s", "tpot_p99_s", "e2e_p99_s", "kv_mean", "kv_peak",
               "preemptions", "backlog", "output_tokens_per_s")
CAPACITY_COLUMNS = ("rate_rps", "capacity_rps", "capacity_upper_rps", "capacity_per_replica_rps",
                    "capacity_estimated", "probes", "limit",
                    *(f"cap_{m}" for m in AT_CAPACITY), "cap_cost_per_1m_output_tokens_usd")


@dataclass(frozen=True)
class PlannerSearch:
    """``plan.search``: the rate search's settings and the planner's use of them."""

    settings: SearchSettings
    prune: bool = True
    prune_margin: float = 0.2
    latency: str = "ttft_p99_s"
    optuna_trials: int | None = None  # sample this many layouts with Optuna instead of all

    @classmethod
    def from_dict(cls, data) -> PlannerSearch:
        data = dict(data or {})
        allowed = set(SearchSettings.__dataclass_fields__) | {"prune", "prune_margin", "latency", "optuna_trials"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError("plan.search", f"unknown fields {unknown}; allowed: {', '.join(sorted(allowed))}")
        latency = str(data.get("latency") or "ttft_p99_s")
        latencies = ("ttft_p99_s", "tpot_p99_s", "e2e_p99_s")
        if latency not in latencies:
            raise ConfigError("plan.search.latency", f"allowed: {', '.join(latencies)}, got {latency!r}")
        margin = data.get("prune_margin", 0.2)
        if isinstance(margin, bool) or not isinstance(margin, int | float) or margin < 0:
            raise ConfigError("plan.search.prune_margin", f"must be a number >= 0, got {margin!r}")
        trials = data.get("optuna_trials")
        if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
            raise ConfigError("plan.search.optuna_trials", f"must be an integer >= 1 or null, got {trials!r}")
        if trials is not None:
            try:
                import optuna  # noqa: F401
            except ImportError:
                from simulator.planning.optuna_search import INSTALL

                raise ConfigError("plan.search.optuna_trials", INSTALL) from None
        return cls(SearchSettings.from_dict(data), bool(data.get("prune", True)), float(margin), latency,
                   trials)


def family(point: PlanPoint) -> tuple:
    """What a layout is apart from its replica count."""
    return (point.hardware, point.model, point.tp, point.optimization, point.engine, point.router)


def empty_capacity_row(job: PointJob) -> dict[str, Any]:
    """A capacity row before anything ran."""
    row = base_row(job)
    row.update({c: math.nan for c in CAPACITY_COLUMNS})
    row.update(capacity_estimated=False, probes=0, limit="")
    return row


def search_point(job: PointJob, workload: Workload, slo: SLO, search: PlannerSearch,
                 start: float | None = None, step: float | None = None) -> dict[str, Any]:
    """Simulate a candidate at the workload's own rate, then search its capacity from ``start``
    (default: that rate) and return its row (``infeasible`` with the reason when it cannot run)."""
    from simulator.planning.layout import build_layout

    started = time.perf_counter()
    row = empty_capacity_row(job)
    try:
        layout = build_layout(job)
        own = mean_rate(workload)
        first, capacity = layout_capacity(layout, workload, slo, search.settings, start, step)
    except ConfigError as err:  # cannot run, or its router refuses a setting
        row.update(status="infeasible", reason=str(err), wall_s=time.perf_counter() - started)
        return row
    row.update(first.metrics)
    row.update(meets_slo=first.sustains, rate_rps=own,
               calibrated=bool(layout.perf.calibrated), perf_model=layout.perf.describe().get("name", ""),
               kv_capacity_tokens=layout.kv_capacity_tokens,
               cost_per_1m_output_tokens_usd=cost_per_million_tokens(row["cost_per_hour_usd"],
                                                                     row["output_tokens_per_s"]))
    row.update(capacity_columns(capacity, row["cost_per_hour_usd"], job.point.replicas))
    row["wall_s"] = time.perf_counter() - started
    return row


def layout_capacity(layout, workload: Workload, slo: SLO, settings: SearchSettings,
                    start: float | None = None, step: float | None = None) -> tuple[Probe, Capacity]:
    """(the probe at the workload's own rate, the layout's capacity searched from ``start``)."""
    from simulator.planning.layout import simulate_layout

    own = mean_rate(workload)

    def run(rate: float) -> Probe:
        load = workload if rate == own else scale_rate(workload, rate)
        metrics = simulate_layout(layout, load, slo)
        ok, why = sustains(metrics, slo, settings.max_backlog)
        return Probe(rate, ok, why, metrics)

    first = run(own)
    return first, find_capacity(run, start or own, settings, step, known=[first])


def capacity_columns(capacity, cost_per_hour: float, replicas: int) -> dict[str, Any]:
    """The row's capacity columns from a search's answer."""
    at = capacity.at_capacity
    out = {"capacity_rps": capacity.rate, "capacity_upper_rps": capacity.upper,
           "capacity_per_replica_rps": capacity.rate / replicas, "capacity_estimated": False,
           "probes": len(capacity.probes), "limit": capacity.limit or
           ("" if capacity.upper < math.inf else "no failing rate within the probes")}
    metrics = at.metrics if at is not None else {}
    for m in AT_CAPACITY:
        out[f"cap_{m}"] = metrics.get(m, math.nan)
    tokens = metrics.get("output_tokens_per_s", 0.0)
    out["cap_cost_per_1m_output_tokens_usd"] = cost_per_million_tokens(cost_per_hour, tokens)
    return out


def estimates(bases: Sequence[tuple[PointJob, dict[str, Any]]], jobs: Sequence[PointJob]) -> dict[str, float]:
    """Estimated capacity of every job (by key) whose family's smallest layout was searched
    (``bases``: (job, row)): that capacity per replica times the job's replica count."""
    per_replica = {family(job.point): row["capacity_rps"] / job.point.replicas
                   for job, row in bases if row["status"] == "ok"}
    return {j.key: per_replica[family(j.point)] * j.point.replicas
            for j in jobs if family(j.point) in per_replica}


def prune(candidates: Sequence[tuple[PointJob, float, float]], margin: float) -> dict[str, str]:
    """Keys of dominated candidates -> the label of one dominating it.

    ``candidates`` are (job, cost per hour, estimated capacity). A candidate is dominated when
    another costs no more and is estimated to sustain at least ``1 + margin`` times its rate.
    """
    out = {}
    by_cost = sorted(candidates, key=lambda c: (c[1], -c[2]))
    for job, cost, cap in candidates:
        for other, other_cost, other_cap in by_cost:
            if other_cost > cost:
                break
            if other.key != job.key and other_cap >= cap * (1 + margin) and other_cap > 0:
                out[job.key] = other.point.label()
                break
    return out
