"""Replay a real vLLM run through the simulator and compare (check 3 of the calibration issue).

The run: LLMServingSim's live vLLM 0.19 run of Llama-3.1-8B on one RTX PRO 6000
(300 ShareGPT requests at ~10 req/s, max_num_seqs 128, max_num_batched_tokens
2048), shipped in ``calibration/data/live-runs/llmservingsim``. Its requests
carry server-side timestamps (queued, scheduled, first token, last token);
its 1 s time series carries running and waiting counts.

Two gaps in that data, and what is done about them:

- ``meta.json`` records no ``num_gpu_blocks``, and the series' ``kv_cache_pct``
  column is 0.0 throughout (the logger did not capture it). The KV capacity is
  therefore vLLM's sizing for that card (``MemoryModel`` at the run's
  gpu_memory_utilization 0.9), and the live KV usage is reconstructed from the
  request timestamps: a request holds ceil((prompt + generated) / block_size)
  blocks from its scheduling to its last token, its generated tokens growing
  linearly between first and last token. The run never comes near the cache's
  capacity (peak ~30%), so the capacity itself does not steer it.
- The step-time model comes from LLMServingSim's layer profile of the same card
  and model (``perf.source=llmservingsim``), not from this run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError
from simulator.records.workload import Workload

DATA_DIR = Path(__file__).resolve().parent / "data" / "live-runs" / "llmservingsim"
DEFAULT_RUN = DATA_DIR / "RTXPRO6000" / "Llama-3.1-8B"


@dataclass(frozen=True)
class LiveRun:
    """One live run: per-request timings (seconds from the first arrival) and the 1 s series."""

    arrival_s: np.ndarray
    scheduled_s: np.ndarray
    first_token_s: np.ndarray
    last_token_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    series: dict[str, np.ndarray]
    engine_kwargs: dict
    name: str
    #: arrival at the API server (its ``arrival_time``, another clock), aligned so that the
    #: request that waited least for the engine to take it waited zero; None if not recorded
    api_arrival_s: np.ndarray | None = None

    @property
    def ttft_s(self) -> np.ndarray:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> np.ndarray:
        return self.last_token_s - self.arrival_s


def load_live_run(run_dir: str | Path = DEFAULT_RUN) -> LiveRun:
    """Read ``vllm/requests.jsonl``, ``vllm/timeseries.csv`` and ``vllm/meta.json``."""
    run_dir = Path(run_dir)
    vdir = run_dir / "vllm"
    for name in ("requests.jsonl", "timeseries.csv", "meta.json"):
        if not (vdir / name).exists():
            raise ConfigError("run_dir", f"{vdir} has no {name}")
    rows = [json.loads(line) for line in (vdir / "requests.jsonl").read_text().splitlines() if line.strip()]
    need = {"input_toks", "output_toks", "queued_ts", "scheduled_ts", "first_token_ts", "last_token_ts"}
    for i, row in enumerate(rows):
        if need - set(row):
            raise ConfigError("run_dir", f"requests.jsonl row {i} lacks {sorted(need - set(row))}")
    rows.sort(key=lambda r: r["queued_ts"])
    t0 = rows[0]["queued_ts"]

    def col(key, dtype=float):
        return np.array([r[key] for r in rows], dtype=dtype)

    import csv

    with (vdir / "timeseries.csv").open() as fh:
        table = list(csv.DictReader(fh))
    series = {key: np.array([float(r[key]) for r in table]) for key in table[0]} if table else {}
    meta = json.loads((vdir / "meta.json").read_text())
    api = None
    if all("arrival_time" in r for r in rows):
        gap = col("queued_ts") - col("arrival_time")  # a constant clock offset plus the front end's time
        api = col("arrival_time") + gap.min() - t0
    return LiveRun(
        arrival_s=col("queued_ts") - t0,
        scheduled_s=col("scheduled_ts") - t0,
        first_token_s=col("first_token_ts") - t0,
        last_token_s=col("last_token_ts") - t0,
        prompt_tokens=col("input_toks", np.int64),
        output_tokens=col("output_toks", np.int64),
        series=series,
        engine_kwargs=dict(meta.get("engine_kwargs", {})),
        name=f"{run_dir.parent.name}/{run_dir.name}",
        api_arrival_s=api,
    )


def live_workload(run: LiveRun, at_api_server: bool = False) -> Workload:
    """The run's requests as a Workload (exact token counts), arriving when the engine core took
    them (``queued_ts``) or, ``at_api_server``, when the API server received them (``arrival_time``,
    aligned; then ordered by that time and shifted to start at 0)."""
    n = len(run.arrival_s)
    arrivals, order = run.arrival_s, np.arange(n)
    if at_api_server:
        if run.api_arrival_s is None:
            raise ConfigError("run_dir", f"{run.name} records no API-server arrival_time")
        order = np.argsort(run.api_arrival_s, kind="stable")
        arrivals = run.api_arrival_s[order] - run.api_arrival_s.min()
    return Workload(arrival_s=arrivals, prompt_tokens=run.prompt_tokens[order], output_tokens=run.output_tokens[order],
                    reasoning_tokens=np.zeros(n, np.int64), domain=np.full(n, "chat", object),
                    name=f"live:{run.name}")


def live_engine_config(run: LiveRun, block_size: int = 16, max_model_len: int = 131072) -> EngineConfig:
    """vLLM 0.19's settings for the run (its engine kwargs on top of vLLM's defaults)."""
    kw = run.engine_kwargs
    return EngineConfig(block_size=block_size, max_num_seqs=int(kw.get("max_num_seqs") or 1024),
                        max_num_batched_tokens=int(kw.get("max_num_batched_tokens") or 8192),
                        max_model_len=int(kw.get("max_model_len") or max_model_len),
                        gpu_memory_utilization=float(kw.get("gpu_memory_utilization") or 0.9))


def reconstructed_kv_blocks(run: LiveRun, grid_s: np.ndarray, block_size: int) -> np.ndarray:
    """KV blocks the live requests held at each grid time (see the module docstring)."""
    out = np.zeros(len(grid_s))
    for i in range(len(run.arrival_s)):
        start, first, last = run.scheduled_s[i], run.first_token_s[i], run.last_token_s[i]
        active = (grid_s >= start) & (grid_s < last)
        if not active.any():
            continue
        t = grid_s[active]
        span = max(last - first, 1e-9)
        generated = np.where(t < first, 0.0, 1 + (run.output_tokens[i] - 1) * np.clip((t - first) / span, 0, 1))
        out[active] += np.ceil((run.prompt_tokens[i] + generated) / block_size)
    return out


def on_grid(time_s: np.ndarray, values: np.ndarray, grid_s: np.ndarray) -> np.ndarray:
    """A step-wise series (value holds from its time on) sampled at grid times."""
    idx = np.searchsorted(time_s, grid_s, side="right") - 1
    return np.where(idx >= 0, np.asarray(values, dtype=float)[np.clip(idx, 0, None)], 0.0)


@dataclass
class ReplayReport:
    """Live vs simulated: latency percentiles, and series on the live 1 s grid."""

    latency: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> {live, sim, rel_error}
    series: dict[str, dict[str, float]] = field(default_factory=dict)   # series -> error measures
    kv_capacity_blocks: int = 0
    perf_model: str = ""

    def lines(self) -> list[str]:
        out = [f"performance model: {self.perf_model}; KV capacity {self.kv_capacity_blocks} blocks"]
        for key, v in self.latency.items():
            out.append(f"{key:10s} live {v['live']:8.3f} s   sim {v['sim']:8.3f} s   error {v['rel_error']:+.1%}")
        for key, v in self.series.items():
            out.append(f"{key:10s} " + "  ".join(f"{k} {val:.3f}" for k, val in v.items()))
        return out


def compare(run: LiveRun, result, kv_blocks: int, block_size: int = 16) -> ReplayReport:
    """Compare a simulated RunResult with the live run."""
    report = ReplayReport(kv_capacity_blocks=int(kv_blocks))
    sim_req = result.requests
    sim_ttft = np.asarray(sim_req["ttft_s"], dtype=float)
    sim_e2e = np.asarray(sim_req["e2e_s"], dtype=float)
    for name, live, sim in (("ttft", run.ttft_s, sim_ttft), ("e2e", run.e2e_s, sim_e2e)):
        for q in (50, 99):
            lv = float(np.percentile(live, q))
            sv = float(np.nanpercentile(sim, q))
            report.latency[f"{name}_p{q}"] = {"live": lv, "sim": sv, "rel_error": sv / lv - 1}
    grid = run.series["t"]
    tl = result.timeline
    time_s = np.asarray(tl["time_s"], dtype=float)
    for key in ("running", "waiting"):
        live = run.series[key]
        sim = on_grid(time_s, tl[key], grid)
        report.series[key] = {"mae": float(np.mean(np.abs(sim - live))), "live_mean": float(live.mean()),
                              "sim_mean": float(sim.mean())}
    live_kv = reconstructed_kv_blocks(run, grid, block_size) / kv_blocks
    sim_kv = on_grid(time_s, tl["kv_usage"], grid)
    report.series["kv_usage"] = {
        "mae": float(np.mean(np.abs(sim_kv - live_kv))),
        "live_mean": float(live_kv.mean()), "sim_mean": float(sim_kv.mean()),
        "live_peak": float(live_kv.max()), "sim_peak": float(sim_kv.max()),
    }
    return report


def replay(run_dir: str | Path = DEFAULT_RUN, hardware: str = "rtxpro6000", model: str = "llama-3.1-8b",
           perf_source: str = "llmservingsim", seed: int = 0) -> ReplayReport:
    """Simulate the live run's workload with a model of its card and compare."""
    from calibration.registry import build_performance_model
    from simulator.engine.loop import simulate

    run = load_live_run(run_dir)
    config = live_engine_config(run)
    perf = build_performance_model(hardware, model, "none", int(run.engine_kwargs.get("tensor_parallel_size") or 1),
                                   {"source": perf_source}, engine=config)
    kv = perf.kv_capacity(config.block_size, config.gpu_memory_utilization)
    result = simulate(live_workload(run), config, perf, seed=seed)
    report = compare(run, result, kv.num_blocks, config.block_size)
    report.perf_model = perf.name
    return report


if __name__ == "__main__":
    print("\n".join(replay().lines()))
