"""The cost/latency Pareto front of a capacity plan, its figure and a written recommendation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from simulator.records.metrics import SLO

LATENCY_NAMES = {"ttft_p99_s": "TTFT p99", "tpot_p99_s": "TPOT p99", "e2e_p99_s": "E2E p99"}


def pareto_front(rows: list[dict[str, Any]], x: str, y: str) -> list[dict[str, Any]]:
    """The rows no other row beats on both ``x`` and ``y`` (both lower is better), by ``x``.

    A row is on the front when every row at most as costly has a higher ``y``, and every row
    with at most its ``y`` costs more. Rows with a NaN in either column are left out; of rows
    equal on both, the first in ``index`` order stands for them.
    """
    usable = [r for r in rows if not (_nan(r.get(x)) or _nan(r.get(y)))]
    usable.sort(key=lambda r: (r[x], r[y], r.get("index", 0)))
    front: list[dict[str, Any]] = []
    best = math.inf
    for row in usable:
        if row[y] < best:
            front.append(row)
            best = row[y]
    return front


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def write_pareto_plot(rows: list[dict[str, Any]], front: list[dict[str, Any]], chosen: dict | None,
                      latency: str, limit_s: float | None, path: Path) -> Path:
    """Two panels: cost per hour against the latency tail at the workload's rate (the front as a
    line, layouts meeting the SLO filled, the chosen one ringed), and cost against capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ran = [r for r in rows if r["status"] == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    markers = "osD^vP*Xh<>"
    for i, hw in enumerate(dict.fromkeys(r["hardware"] for r in ran)):
        group = [r for r in ran if r["hardware"] == hw]
        for meets, style in ((True, {"color": f"C{i}"}), (False, {"facecolors": "none", "edgecolors": f"C{i}"})):
            pts = [r for r in group if bool(r["meets_slo"]) == meets]
            if pts:
                left.scatter([r["cost_per_hour_usd"] for r in pts], [r[latency] for r in pts],
                             marker=markers[i % len(markers)], s=36, alpha=0.8,
                             label=f"{hw} ({'meets' if meets else 'misses'} SLO)", **style)
        right.scatter([r["cost_per_hour_usd"] for r in group], [r["capacity_rps"] for r in group],
                      marker=markers[i % len(markers)], color=f"C{i}", s=36, alpha=0.8, label=hw)
    if front:
        left.step([r["cost_per_hour_usd"] for r in front], [r[latency] for r in front], where="post",
                  color="black", linewidth=1, label="Pareto front")
    if limit_s is not None:
        left.axhline(limit_s, color="grey", linestyle="--", linewidth=1, label=f"SLO limit {limit_s:g} s")
    if chosen is not None:
        left.scatter([chosen["cost_per_hour_usd"]], [chosen[latency]], s=220, facecolors="none",
                     edgecolors="black", linewidths=1.5, label="cheapest meeting SLO")
        left.annotate(chosen["label"], (chosen["cost_per_hour_usd"], chosen[latency]),
                      textcoords="offset points", xytext=(8, 8), fontsize=8)
    name = LATENCY_NAMES.get(latency, latency)
    left.set_yscale("log")
    left.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xlabel("cost (USD per hour)")
    left.set_ylabel(f"{name} at the workload's rate (s)")
    left.set_title(f"Cost against {name}: {len(front)} layouts on the front")
    left.legend(fontsize=7, loc="upper right")
    right.set_xlabel("cost (USD per hour)")
    right.set_ylabel("highest rate sustained within the SLO (req/s)")
    right.set_title("Capacity against cost")
    right.legend(fontsize=7, loc="upper left")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recommendation(rows: list[dict[str, Any]], front: list[dict[str, Any]], chosen: dict | None,
                   slo: SLO, latency: str, workload: str, rate: float) -> str:
    """A short markdown recommendation: the layout to use, the front, the best cost per token."""
    name = LATENCY_NAMES.get(latency, latency)
    ran = [r for r in rows if r["status"] == "ok"]
    limits = ", ".join(f"{k[:-2].upper()} <= {getattr(slo, k):g} s"
                       for k in ("ttft_s", "ttfvt_s", "tpot_s", "e2e_s") if getattr(slo, k) is not None)
    lines = ["# Capacity plan: recommendation", "",
             f"Workload `{workload}` at {rate:.3g} req/s; SLO: {limits or 'no limits'}, "
             f"{slo.attainment:.0%} of requests. {len(rows)} candidate layouts: {len(ran)} searched, "
             f"{sum(r['status'] == 'pruned' for r in rows)} pruned (dominated on cost and capacity), "
             f"{sum(r['status'] == 'infeasible' for r in rows)} cannot run.", ""]
    if chosen is None:
        lines.append("**No layout meets the SLO at this rate.** Widen the candidate lists (more "
                     "replicas, other hardware) or relax the SLO.")
    else:
        headroom = chosen["capacity_rps"] / rate if rate > 0 else math.inf
        caveat = "" if chosen["calibrated"] else " Its step times are UNCALIBRATED (roofline): treat as rough."
        lines.append(f"**Use {chosen['label']}** at ${chosen['cost_per_hour_usd']:.2f}/h: the cheapest "
                     f"layout meeting the SLO at this rate ({chosen['attainment']:.1%} of requests, "
                     f"{name} {chosen[latency]:.3g} s). It sustains up to {chosen['capacity_rps']:.3g} req/s "
                     f"({headroom:.2g}x this rate) at ${chosen['cap_cost_per_1m_output_tokens_usd']:.3g} "
                     f"per million output tokens, with KV usage peaking at {chosen['cap_kv_peak']:.0%} "
                     f"and {int(chosen['cap_preemptions'])} preemptions there.{caveat}")
    cheap = [r for r in ran if math.isfinite(r["cap_cost_per_1m_output_tokens_usd"])]
    if cheap:
        best = min(cheap, key=lambda r: (r["cap_cost_per_1m_output_tokens_usd"], r["index"]))
        lines += ["", f"Lowest cost per token when loaded to capacity: {best['label']}, "
                      f"${best['cap_cost_per_1m_output_tokens_usd']:.3g} per million output tokens "
                      f"at {best['capacity_rps']:.3g} req/s."]
    lines += ["", f"Pareto front of cost against {name} at {rate:.3g} req/s (no layout is both "
                  f"cheaper and faster):", "",
              f"| layout | $/h | {name} (s) | meets SLO | capacity (req/s) | $/1M output tokens at capacity |",
              "|---|---|---|---|---|---|"]
    for r in front:
        lines.append(f"| {r['label']} | {r['cost_per_hour_usd']:.2f} | {r[latency]:.3g} | "
                     f"{'yes' if r['meets_slo'] else 'no'} | {r['capacity_rps']:.3g} | "
                     f"{r['cap_cost_per_1m_output_tokens_usd']:.3g} |")
    return "\n".join(lines) + "\n"
