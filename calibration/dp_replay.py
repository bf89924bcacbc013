"""Replay a real data-parallel, expert-parallel vLLM run of a mixture-of-experts model.

The run: LLMServingSim's live vLLM 0.19 run of Qwen3-30B-A3B-Instruct-2507 on two RTX PRO 6000
(``data_parallel_size`` 2, ``enable_expert_parallel``, tp 1; 300 ShareGPT requests at ~10 req/s,
``calibration/data/live-runs/llmservingsim``). Two engines run attention apart and their MoE layers
together (each GPU holds 64 of the 128 experts; the tokens of both are gathered before the experts
and reduce-scattered after, over the machine's 16 GB/s link from the run's ``config.json``).

The replay, stated:

- requests go to the two engines in turn, by arrival (vLLM's API server sends each to the engine
  with the fewest waiting and running requests; the run does not record which it chose);
- the engines run on one clock in lock-step, as vLLM runs the data-parallel ranks of a mixture of
  experts (``simulator.cluster.lockstep``): a round lasts as long as the slower rank's step, the
  experts priced for the tokens that meet there, and an idle rank runs a dummy batch while the
  other is busy (``lockstep=False``: each engine steps alone);
- the step model is the best calibrated one for the card and model (``perf.source=auto``:
  LLMServingSim's vLLM 0.19 layer profile of this model on this card, its MoE layer by tokens and
  experts touched, plus the expert exchange over the run's link; ``--roofline``: the composed
  roofline model). Nothing is fitted to the run.

``python -m calibration accuracy`` replays the run this way (``simulate_ranks``), in both views;
``python -m calibration.dp_replay`` prints its engine view alone (``--apart``: the engines stepping
apart, as before lock-step was modelled).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from calibration.live_replay import (
    DATA_DIR,
    LiveRun,
    live_engine_config,
    live_workload,
    load_live_run,
)
from calibration.replay_errors import error_rows, live_latencies, run_hardware
from simulator.records.performance import PerformanceModel

RUN = DATA_DIR / "RTXPRO6000" / "Qwen3-30B-A3B-Instruct-2507"


def simulate_ranks(run: LiveRun, run_dir: Path, model: str, hardware: str, seed: int = 0,
                   lockstep: bool = True, perf_source: str = "auto",
                   at_api_server: bool = False) -> tuple[dict[str, np.ndarray], PerformanceModel]:
    """Each request's simulated TTFT and E2E seconds and the step model; the requests arrive as
    the engine cores took them, or ``at_api_server`` as the API server received them
    (``live_workload``; the run's order, or the API server's)."""
    from calibration.registry import build_performance_model
    from simulator.cluster import ClusterSpec, simulate_cluster

    kw = run.engine_kwargs
    dp = int(kw.get("data_parallel_size") or 1)
    config = replace(live_engine_config(run), data_parallel_size=dp,
                     enable_expert_parallel=bool(kw.get("enable_expert_parallel")))
    card = run_hardware(run_dir, hardware)
    perf = build_performance_model(card, model, "none", int(kw.get("tensor_parallel_size") or 1),
                                   {"source": perf_source}, engine=config)
    workload = live_workload(run, at_api_server)
    ranks = ClusterSpec(replicas=dp, router="round_robin", lockstep=lockstep)  # request i to engine i % dp
    result = simulate_cluster(workload, config, perf, ranks, seed=seed).result
    status = np.asarray(result.requests["status"])
    if not (status == "completed").all():
        raise RuntimeError(f"{int((status != 'completed').sum())} requests not completed")
    return {metric: np.asarray(result.requests[f"{metric}_s"], dtype=float) for metric in ("ttft", "e2e")}, perf


def replay(run_dir: Path = RUN, model: str = "qwen3-30b-a3b", hardware: str = "rtxpro6000",
           seed: int = 0, lockstep: bool = True, perf_source: str = "auto") -> dict:
    """Simulated vs live TTFT and E2E (engine view) at p50/p90/p99, with the signed errors."""
    run = load_live_run(run_dir)
    sim, perf = simulate_ranks(run, run_dir, model, hardware, seed, lockstep, perf_source)
    live = {key: v for key, v in live_latencies(run).items() if key[0] == "engine"}
    return {"run": f"{run_dir.parent.name}/{run_dir.name}", "perf_model": perf.name,
            "dp": int(run.engine_kwargs.get("data_parallel_size") or 1), "rows": error_rows(live, sim),
            "describe": perf.describe()}


if __name__ == "__main__":  # python -m calibration.dp_replay [--apart] [--roofline]
    import sys

    out = replay(lockstep="--apart" not in sys.argv[1:], perf_source="roofline" if "--roofline" in sys.argv else "auto")
    print(out["run"], out["perf_model"], "(engines in lock-step)" if "--apart" not in sys.argv[1:]
          else "(engines stepping apart)")
    for r in out["rows"]:
        print(f"{r['metric'].upper()} p{r['quantile']}: live {r['live_s']:.3f} s, sim {r['sim_s']:.3f} s, "
              f"{r['error']:+.1%}")
