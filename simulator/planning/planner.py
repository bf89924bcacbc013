"""What-if capacity planning: the search space, its points, and how one point is judged.

A plan point is one deployment: a hardware type, a model, a tensor-parallel size,
a number of replicas, an optimization and a set of engine settings. Its arrival
stream is split across the replicas by a router, each replica is simulated on
its own, and the per-request results merge into one row: SLO attainment,
latency tails, KV usage, preemptions and cost. Points that cannot run (the
model does not fit, the TP size does not divide the heads) become rows with the
reason instead of errors.

``round_robin`` sends request i (in arrival order) to replica i mod N and the
replicas never interact, so each is simulated on its own; it errs on the
pessimistic side for tail latency next to routers that look at load, and it
scatters shared prefixes over the replicas. The other routers (``routers()``)
run the replicas together in ``simulator.cluster``; ``plan.router`` may list
several, making the router one more axis (``simulator.planning.layout`` simulates either).

Everything here is pure: no Ray, no files. ``simulator.planning.runner`` runs the
points on Ray and writes the tables; ``python -m simulator.plan`` is the CLI.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError
from simulator.records.metrics import SLO
from simulator.records.workload import Workload

PLANNER_VERSION = 1
ROUTERS = ("round_robin",)  # without the cluster simulation; see routers()
PLAN_FIELDS = ("mode", "hardware", "model", "tp", "replicas", "optimization", "engine", "router",
               "ray_address", "num_cpus", "search", "day")
# engine settings a plan may vary (every scalar EngineConfig field)
ENGINE_SETTINGS = tuple(f.name for f in fields(EngineConfig) if f.name != "speculative")
NAMED_GROUPS = ("hardware", "model", "optimization")


@dataclass(frozen=True)
class PlanPoint:
    """One deployment to judge; ``engine`` holds the settings this plan varies."""

    index: int
    hardware: str
    model: str
    tp: int
    replicas: int
    optimization: str
    engine: tuple[tuple[str, Any], ...] = ()
    router: str = "round_robin"

    def label(self) -> str:
        """A short human name, e.g. ``h100 x2 tp1 fp8_kv max_num_seqs=256``."""
        settings = " ".join(f"{k}={v}" for k, v in self.engine)
        router = "" if self.router == "round_robin" else self.router
        return " ".join(p for p in (f"{self.hardware} x{self.replicas} tp{self.tp}", self.model,
                                    self.optimization, settings, router) if p)


@dataclass(frozen=True)
class PlanSpace:
    """The lists a plan sweeps over (names already checked against conf/)."""

    hardware: tuple[str, ...]
    model: tuple[str, ...]
    tp: tuple[int, ...]
    replicas: tuple[int, ...]
    optimization: tuple[str, ...]
    engine: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    routers: tuple[str, ...] = ("round_robin",)

    @property
    def router(self) -> str:
        """The first router (a plan of one router)."""
        return self.routers[0]

    def points(self) -> list[PlanPoint]:
        """Every combination, replicas varying fastest."""
        names = [k for k, _ in self.engine]
        combos = list(itertools.product(*(values for _, values in self.engine)))
        out = []
        for hw, model, opt, tp, combo, router, n in itertools.product(
                self.hardware, self.model, self.optimization, self.tp, combos, self.routers, self.replicas):
            out.append(PlanPoint(len(out), hw, model, tp, n, opt, tuple(zip(names, combo, strict=True)),
                                 router))
        return out

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PlanSpace:
        """Read ``cfg["plan"]``; empty lists fall back to the run's own group choices."""
        from calibration import catalog

        plan = dict(cfg.get("plan") or {})
        unknown = sorted(set(plan) - set(PLAN_FIELDS))
        if unknown:
            raise ConfigError("plan", f"unknown fields {unknown}; allowed: {', '.join(PLAN_FIELDS)}")
        chosen = {}
        for field in (*NAMED_GROUPS, "tp", "replicas"):
            if plan.get(field) is not None and not _as_list(plan.get(field), f"plan.{field}"):
                raise ConfigError(f"plan.{field}", "the candidate space is empty: list at least one "
                                                   "value, or null for the run's own choice")
        for group in NAMED_GROUPS:
            values = _as_list(plan.get(group), f"plan.{group}")
            allowed = catalog.names(group)
            for value in values:
                if value not in allowed:
                    raise ConfigError(f"plan.{group}", f"unknown choice {value!r}; allowed: {', '.join(allowed)}")
            own = (cfg.get(group) or {}).get("name")
            if not values and not own:
                raise ConfigError(f"plan.{group}", f"the {group} group has no name; list names from: "
                                                   f"{', '.join(allowed)}")
            chosen[group] = _unique(values or [own])
        tp = _positive_ints(plan.get("tp"), "plan.tp") or (int(cfg.get("tp", 1)),)
        replicas = _positive_ints(plan.get("replicas"), "plan.replicas") or (1,)
        allowed = routers()
        chosen_routers = _unique(str(r) for r in _as_list(plan.get("router"), "plan.router")) or ("round_robin",)
        for router in chosen_routers:
            if router not in allowed:
                raise ConfigError("plan.router", f"unknown router {router!r}; allowed: {', '.join(allowed)}")
        engine = _engine_variations(plan.get("engine"), dict(cfg.get("engine") or {}))
        return cls(chosen["hardware"], chosen["model"], tp, replicas, chosen["optimization"], engine,
                   chosen_routers)


def routers() -> tuple[str, ...]:
    """The routers a plan may use: ``round_robin`` (replicas simulated apart) and, when the cluster
    simulation is installed, every router of ``simulator.cluster``."""
    try:
        from simulator.cluster import ROUTERS as CLUSTER_ROUTERS
    except ImportError:
        return ROUTERS
    return _unique((*ROUTERS, *CLUSTER_ROUTERS))


def _as_list(value, field: str) -> list:
    if value is None:
        return []
    if isinstance(value, str | int | float):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        return list(value)
    raise ConfigError(field, f"must be a list, got {value!r}")


def _unique(values: Iterable) -> tuple:
    return tuple(dict.fromkeys(values))


def _positive_ints(value, field: str) -> tuple[int, ...]:
    values = _as_list(value, field)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(field, f"must be a list of integers >= 1, got {v!r}")
    return _unique(values)


def _engine_variations(value, base_engine: dict) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """``plan.engine`` as (setting, values) pairs, each combination checked as an EngineConfig."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise ConfigError("plan.engine", f"must map engine settings to lists of values, got {value!r}")
    pairs = []
    for key, values in value.items():
        if key not in ENGINE_SETTINGS:
            raise ConfigError("plan.engine", f"unknown setting {key!r}; allowed: {', '.join(ENGINE_SETTINGS)}")
        if values is None:
            continue  # not varied: the engine group's value
        listed = _unique(_as_list(values, f"plan.engine.{key}"))
        if not listed:
            raise ConfigError(f"plan.engine.{key}", "needs at least one value")
        pairs.append((str(key), listed))
    for combo in itertools.product(*(values for _, values in pairs)):
        settings = dict(zip((k for k, _ in pairs), combo, strict=True))
        try:
            EngineConfig.from_dict({**base_engine, **settings})
        except (ConfigError, TypeError) as err:
            field = getattr(err, "field", "engine")
            message = str(err)[len(field) + 2:] if isinstance(err, ConfigError) else str(err)
            raise ConfigError(f"plan.{field}", f"{message} (in {settings})") from None
    return tuple(pairs)


@dataclass(frozen=True)
class PointJob:
    """A point with every setting resolved to plain data: what a worker needs, and its key."""

    point: PlanPoint
    hardware: dict[str, Any]
    model: dict[str, Any]
    optimization: dict[str, Any]
    engine: dict[str, Any]
    perf: dict[str, Any]
    router: str
    seed: int
    key: str


def resolve_group(cfg: Mapping[str, Any], group: str, name: str) -> dict[str, Any]:
    """The config of ``group`` named ``name``: the run's own (with its overrides) when it is the
    one selected, else the file in conf/<group>/."""
    import yaml

    from calibration import catalog

    own = dict(cfg.get(group) or {})
    if own.get("name") == name:
        return own
    return dict(yaml.safe_load((catalog.CONF_DIR / group / f"{name}.yaml").read_text()) or {})


def workload_digest(workload: Workload) -> str:
    """A hash of the requests themselves (not of the config that made them)."""
    h = hashlib.sha256()
    for column in (workload.arrival_s, workload.prompt_tokens, workload.output_tokens,
                   workload.reasoning_tokens, workload.prefix_group, workload.prefix_tokens):
        h.update(np.ascontiguousarray(column).tobytes())
    h.update("\x00".join(map(str, workload.domain)).encode())
    return h.hexdigest()


def resolve_jobs(space: PlanSpace, cfg: Mapping[str, Any], workload: Workload, slo: SLO,
                 seed: int) -> list[PointJob]:
    """Every point of the space with its resolved settings and its resume key.

    The key hashes everything that decides the point's row: hardware (price included),
    model, optimization, engine, performance-model source, TP, replicas, router, the
    workload's requests, the SLO and the seed.
    """
    digest = workload_digest(workload)
    base_engine = dict(cfg.get("engine") or {})
    perf = dict(cfg.get("perf") or {})
    groups = {(g, n): resolve_group(cfg, g, n) for g in NAMED_GROUPS
              for n in getattr(space, g)}
    jobs = []
    for point in space.points():
        engine = {**base_engine, **dict(point.engine)}
        settings = {
            "hardware": groups["hardware", point.hardware],
            "model": groups["model", point.model],
            "optimization": groups["optimization", point.optimization],
            "engine": engine,
            "perf": perf,
            "tp": point.tp,
            "replicas": point.replicas,
            "router": point.router,
            "workload": digest,
            "slo": asdict(slo),
            "seed": seed,
            "planner": PLANNER_VERSION,
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        jobs.append(PointJob(point, settings["hardware"], settings["model"], settings["optimization"],
                             engine, perf, point.router, seed, key))
    return jobs


def gpus_per_replica(job: PointJob) -> int:
    """GPUs of one replica: its TP size times its data-parallel ranks (``engine.data_parallel_size``:
    that many engine ranks of ``tp`` GPUs each, as ``python -m simulator`` runs them)."""
    return job.point.tp * int(job.engine.get("data_parallel_size", 1) or 1)


def cost_per_hour(replicas: int, gpus: int, price_per_gpu_hour_usd: float) -> float:
    """USD per hour of the deployment: every GPU (``gpus`` per replica) of every replica."""
    return replicas * gpus * float(price_per_gpu_hour_usd)


def cost_per_million_tokens(cost_usd_per_hour: float, output_tokens_per_s: float) -> float:
    """USD per million output tokens at the throughput reached (inf when nothing is produced)."""
    if not output_tokens_per_s > 0:
        return math.inf
    return cost_usd_per_hour / (output_tokens_per_s * 3600.0) * 1e6


METRIC_COLUMNS = ("requests", "completed", "rejected", "attainment", "goodput_rps", "meets_slo",
                  "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p50_s", "e2e_p99_s",
                  "kv_mean", "kv_peak", "preemptions", "output_tokens_per_s", "duration_s", "backlog")


def base_row(job: PointJob) -> dict[str, Any]:
    """The columns every row has, whether the point ran or not."""
    p = job.point
    price = float(job.hardware.get("price_per_gpu_hour_usd", 0.0) or 0.0)
    engine = {k: job.engine.get(k) for k in ("max_num_seqs", "max_num_batched_tokens")}
    engine.update(dict(p.engine))
    gpus = gpus_per_replica(job)
    return {
        "key": job.key, "index": p.index, "label": p.label(), "hardware": p.hardware, "model": p.model,
        "tp": p.tp, "replicas": p.replicas, "gpus": p.replicas * gpus, "optimization": p.optimization,
        **engine, "router": job.router, "seed": job.seed, "status": "ok", "reason": "",
        "calibrated": False, "perf_model": "", "kv_capacity_tokens": 0,
        **{c: (False if c == "meets_slo" else math.nan) for c in METRIC_COLUMNS},
        "price_per_gpu_hour_usd": price, "cost_per_hour_usd": cost_per_hour(p.replicas, gpus, price),
        "cost_per_1m_output_tokens_usd": math.nan, "wall_s": 0.0,
    }


def evaluate_point(job: PointJob, workload: Workload, slo: SLO) -> dict[str, Any]:
    """Simulate one point (every replica) and return its row; a point that cannot run
    returns status ``infeasible`` and the reason."""
    from simulator.planning.layout import build_layout, simulate_layout

    started = time.perf_counter()
    row = base_row(job)
    try:
        layout = build_layout(job)
        metrics = simulate_layout(layout, workload, slo)  # a router may refuse a setting
    except ConfigError as err:
        row.update(status="infeasible", reason=str(err), wall_s=time.perf_counter() - started)
        return row
    row.update(metrics)
    row.update(calibrated=bool(layout.perf.calibrated), perf_model=layout.perf.describe().get("name", ""),
               kv_capacity_tokens=layout.kv_capacity_tokens,
               cost_per_1m_output_tokens_usd=cost_per_million_tokens(row["cost_per_hour_usd"],
                                                                     row["output_tokens_per_s"]),
               wall_s=time.perf_counter() - started)
    return row


def preference(row: dict[str, Any]) -> tuple:
    """Sort key among points meeting the SLO: cheaper first, then higher attainment, then
    lower cost per token, then plan order."""
    return (row["cost_per_hour_usd"], -row["attainment"], row["cost_per_1m_output_tokens_usd"], row["index"])


def choose(rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the cheapest point that meets the SLO or None, the point that came closest).

    Ties on cost go to higher attainment, then lower cost per token, then plan order.
    The closest point is the chosen one if any, else the highest attainment (then cheapest).
    """
    ran = [r for r in rows if r["status"] == "ok"]
    meeting = [r for r in ran if r["meets_slo"]]
    if meeting:
        best = min(meeting, key=preference)
        return best, best
    if not ran:
        return None, None
    closest = min(ran, key=lambda r: (-r["attainment"], r["cost_per_hour_usd"], r["index"]))
    return None, closest


def verdict(chosen: dict | None, closest: dict | None, slo: SLO, total: int) -> str:
    """One sentence on the plan's outcome."""
    target = f"{slo.attainment:.0%} of requests within the SLO"
    if chosen is not None:
        caveat = "" if chosen["calibrated"] else " (UNCALIBRATED roofline step times: treat as rough)"
        return (f"cheapest point meeting the SLO ({target}): {chosen['label']} at "
                f"${chosen['cost_per_hour_usd']:.2f}/h, attainment {chosen['attainment']:.1%}, "
                f"${chosen['cost_per_1m_output_tokens_usd']:.2f} per 1M output tokens{caveat}")
    if closest is None:
        return (f"none of the {total} points ran: each cannot run or failed "
                f"(see the status and reason columns of points.csv)")
    return (f"no point meets the SLO ({target}); closest: {closest['label']} at "
            f"${closest['cost_per_hour_usd']:.2f}/h with attainment {closest['attainment']:.1%}")
