"""`python -m simulator.plan plan=capacity`: each layout's capacity on Ray, pruned, with the
Pareto front of cost against latency and a written recommendation.

Writes into the run directory: ``capacity.parquet`` / ``capacity.csv`` (a row per candidate,
rewritten as candidates finish, resumable like ``points.parquet``), ``plan.json``,
``pareto.png``, ``recommendation.md``, ``workload.parquet`` and ``resolved_config.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from simulator.planning.capacity import (
    PlannerSearch,
    empty_capacity_row,
    estimates,
    family,
    prune,
    search_point,
)
from simulator.planning.planner import PlanSpace, PointJob, choose, resolve_jobs, verdict
from simulator.planning.runner import (
    PlanOutcome,
    PointStore,
    _json_row,
    _ray_version,
    ray_map,
    ray_session,
)
from simulator.records.run_result import json_default

TABLE = "capacity.parquet"

def hinted_step(search: PlannerSearch) -> float:
    """Growth factor of a search starting from its family's estimate (good to ~10%): a bracket of
    twice the tolerance, closed by one bisection when the estimate is right."""
    return 1 + 2 * search.settings.rel_tol


def capacity_jobs(space: PlanSpace, plain: dict, workload, slo, seed: int,
                  search: PlannerSearch) -> list[PointJob]:
    """The plan's jobs, keyed also by the search settings (another search is another plan)."""
    decides = {k: v for k, v in asdict(search).items() if k != "latency"}  # latency: only the front
    extra = json.dumps({"mode": "capacity", **decides}, sort_keys=True, default=str)
    return [replace(j, key=hashlib.sha256((j.key + extra).encode()).hexdigest()[:16])
            for j in resolve_jobs(space, plain, workload, slo, seed)]


def run_capacity_plan(cfg, out_dir: str | Path, *, progress: bool = True,
                      max_in_flight: int | None = None) -> PlanOutcome:
    """Search every candidate's capacity (families' smallest layouts first, the rest from their
    estimates unless pruned) and write the tables, the front, the figure and the recommendation."""
    import yaml

    from simulator.configure import to_plain, versions
    from simulator.planning.pareto import pareto_front, recommendation, write_pareto_plot
    from simulator.planning.rate_search import mean_rate
    from simulator.records.metrics import SLO
    from simulator.workload.builder import build_workload

    plain = to_plain(cfg)
    out = Path(out_dir)
    space = PlanSpace.from_config(plain)
    plan = dict(plain.get("plan") or {})
    search = PlannerSearch.from_dict(plan.get("search"))
    slo = SLO.from_dict(plain.get("slo"))
    workload = build_workload(plain["workload"])
    rate = mean_rate(workload)
    seed = int(workload.seed)
    jobs = capacity_jobs(space, plain, workload, slo, seed, search)
    out.mkdir(parents=True, exist_ok=True)
    store = PointStore(out, TABLE)
    rows = store.load({j.key for j in jobs})
    reused = len(rows)
    (out / "resolved_config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    workload.save(out / "workload.parquet")
    by_family: dict[tuple, list[PointJob]] = {}
    for job in jobs:
        by_family.setdefault(family(job.point), []).append(job)
    bases = [min(group, key=lambda j: j.point.replicas) for group in by_family.values()]
    computed = 0
    started = time.perf_counter()
    from tqdm import tqdm

    with tqdm(total=len(jobs), initial=reused, unit="layout", desc="capacity search",
              disable=not progress, mininterval=0.5) as bar:

        def done(job: PointJob, result) -> None:
            nonlocal computed
            if isinstance(result, BaseException):
                from simulator.planning.runner import _error_row

                result = {**empty_capacity_row(job), **_error_row(job, result)}
            rows[job.key] = result
            computed += 1
            store.write(list(rows.values()), force=False)
            bar.update(1)

        todo = [j for j in bases if j.key not in rows]
        needs_ray = any(j.key not in rows for j in jobs)
        with ray_session(plan.get("ray_address"), plan.get("num_cpus")) if needs_ray else _nothing() as ray:
            if search.optuna_trials and needs_ray:
                from simulator.planning.optuna_search import optuna_rows

                def evaluate(batch: list[PointJob]) -> dict[str, dict[str, Any]]:
                    if not batch:
                        return {}
                    ref = ray.put(workload)
                    ray_map(ray, search_point, [(j, (j, ref, slo, search)) for j in batch], done,
                            max_in_flight=max_in_flight)
                    return {j.key: rows[j.key] for j in batch}

                workers = max_in_flight or int(plan.get("num_cpus") or os.cpu_count() or 1)
                sampled = optuna_rows([j for j in jobs if j.key not in rows], search.optuna_trials, workers,
                                      seed, evaluate)
                for job in jobs:
                    if job.key not in rows and job.key not in sampled:
                        rows[job.key] = {**empty_capacity_row(job), "status": "skipped",
                                         "reason": "not proposed by Optuna"}
                        bar.update(1)
            else:
                if todo:
                    ref = ray.put(workload)
                    ray_map(ray, search_point, [(j, (j, ref, slo, search)) for j in todo], done,
                            max_in_flight=max_in_flight)
                # the others: infeasible with their family, else estimated, pruned or searched
                base_of = {family(j.point): j for j in bases}
                guesses = estimates([(j, rows[j.key]) for j in bases], jobs)
                base_keys = {j.key for j in bases}
                followers = []
                for job in (j for j in jobs if j.key not in base_keys and j.key not in rows):
                    base = rows[base_of[family(job.point)].key]
                    if base["status"] in ("infeasible", "error"):
                        rows[job.key] = {**empty_capacity_row(job), "status": base["status"],
                                         "reason": f"as {base['label']}: {base['reason']}"}
                        bar.update(1)
                    elif guesses[job.key] <= 0:
                        rows[job.key] = _pruned(job, 0.0, f"{base['label']} sustains no rate >= "
                                                f"{search.settings.min_rate:g} req/s; replicas do not "
                                                f"lower the latency of a lone request")
                        bar.update(1)
                    else:
                        followers.append(job)
                if search.prune:
                    measured = [(j, rows[j.key]["cost_per_hour_usd"], rows[j.key]["capacity_rps"])
                                for j in jobs if j.key in rows and rows[j.key]["status"] == "ok"]
                    guessed = [(j, empty_capacity_row(j)["cost_per_hour_usd"], guesses[j.key]) for j in followers]
                    dominated = prune(measured + guessed, search.prune_margin)
                    for job in (j for j in followers if j.key in dominated):
                        rows[job.key] = _pruned(job, guesses[job.key], f"dominated by {dominated[job.key]}: "
                                                f"costs no more, estimated to sustain "
                                                f">= {1 + search.prune_margin:g}x the rate")
                        bar.update(1)
                    followers = [j for j in followers if j.key not in dominated]
                if followers:
                    ref = ray.put(workload)
                    ray_map(ray, search_point,
                            [(j, (j, ref, slo, search, guesses[j.key], hinted_step(search))) for j in followers],
                            done, max_in_flight=max_in_flight)
    for job in jobs:  # a reused row takes this plan's position
        rows[job.key].update(index=job.point.index, label=job.point.label())
    ordered = sorted(rows.values(), key=lambda r: r["index"])
    store.write(ordered)
    chosen, closest = choose(ordered)
    front = pareto_front([r for r in ordered if r["status"] == "ok"], "cost_per_hour_usd", search.latency)
    (out / "recommendation.md").write_text(
        recommendation(ordered, front, chosen, slo, search.latency, workload.name, rate))
    sentence = verdict(chosen, closest, slo, len(ordered))
    summary = {
        "verdict": sentence,
        "mode": "capacity",
        "meets_slo": chosen is not None,
        "chosen": _json_row(chosen),
        "closest": _json_row(closest),
        "pareto_front": [r["label"] for r in front],
        "rate_rps": rate,
        "slo": asdict(slo),
        "search": asdict(search),
        "sustains": "SLO attainment >= slo.attainment and at most search.max_backlog of the "
                    "requests still waiting when the last one arrives",
        "seed": seed,
        "routers": list(space.routers),
        "points": {
            "total": len(ordered),
            "searched": sum(r["status"] == "ok" for r in ordered),
            "pruned": sum(r["status"] == "pruned" for r in ordered),
            "skipped": sum(r["status"] == "skipped" for r in ordered),
            "infeasible": sum(r["status"] == "infeasible" for r in ordered),
            "failed": sum(r["status"] == "error" for r in ordered),
            "meeting_slo": sum(bool(r["meets_slo"]) for r in ordered),
            "computed_this_run": computed,
            "reused": reused,
            "simulations": int(sum(r["probes"] for r in ordered if r["status"] == "ok")),
        },
        "wall_s": time.perf_counter() - started,
        "workload": {"name": workload.name, "requests": len(workload), "seed": workload.seed},
        "versions": {**versions(), "ray": _ray_version()},
        "config": plain,
    }
    (out / "plan.json").write_text(json.dumps(summary, indent=2, default=json_default))
    if plain.get("plots", True):
        write_pareto_plot(ordered, front, chosen, search.latency,
                          getattr(slo, search.latency.replace("_p99", "")), out / "pareto.png")
    return PlanOutcome(out, ordered, chosen, closest, sentence, computed, reused)


def _pruned(job: PointJob, estimate: float, reason: str) -> dict[str, Any]:
    row = empty_capacity_row(job)
    row.update(status="pruned", reason=reason, capacity_rps=estimate,
               capacity_per_replica_rps=estimate / job.point.replicas, capacity_estimated=True)
    return row


class _nothing:
    """A stand-in for ray_session when every row is already on disk."""

    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None
