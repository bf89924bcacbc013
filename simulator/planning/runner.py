"""Run a capacity plan on Ray: one task per point, rows written as points finish, resumable.

``run_plan(cfg, out_dir)`` reads the plan from a resolved config, skips the points
whose rows are already in ``out_dir/points.parquet`` (same key: same resolved
settings, workload, SLO and seed), runs the rest as Ray tasks and writes:

- ``points.parquet`` / ``points.csv``: one row per point (rewritten as points finish),
- ``plan.json``: resolved config, versions, seed, counts and the verdict (the cheapest
  point meeting the SLO, or that none does and which came closest),
- ``cost_vs_attainment.png``: cost per hour against SLO attainment,
- ``workload.parquet`` and ``resolved_config.yaml``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from simulator.planning.planner import (
    PlanSpace,
    PointJob,
    base_row,
    choose,
    evaluate_point,
    resolve_jobs,
    verdict,
)
from simulator.records.errors import ConfigError
from simulator.records.run_result import json_default

POINTS = "points.parquet"
RAY_INSTALL = "the planner runs on Ray, which is not installed; install it with: pip install -e '.[plan]'"
FLUSH_EVERY_S = 1.0


@dataclass(frozen=True)
class PlanOutcome:
    """What a plan run produced (the rows are also on disk)."""

    out_dir: Path
    rows: list[dict[str, Any]]
    chosen: dict[str, Any] | None
    closest: dict[str, Any] | None
    verdict: str
    computed: int
    reused: int


class PointStore:
    """The points table of one output directory: what is done, and rewriting it safely."""

    def __init__(self, out_dir: Path, name: str = POINTS):
        self.out_dir = out_dir
        self.name = name
        self.stem = Path(name).stem
        self.path = out_dir / name
        self._last_write = 0.0

    def load(self, keys: set[str]) -> dict[str, dict[str, Any]]:
        """Finished rows of this plan by key. Rows of other plans (other settings, SLO or seed)
        are kept aside in points.previous-N.parquet; rows that failed are dropped to be rerun."""
        if not self.path.exists():
            return {}
        import pandas as pd

        frame = pd.read_parquet(self.path)
        rows = frame.to_dict("records")
        if any(r["key"] not in keys for r in rows):
            n = 1
            while (self.out_dir / f"{self.stem}.previous-{n}.parquet").exists():
                n += 1
            frame.to_parquet(self.out_dir / f"{self.stem}.previous-{n}.parquet", index=False)
        return {r["key"]: r for r in rows if r["key"] in keys and r["status"] != "error"}

    def write(self, rows: list[dict[str, Any]], *, force: bool = True) -> None:
        """Rewrite points.parquet and points.csv (atomically), at most every FLUSH_EVERY_S
        unless forced."""
        now = time.monotonic()
        if not force and now - self._last_write < FLUSH_EVERY_S:
            return
        import pandas as pd

        frame = pd.DataFrame(sorted(rows, key=lambda r: r["index"]))
        for name, writer in ((self.name, frame.to_parquet), (f"{self.stem}.csv", frame.to_csv)):
            tmp = self.out_dir / f".{name}.tmp"
            writer(tmp, index=False)
            os.replace(tmp, self.out_dir / name)
        self._last_write = now


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray, started locally (or attached to ``address``) unless already running; shut down
    on exit only if started here."""
    try:
        import ray
    except ImportError:
        raise ConfigError("plan", RAY_INSTALL) from None
    if ray.is_initialized():
        yield ray
        return
    if address:
        try:
            ray.init(address=address, logging_level="WARNING")
        except ConnectionError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError("plan.ray_address", f"cannot attach to Ray at {address!r}: {first}") from None
    else:
        choose_local_auth()
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


def choose_local_auth() -> None:
    """Start a local Ray cluster with token authentication chosen explicitly.

    Ray 2.60 turns token authentication on for a new local cluster when ``RAY_AUTH_MODE`` is
    unset, and warns on every start that it did; setting the mode explicitly keeps the same
    protection without the warning (Ray's own ``_enable_token_auth``: the variable, for this
    process and the cluster's, and Ray's cached config). A mode the user set is kept.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # a Ray without token authentication: nothing to choose
        return
    _enable_token_auth()


def _error_row(job: PointJob, err: BaseException) -> dict[str, Any]:
    cause = getattr(err, "cause", None) or err  # a RayTaskError carries the task's exception
    lines = str(cause).strip().splitlines() or [""]
    message = f"{type(cause).__name__}: {lines[-1]}"[:500]
    return {**base_row(job), "status": "error", "reason": message}


def _run_on_ray(ray, jobs: list[PointJob], workload, slo, rows: dict[str, dict], store: PointStore,
                bar, max_in_flight: int | None = None) -> None:
    """Run every job (at most ``max_in_flight`` at once), collect rows as they finish, keep the
    table on disk current."""
    workload_ref = ray.put(workload)

    def done(job: PointJob, result) -> None:
        row = _error_row(job, result) if isinstance(result, BaseException) else result
        rows[job.key] = row
        store.write(list(rows.values()), force=False)
        bar.update(1)
        if row["status"] == "ok" and row["meets_slo"]:
            best = min(r["cost_per_hour_usd"] for r in rows.values() if r["status"] == "ok" and r["meets_slo"])
            bar.set_postfix_str(f"cheapest meeting ${best:.2f}/h", refresh=False)

    try:
        ray_map(ray, evaluate_point, [(job, (job, workload_ref, slo)) for job in jobs], done,
                max_in_flight=max_in_flight)
    finally:
        store.write(list(rows.values()))


def ray_map(ray, fn, calls: list[tuple[Any, tuple]], on_result, *,
            max_in_flight: int | None = None) -> None:
    """Run ``fn(*args)`` as a Ray task for each (tag, args) of ``calls``, at most ``max_in_flight``
    at once, calling ``on_result(tag, result_or_exception)`` as each finishes (in completion
    order). Pass large shared arguments as ``ray.put`` references."""
    task = ray.remote(num_cpus=1, max_retries=0)(fn)
    queue = list(calls)
    pending: dict[Any, Any] = {}
    limit = max_in_flight or len(queue) or 1
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                tag, args = queue.pop(0)
                pending[task.remote(*args)] = tag
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                tag = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as err:
                    result = err
                on_result(tag, result)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def run_points_plan(cfg, out_dir: str | Path, *, progress: bool = True,
                    max_in_flight: int | None = None) -> PlanOutcome:
    """Evaluate every point of ``cfg.plan`` (resuming what ``out_dir`` already holds) and
    write the tables, plan.json and the plot."""
    import yaml

    from simulator.configure import to_plain, versions
    from simulator.records.metrics import SLO
    from simulator.workload.builder import build_workload

    plain = to_plain(cfg)
    out = Path(out_dir)
    space = PlanSpace.from_config(plain)
    plan = dict(plain.get("plan") or {})
    slo = SLO.from_dict(plain.get("slo"))
    workload = build_workload(plain["workload"])
    seed = int(workload.seed)
    jobs = resolve_jobs(space, plain, workload, slo, seed)
    out.mkdir(parents=True, exist_ok=True)
    store = PointStore(out)
    rows = store.load({j.key for j in jobs})
    for job in jobs:  # a reused row takes this plan's position
        if job.key in rows:
            rows[job.key].update(index=job.point.index, label=job.point.label())
    todo = [j for j in jobs if j.key not in rows]
    reused = len(rows)
    (out / "resolved_config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    workload.save(out / "workload.parquet")
    if todo:
        from tqdm import tqdm

        with ray_session(plan.get("ray_address"), plan.get("num_cpus")) as ray, tqdm(
                total=len(jobs), initial=reused, unit="point", desc="plan points",
                disable=not progress, mininterval=0.5) as bar:
            _run_on_ray(ray, todo, workload, slo, rows, store, bar, max_in_flight)
    ordered = sorted(rows.values(), key=lambda r: r["index"])
    store.write(ordered)
    chosen, closest = choose(ordered)
    sentence = verdict(chosen, closest, slo, len(ordered))
    summary = {
        "verdict": sentence,
        "meets_slo": chosen is not None,
        "chosen": _json_row(chosen),
        "closest": _json_row(closest),
        "slo": asdict(slo),
        "seed": seed,
        "router": space.router,
        "routers": list(space.routers),
        "router_note": "round_robin: request i in arrival order to replica i mod N, replicas simulated "
                       "apart; other routers: replicas simulated together (simulator.cluster)",
        "points": {
            "total": len(ordered),
            "ran": sum(r["status"] == "ok" for r in ordered),
            "infeasible": sum(r["status"] == "infeasible" for r in ordered),
            "failed": sum(r["status"] == "error" for r in ordered),
            "meeting_slo": sum(bool(r["meets_slo"]) for r in ordered),
            "computed_this_run": len(todo),
            "reused": reused,
        },
        "workload": {"name": workload.name, "requests": len(workload), "seed": workload.seed},
        "versions": {**versions(), "ray": _ray_version()},
        "config": plain,
    }
    (out / "plan.json").write_text(json.dumps(summary, indent=2, default=json_default))
    if plain.get("plots", True):
        write_plot(ordered, slo.attainment, out / "cost_vs_attainment.png", chosen)
    return PlanOutcome(out, ordered, chosen, closest, sentence, len(todo), reused)


def _ray_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        return "not installed"


def _json_row(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def write_plot(rows: list[dict[str, Any]], target: float, path: Path, chosen: dict | None) -> Path:
    """Cost per hour against SLO attainment; points meeting the SLO filled, the chosen one ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "osD^vP*Xh<>"
    for i, hw in enumerate(dict.fromkeys(r["hardware"] for r in ran)):
        group = [r for r in ran if r["hardware"] == hw]
        for meets, style in ((True, {"color": f"C{i}"}), (False, {"facecolors": "none",
                                                                    "edgecolors": f"C{i}"})):
            pts = [r for r in group if bool(r["meets_slo"]) == meets]
            if pts:
                ax.scatter([r["cost_per_hour_usd"] for r in pts], [r["attainment"] for r in pts],
                           marker=markers[i % len(markers)], s=40, alpha=0.85,
                           label=f"{hw} ({'meets' if meets else 'misses'} SLO)", **style)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    if chosen is not None:
        ax.scatter([chosen["cost_per_hour_usd"]], [chosen["attainment"]], s=220, facecolors="none",
                   edgecolors="black", linewidths=1.5, label="cheapest meeting")
        ax.annotate(chosen["label"], (chosen["cost_per_hour_usd"], chosen["attainment"]),
                    textcoords="offset points", xytext=(8, -14), fontsize=8)
    ax.set_xlabel("cost (USD per hour)")
    ax.set_ylabel("SLO attainment (share of requests)")
    ax.set_title(f"Capacity plan: {len(ran)} points ran, {len(rows) - len(ran)} could not")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
