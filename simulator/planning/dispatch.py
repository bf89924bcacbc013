"""``python -m simulator.plan``'s modes: which planner runs a plan (points, capacity or day)."""

from __future__ import annotations

from pathlib import Path

from simulator.planning.runner import run_points_plan
from simulator.records.errors import ConfigError


def run_plan(cfg, out_dir: str | Path, *, progress: bool = True, max_in_flight: int | None = None):
    """Run the plan of ``cfg.plan`` by its ``mode``: ``points`` (every point at the workload's
    rate), ``capacity`` (rate search, Pareto front) or ``day`` (replicas per window of a day)."""
    from simulator.configure import to_plain

    mode = str((to_plain(cfg).get("plan") or {}).get("mode") or "points")
    if mode == "capacity":
        from simulator.planning.capacity_plan import run_capacity_plan

        return run_capacity_plan(cfg, out_dir, progress=progress, max_in_flight=max_in_flight)
    if mode == "day":
        from simulator.planning.day_plan import run_day_plan

        return run_day_plan(cfg, out_dir, progress=progress, max_in_flight=max_in_flight)
    if mode != "points":
        raise ConfigError("plan.mode", f"allowed: points, capacity, day, got {mode!r}")
    return run_points_plan(cfg, out_dir, progress=progress, max_in_flight=max_in_flight)
