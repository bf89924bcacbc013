"""Optional: sample a large candidate space with Optuna instead of searching every layout.

With ``plan.search.optuna_trials: N`` (and Optuna installed; it is not a dependency), a TPE
sampler proposes layouts axis by axis (hardware, model, TP, replicas, optimization, engine
settings, router), ``workers`` at a time; each is capacity-searched as in the full plan, and the
sampler learns to look for the cheapest layout meeting the SLO at the workload's rate. Layouts it
never proposes get status ``skipped``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from simulator.planning.planner import PointJob
from simulator.records.errors import ConfigError

INSTALL = "needs Optuna, which is not installed: pip install optuna (or null to search every layout)"
MISSING_PENALTY = 1000.0  # added to the cost of a layout missing the SLO at the workload's rate


def axes(job: PointJob) -> dict[str, Any]:
    """A layout's value on each axis, as Optuna parameters."""
    p = job.point
    out = {"hardware": p.hardware, "model": p.model, "tp": p.tp, "replicas": p.replicas,
           "optimization": p.optimization, "router": p.router}
    out.update({f"engine.{k}": v for k, v in p.engine})
    return out


def objective(row: dict[str, Any]) -> float:
    """Lower is better: the cost per hour of a layout meeting the SLO; above every such cost for
    one that misses it (less so the nearer its capacity is to the rate)."""
    if row.get("status") != "ok":
        return 2 * MISSING_PENALTY
    if row["meets_slo"]:
        return float(row["cost_per_hour_usd"])
    share = min(1.0, row["capacity_rps"] / row["rate_rps"]) if row["rate_rps"] > 0 else 0.0
    return MISSING_PENALTY * (2 - share) + float(row["cost_per_hour_usd"])


def optuna_rows(jobs: list[PointJob], trials: int, workers: int, seed: int,
                evaluate: Callable[[list[PointJob]], dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Rows (by key) of the layouts Optuna proposed in ``trials`` trials; ``evaluate`` runs a batch
    of jobs (on Ray) and returns their rows by key."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("plan.search.optuna_trials", INSTALL) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    by_axes = {tuple(sorted(axes(j).items())): j for j in jobs}
    choices: dict[str, list] = {}
    for job in jobs:
        for name, value in axes(job).items():
            if value not in choices.setdefault(name, []):
                choices[name].append(value)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    rows: dict[str, dict[str, Any]] = {}
    done = 0
    while done < trials:
        batch = [study.ask() for _ in range(min(workers, trials - done))]
        picked = []
        for trial in batch:
            params = {name: values[trial.suggest_categorical(name, list(range(len(values))))]
                      for name, values in choices.items()}
            picked.append(by_axes.get(tuple(sorted(params.items()))))
        new = {j.key: j for j in picked if j is not None and j.key not in rows}
        rows.update(evaluate(list(new.values())))
        for trial, job in zip(batch, picked, strict=True):
            study.tell(trial, objective(rows[job.key]) if job is not None else 2 * MISSING_PENALTY)
        done += len(batch)
    return rows
