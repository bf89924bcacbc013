"""`python -m simulator.plan plan=day`: the cheapest replica count per window of a day of traffic.

For each layout family of the plan (hardware, model, TP, optimization, engine settings):

1. the capacity of one replica, by the rate search (``simulator.planning.rate_search``) on the busiest
   window's requests;
2. per window of the profile (ServeGen's 144 ten-minute windows, or a piecewise workload's
   windows), the first guess ``ceil(rate / capacity)`` replicas (at least ``min_replicas``),
   checked by simulating the window's first ``window_s`` seconds of requests (at most
   ``max_window_requests``; the window's own arrival law and lengths): fewer replicas are tried
   while the window is still sustained, more until it is (``check_window``);
3. the day's cost (each window's replicas for its duration) against a fixed fleet sized for the
   peak window for the whole day.

Writes ``day_plan.parquet`` / ``day_plan.csv`` (a row per family and window), ``plan.json``,
``day_plan.png`` and ``recommendation.md``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simulator.planning.planner import PointJob, gpus_per_replica
from simulator.records.errors import ConfigError
from simulator.records.metrics import SLO

DAY_KINDS = ("servegen", "piecewise")


@dataclass(frozen=True)
class Window:
    """One window of the day: where it starts in the profile's cycle, how long, how busy."""

    index: int
    start_s: float
    duration_s: float
    rate: float


@dataclass(frozen=True)
class DaySettings:
    """``plan.day``."""

    duration_s: float | None = None  # null: 24 h of ServeGen, one cycle of a piecewise profile
    window_s: float = 120.0          # simulate the first this many seconds of each window
    max_window_requests: int = 5000  # ... and at most this many of its requests
    min_replicas: int = 1
    max_replicas: int = 256

    @classmethod
    def from_dict(cls, data) -> DaySettings:
        data = {k: v for k, v in dict(data or {}).items() if v is not None}
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError("plan.day", f"unknown fields {unknown}; allowed: "
                                          f"{', '.join(cls.__dataclass_fields__)}")
        for key in ("max_window_requests", "min_replicas", "max_replicas"):
            value = data.get(key, getattr(cls, key))
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"plan.day.{key}", f"must be an integer >= 1, got {value!r}")
        for key in ("duration_s", "window_s"):
            d = data.get(key, 1.0)
            if isinstance(d, bool) or not isinstance(d, int | float) or not d > 0:
                raise ConfigError(f"plan.day.{key}", f"must be a number of seconds > 0, got {d!r}")
        settings = cls(**data)
        if settings.max_replicas < settings.min_replicas:
            raise ConfigError("plan.day.max_replicas", f"must be >= min_replicas "
                                                       f"({settings.min_replicas}), got {settings.max_replicas}")
        return settings


def day_windows(workload_cfg: dict[str, Any], duration_s: float | None) -> list[Window]:
    """The windows of the workload's rate profile from its ``start_s``, over ``duration_s``."""
    from simulator.workload.builder import SERVEGEN_DAY_S, _rotate, _scale_rates

    kind = workload_cfg.get("kind")
    if kind not in DAY_KINDS:
        raise ConfigError("workload.kind", f"a day plan needs a rate profile: {', '.join(DAY_KINDS)}, got "
                                           f"{kind!r} (e.g. workload=servegen)")
    if kind == "servegen":
        from simulator.workload.builder import _servegen_clients
        from simulator.workload.traces import (
            read_servegen_client,
            resolve_path,
            servegen_client_ids,
        )

        directory = workload_cfg.get("path")
        resolve_path(directory, "workload.path", directory=True)
        clients = _servegen_clients(workload_cfg.get("clients", "all"), servegen_client_ids(directory))
        data = [read_servegen_client(directory, c) for c in clients]
        lengths = [w.duration_s for w in data[0].windows]
        rates = np.sum([[w.rate for w in d.windows] for d in data], axis=0)
        from simulator.workload.arrivals import RateWindow

        windows = [RateWindow(d, float(r)) for d, r in zip(lengths, rates, strict=True)]
        cycle = SERVEGEN_DAY_S
    else:
        from simulator.workload.arrivals import windows_from_config
        from simulator.workload.traces import read_servegen_trace, resolve_path

        if workload_cfg.get("windows") is not None:
            windows = windows_from_config(workload_cfg["windows"])
        else:
            windows = list(read_servegen_trace(resolve_path(workload_cfg["windows_from"],
                                                            "workload.windows_from"))[1])
        cycle = sum(w.duration_s for w in windows)
    start = float(workload_cfg.get("start_s", 0.0) or 0.0)
    windows = _scale_rates(_rotate(windows, start), workload_cfg.get("rate_scale", 1.0))
    total = duration_s or cycle
    out, t = [], 0.0
    while t < total - 1e-9:
        w = windows[len(out) % len(windows)]
        length = min(w.duration_s, total - t)
        out.append(Window(len(out), math.fmod(start + t, cycle), length, float(w.rate)))
        t += length
    return out


def window_workload(workload_cfg: dict[str, Any], window: Window, settings: DaySettings):
    """The requests of a window's first ``window_s`` (at most ``max_window_requests``), or None
    for a (nearly) silent one."""
    from simulator.workload.builder import build_workload

    span = min(settings.window_s, window.duration_s)
    n = min(settings.max_window_requests, round(window.rate * span))
    if n < 2:
        return None
    cfg = {**workload_cfg, "start_s": window.start_s, "num_requests": int(n), "duration_s": None}
    return build_workload(cfg)


def check_window(job: PointJob, workload_cfg: dict[str, Any], window: Window, guess: int, slo: SLO,
                 max_backlog: float, settings: DaySettings) -> dict[str, Any]:
    """The fewest replicas (from ``guess``) sustaining the window, and the metrics there."""
    from simulator.planning.layout import build_layout, simulate_layout
    from simulator.planning.rate_search import sustains

    started = time.perf_counter()
    row = {"family": family_label(job), "window": window.index, "start_s": window.start_s,
           "time_of_day": _clock(window.start_s), "duration_s": window.duration_s, "rate_rps": window.rate}
    workload = window_workload(workload_cfg, window, settings)
    price = gpus_per_replica(job) * float(job.hardware.get("price_per_gpu_hour_usd", 0.0) or 0.0)
    if workload is None:
        n = settings.min_replicas
        row.update(replicas=n, simulated_requests=0, sustains=True, limit="silent window", attainment=math.nan,
                   ttft_p99_s=math.nan, tpot_p99_s=math.nan, kv_peak=math.nan, preemptions=0, checks=0)
    else:
        layout = build_layout(job)
        tried: dict[int, tuple[bool, str, dict]] = {}

        def run(n: int) -> bool:
            metrics = simulate_layout(layout.with_replicas(n), workload, slo)
            ok, why = sustains(metrics, slo, max_backlog)
            tried[n] = (ok, why, metrics)
            return ok

        n = min(max(guess, settings.min_replicas), settings.max_replicas)
        if run(n):
            while n > settings.min_replicas and run(n - 1):
                n -= 1
        else:
            while n < settings.max_replicas and not run(n + 1):
                n += 1
            n = min(n + 1, settings.max_replicas)
        ok, why, metrics = tried[n]
        row.update(replicas=n, simulated_requests=len(workload), sustains=ok, limit=why,
                   attainment=metrics["attainment"], ttft_p99_s=metrics["ttft_p99_s"],
                   tpot_p99_s=metrics["tpot_p99_s"], kv_peak=metrics["kv_peak"],
                   preemptions=metrics["preemptions"], checks=len(tried))
    row["gpus"] = row["replicas"] * gpus_per_replica(job)
    row["cost_usd"] = row["replicas"] * price * window.duration_s / 3600.0
    row["wall_s"] = time.perf_counter() - started
    return row


def family_label(job: PointJob) -> str:
    """A family's name: its layout label without the replica count."""
    return job.point.label().replace(f" x{job.point.replicas} ", " ", 1)


def _clock(seconds: float) -> str:
    s = int(seconds) % 86400
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}"


def family_summary(name: str, job: PointJob, cap: dict[str, Any], mine: list[dict[str, Any]],
                   errors: list[dict[str, Any]], num_windows: int) -> dict[str, Any]:
    """A family's line of the plan: its capacity search and, when every window was checked,
    the day's cost; a window that failed leaves it uncosted, with the error as its reason."""
    entry = {"family": name, "status": cap["status"], "reason": cap.get("reason", ""),
             "capacity_per_replica_rps": cap["capacity_rps"] / job.point.replicas if cap["status"] == "ok" else None,
             "calibrated": bool(cap.get("calibrated", False))}
    if errors:
        entry.update(status="error", reason=f"{len(errors)} window(s) failed, e.g. window "
                                            f"{errors[0]['window']}: {errors[0]['error']}")
    elif mine and len(mine) == num_windows:
        price = gpus_per_replica(job) * float(job.hardware.get("price_per_gpu_hour_usd", 0.0) or 0.0)
        entry.update(day_costs(mine, price), windows_unsustained=sum(not r["sustains"] for r in mine))
    return entry


def day_costs(rows: list[dict[str, Any]], price_per_replica_hour: float) -> dict[str, float]:
    """The day's cost following the plan, and that of a fixed fleet sized for the peak window."""
    hours = sum(r["duration_s"] for r in rows) / 3600.0
    planned = sum(r["cost_usd"] for r in rows)
    peak = max(r["replicas"] for r in rows)
    fixed = peak * price_per_replica_hour * hours
    return {"hours": hours, "planned_usd": planned, "peak_replicas": peak, "fixed_fleet_usd": fixed,
            "saving_share": 1 - planned / fixed if fixed > 0 else 0.0,
            "replica_hours": sum(r["replicas"] * r["duration_s"] for r in rows) / 3600.0}


def run_day_plan(cfg, out_dir: str | Path, *, progress: bool = True, max_in_flight: int | None = None):
    """Plan a day for every family of ``cfg.plan`` (see the module docstring)."""
    import json

    import yaml

    from simulator.configure import to_plain, versions
    from simulator.planning.capacity import PlannerSearch, search_point
    from simulator.planning.planner import PlanSpace, resolve_jobs
    from simulator.planning.runner import (
        PlanOutcome,
        PointStore,
        _ray_version,
        ray_map,
        ray_session,
    )
    from simulator.records.run_result import json_default

    plain = to_plain(cfg)
    out = Path(out_dir)
    plan = dict(plain.get("plan") or {})
    space = PlanSpace.from_config(plain)
    search = PlannerSearch.from_dict(plan.get("search"))
    settings = DaySettings.from_dict(plan.get("day"))
    slo = SLO.from_dict(plain.get("slo"))
    workload_cfg = dict(plain["workload"])
    windows = day_windows(workload_cfg, settings.duration_s)
    if not any(w.rate > 0 for w in windows):
        raise ConfigError("workload", "every window of the day is silent (rate 0)")
    busiest = max(windows, key=lambda w: (w.rate, -w.index))
    reference = window_workload(workload_cfg, busiest, settings)
    jobs = resolve_jobs(space, plain, reference, slo, int(workload_cfg.get("seed", 0) or 0))
    families: dict[str, PointJob] = {}  # one job per family: its smallest replica count
    for job in sorted(jobs, key=lambda j: j.point.replicas):
        families.setdefault(family_label(job), job)
    bases = list(families.values())
    out.mkdir(parents=True, exist_ok=True)
    (out / "resolved_config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    started = time.perf_counter()
    capacity: dict[str, dict] = {}
    rows: list[dict[str, Any]] = []
    from tqdm import tqdm

    with ray_session(plan.get("ray_address"), plan.get("num_cpus")) as ray, tqdm(
            total=len(bases) * (1 + len(windows)), unit="task", desc="day plan", disable=not progress,
            mininterval=0.5) as bar:
        def searched(job, result) -> None:
            capacity[family_label(job)] = result if isinstance(result, dict) else {
                "status": "error", "reason": f"{type(result).__name__}: {result}"}
            bar.update(1)

        ref = ray.put(reference)
        ray_map(ray, search_point, [(j, (j, ref, slo, search)) for j in bases], searched,
                max_in_flight=max_in_flight)
        calls = []
        for job in bases:
            cap = capacity[family_label(job)]
            if cap["status"] != "ok" or not cap["capacity_rps"] > 0:
                bar.update(len(windows))
                continue
            per_replica = cap["capacity_rps"] / job.point.replicas
            for w in windows:
                guess = math.ceil(w.rate / per_replica) if w.rate > 0 else settings.min_replicas
                calls.append(((job, w), (job, workload_cfg, w, guess, slo, search.settings.max_backlog, settings)))

        def checked(tag, result) -> None:
            job, w = tag
            if isinstance(result, BaseException):  # (a Ray task's error: its message's last line)
                lines = [line for line in str(result).splitlines() if line.strip()] or [type(result).__name__]
                result = {"family": family_label(job), "window": w.index, "error": lines[-1].strip()}
            rows.append(result)
            bar.update(1)

        ray_map(ray, check_window, calls, checked, max_in_flight=max_in_flight)
    failed = [r for r in rows if "error" in r]
    rows = sorted((r for r in rows if "error" not in r), key=lambda r: (r["family"], r["window"]))
    store = PointStore(out, "day_plan.parquet")
    for i, r in enumerate(rows):
        r["index"] = i
    store.write(rows)
    summaries = [family_summary(name, job, capacity[name], [r for r in rows if r["family"] == name],
                                [r for r in failed if r["family"] == name], len(windows))
                 for name, job in families.items()]
    costed = [s for s in summaries if "planned_usd" in s]
    best = min(costed, key=lambda s: s["planned_usd"]) if costed else None
    text = day_recommendation(summaries, best, windows, slo, workload_cfg)
    (out / "recommendation.md").write_text(text)
    sentence = text.splitlines()[2].replace("**", "") if best else "no family could be planned (see plan.json)"
    summary = {"verdict": sentence, "mode": "day", "best": best, "families": summaries,
               "windows": len(windows), "busiest_window": asdict(busiest), "slo": asdict(slo),
               "search": asdict(search), "day": asdict(settings), "failed_windows": failed,
               "wall_s": time.perf_counter() - started,
               "versions": {**versions(), "ray": _ray_version()}, "config": plain}
    (out / "plan.json").write_text(json.dumps(summary, indent=2, default=json_default))
    if plain.get("plots", True) and rows:
        write_day_plot(rows, windows, out / "day_plan.png")
    chosen = None if best is None else {**best, "label": best["family"]}
    return PlanOutcome(out, rows, chosen, chosen, sentence, len(bases) + len(rows), 0)


def day_recommendation(summaries: list[dict], best: dict | None, windows: list[Window], slo: SLO,
                       workload_cfg: dict) -> str:
    """Markdown: the family to run, its day cost against a fixed peak fleet, per family."""
    hours = sum(w.duration_s for w in windows) / 3600
    lines = ["# Day plan: recommendation", ""]
    if best is None:
        lines += ["No family could be planned: each cannot run, sustains no rate or had windows that failed "
                  "(see the table and plan.json).", ""]
    else:
        lines += [f"Run **{best['family']}**, scaled window by window: ${best['planned_usd']:.2f} for the "
                  f"{hours:.3g} h against ${best['fixed_fleet_usd']:.2f} for a fixed fleet of "
                  f"{best['peak_replicas']} replicas sized for the peak ({best['saving_share']:.0%} less, "
                  f"{best['replica_hours']:.1f} replica-hours).", ""]
    lines += [f"Profile: `{workload_cfg.get('name')}`, {len(windows)} windows, "
              f"{min(w.rate for w in windows):.3g}-{max(w.rate for w in windows):.3g} req/s; SLO attainment "
              f"{slo.attainment:.0%}.", "",
              "| family | capacity per replica (req/s) | peak replicas | planned $ | fixed-fleet $ | saving |",
              "|---|---|---|---|---|---|"]
    for s in summaries:
        if "planned_usd" in s:
            lines.append(f"| {s['family']} | {s['capacity_per_replica_rps']:.3g} | {s['peak_replicas']} | "
                         f"{s['planned_usd']:.2f} | {s['fixed_fleet_usd']:.2f} | {s['saving_share']:.0%} |")
        else:
            lines.append(f"| {s['family']} | - | - | - | - | {s['status']}: {s['reason'][:80]} |")
    return "\n".join(lines) + "\n"


def write_day_plot(rows: list[dict[str, Any]], windows: list[Window], path: Path) -> Path:
    """The day's arrival rate (top) and each family's replicas per window (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    t = np.cumsum([0.0] + [w.duration_s for w in windows]) / 3600
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    top.stairs([w.rate for w in windows], t, color="C0", baseline=None)
    top.set_ylabel("arrival rate (req/s)")
    top.set_title("A day of traffic: rate and the replicas that sustain it")
    for i, name in enumerate(dict.fromkeys(r["family"] for r in rows)):
        mine = sorted((r for r in rows if r["family"] == name), key=lambda r: r["window"])
        if len(mine) == len(windows):
            bottom.stairs([r["replicas"] for r in mine], t, color=f"C{i + 1}", label=name, baseline=None)
            bottom.axhline(max(r["replicas"] for r in mine), color=f"C{i + 1}", linestyle=":", linewidth=1)
    bottom.set_ylabel("replicas (dotted: fixed peak fleet)")
    bottom.set_ylim(bottom=0)
    bottom.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bottom.set_xlabel("hours from the start of the plan")
    bottom.legend(fontsize=7)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
