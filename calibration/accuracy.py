"""The accuracy table: every real GPU run the project ships, replayed through the simulator.

Each run (``calibration/data/live-runs/<source>/<GPU>/<model>/``: per-request
server timestamps and the engine's settings) is simulated with the requests'
own arrival times and token counts, the run's engine settings and the best
calibrated step-time model the project has for that card and model
(``perf.source=auto``; never fitted to the run), on the card as the run's
``config.json`` describes it (its GPU-to-GPU link; ``run_hardware``). Per run, signed errors
(simulated / live - 1) of TTFT and E2E at p50, p90 and p99, in two views:

- ``engine``: as the engine sees a request, from its arrival at the engine
  core (``queued_ts``) to its first and last token. The simulation's arrivals
  are these times.
- ``client``: the live run from the API server's ``arrival_time`` (another
  clock, aligned on the request that waited least for the engine core to take
  it) to the first and last token, against a second replay whose requests
  arrive at those times, plus the front-end term (``simulator.records.frontend``).
  The engine core takes new requests only between steps, so a request that
  reaches the server during a long prefill waits for it; the replay from the
  server's arrivals reproduces that wait, which the engine view's arrivals
  (already at step boundaries) do not hold. The live figure holds the server's
  input processing and that wait, but not the HTTP transfer and the streamed
  chunk's way back, which these runs do not record.

A data-parallel run of a mixture-of-experts model (several engines behind one
server, their experts shared) is replayed rank by rank by ``calibration.dp_replay``
(its method and step model are stated there), in the same two views. A run of a
dense model at data parallel > 1, or whose model or card has no configuration, is
listed with the reason.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration import catalog, dp_replay
from calibration.live_replay import DATA_DIR, live_engine_config, live_workload, load_live_run
from calibration.replay_errors import (
    METRICS,
    QUANTILES,
    VIEWS,
    error_rows,
    live_latencies,
    run_hardware,
    run_link_gbps,
)
from simulator.records.errors import ConfigError
from simulator.records.performance import PerformanceModel

RUNS_ROOT = DATA_DIR.parent
DOCS_BEGIN = "<!-- accuracy:begin (python -m calibration accuracy --update-docs) -->"
DOCS_END = "<!-- accuracy:end -->"


def shipped_runs(root: Path = RUNS_ROOT) -> list[Path]:
    """Every shipped live run folder (one holding ``vllm/requests.jsonl``)."""
    return sorted(p.parent.parent for p in root.glob("*/*/*/vllm/requests.jsonl"))


def run_name(run_dir: Path) -> str:
    return f"{run_dir.parent.name}/{run_dir.name}"


@dataclass
class RunAccuracy:
    """One run's replay: errors by (view, metric, quantile), or why it was not replayed."""

    name: str
    hardware: str = ""
    model: str = ""
    tp: int = 1
    dp: int = 1
    expert_parallel: bool = False
    requests: int = 0
    perf_model: str = ""
    calibrated: bool = False
    frontend_s: float = 0.0
    skipped: str = ""
    rows: list[dict] = field(default_factory=list)  # view, metric, quantile, live_s, sim_s, error

    @property
    def parallel(self) -> str:
        """The layout as the table shows it: ``TP 2``, ``DP 2 x TP 1``, or ``DP 2 x EP 2`` (experts over dp x tp GPUs)."""
        if self.dp == 1:
            return f"TP {self.tp}"
        return f"DP {self.dp} x EP {self.dp * self.tp}" if self.expert_parallel else f"DP {self.dp} x TP {self.tp}"

    def error(self, view: str, metric: str, q: int) -> float:
        return next(r["error"] for r in self.rows if (r["view"], r["metric"], r["quantile"]) == (view, metric, q))



def _conf_model(hf_name: str) -> str | None:
    """The conf model of the run's Hugging Face name, or of its base model's (``catalog.base_model_name``)."""
    wanted = {hf_name.lower(), catalog.base_model_name(hf_name)}
    found = {}
    for name in catalog.names("model"):
        try:
            arch = catalog.load_model(name)
        except ConfigError:  # another model's config: not this run's concern
            continue
        if (arch.hf_name or "").lower() in wanted:
            found[arch.hf_name.lower()] = arch.name
    return found.get(hf_name.lower()) or next(iter(found.values()), None)


def _hardware(run_dir: Path) -> str | None:
    from calibration.llmservingsim import GPU_DIRS_INV

    name = GPU_DIRS_INV.get(run_dir.parent.name, run_dir.parent.name.lower())
    return name if name in catalog.names("hardware") else None


def replay_run(run_dir: Path, frontend_s: float | None = None, seed: int = 0) -> RunAccuracy:
    """Simulate one live run and compare; ``frontend_s`` None: the front-end term's GPU default."""
    from calibration.registry import build_performance_model
    from simulator.engine.loop import simulate
    from simulator.records import frontend

    run = load_live_run(run_dir)
    kw = run.engine_kwargs
    hf = str(kw.get("model") or "")
    out = RunAccuracy(name=run_name(run_dir), requests=len(run.arrival_s), tp=int(kw.get("tensor_parallel_size") or 1))
    hardware, model = _hardware(run_dir), _conf_model(hf)
    out.hardware, out.model = hardware or run_dir.parent.name, model or hf
    out.dp, out.expert_parallel = int(kw.get("data_parallel_size") or 1), bool(kw.get("enable_expert_parallel"))
    if hardware is None:
        out.skipped = f"no conf/hardware for {run_dir.parent.name}"
    elif model is None:
        out.skipped = f"no conf/model with hf_name {hf}"
    elif out.dp > 1 and not catalog.load_model(model).is_moe:
        out.skipped = f"data_parallel_size {out.dp} of a dense model: plain replicas, not replayed"
    if out.skipped:
        return out
    card = run_hardware(run_dir, hardware)
    link = run_link_gbps(run_dir)
    out.hardware = f"{hardware} (link {link:g} GB/s)" if out.tp * out.dp > 1 and link else hardware

    def replay(at_api_server: bool) -> tuple[dict[str, np.ndarray], PerformanceModel]:
        if out.dp > 1:
            return dp_replay.simulate_ranks(run, run_dir, model, hardware, seed, at_api_server=at_api_server)
        config = live_engine_config(run)
        perf = build_performance_model(card, model, "none", out.tp, {"source": "auto"}, engine=config)
        result = simulate(live_workload(run, at_api_server), config, perf, seed=seed)
        done = np.asarray(result.requests["status"]) == "completed"
        return {m: np.asarray(result.requests[f"{m}_s"], dtype=float)[done] for m in METRICS}, perf

    sim, perf = replay(at_api_server=False)
    sim_client = replay(at_api_server=True)[0] if run.api_arrival_s is not None else None
    front = frontend.resolve("auto" if frontend_s is None else frontend_s, perf)
    out.perf_model, out.calibrated, out.frontend_s = perf.name, bool(perf.calibrated), front.seconds
    out.rows = error_rows(live_latencies(run), sim, front.seconds, sim_client)
    return out


def replay_all(runs: list[Path] | None = None, frontend_s: float | None = None, seed: int = 0) -> list[RunAccuracy]:
    return [replay_run(r, frontend_s, seed) for r in (runs if runs is not None else shipped_runs())]


def write_csv(results: list[RunAccuracy], path: Path) -> None:
    head = ["run", "hardware", "model", "tp", "dp", "requests", "perf_model", "calibrated", "frontend_s",
            "view", "metric", "quantile", "live_s", "sim_s", "error", "skipped"]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        for r in results:
            base = [r.name, r.hardware, r.model, r.tp, r.dp, r.requests, r.perf_model, r.calibrated, r.frontend_s]
            if r.skipped:
                w.writerow(base + ["", "", "", "", "", "", r.skipped])
            for row in r.rows:
                w.writerow(base + [row["view"], row["metric"], row["quantile"], f"{row['live_s']:.6f}",
                                   f"{row['sim_s']:.6f}", f"{row['error']:.6f}", ""])


def markdown(results: list[RunAccuracy]) -> str:
    """One line per run and view: signed errors, and the runs not replayed with the reason."""
    cols = [f"{m.upper()} p{q}" for m in ("TTFT", "E2E") for q in QUANTILES]
    lines = ["| run | parallel | step model | view | " + " | ".join(cols) + " |", "|" + "---|" * (4 + len(cols))]
    for r in results:
        if r.skipped:
            continue
        for view in VIEWS:
            if not any(row["view"] == view for row in r.rows):
                continue
            cells = [f"{r.error(view, m, q):+.1%}" for m in METRICS for q in QUANTILES]
            label = view if view == "engine" else f"client (+{1e3 * r.frontend_s:.1f} ms)"
            step = r.perf_model.split(":")[0] + ("" if r.calibrated else " (uncalibrated)")
            lines.append(f"| {r.name} | {r.parallel} | {step} | {label} | " + " | ".join(cells) + " |")
    skipped = [f"- {r.name}: not replayed ({r.skipped})" for r in results if r.skipped]
    return "\n".join(lines + ([""] + skipped if skipped else []))


def docs_section(results: list[RunAccuracy], when: str | None = None) -> str:
    when = when or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    return (f"{DOCS_BEGIN}\nMeasured {when} by `python -m calibration accuracy` (signed error, simulated / live - 1; "
            f"method in `calibration/accuracy.py`):\n\n{markdown(results)}\n{DOCS_END}")


def update_docs(path: Path, results: list[RunAccuracy]) -> None:
    """Replace the marked section of ``path`` (docs/accuracy.md) with this table."""
    text = path.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise ConfigError("--update-docs", f"{path} lacks the markers {DOCS_BEGIN!r} ... {DOCS_END!r}")
    head, rest = text.split(DOCS_BEGIN, 1)
    tail = rest.split(DOCS_END, 1)[1]
    path.write_text(head + docs_section(results) + tail)


def to_json(results: list[RunAccuracy]) -> str:
    return json.dumps([r.__dict__ for r in results], indent=1)
