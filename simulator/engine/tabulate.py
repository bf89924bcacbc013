"""From what the engine produced (an EngineRun) to the RunResult record."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.engine.interface import SchedulerOutput
from simulator.engine.request import Status
from simulator.engine.run_log import EngineRun
from simulator.records.metrics import REQUEST_COLUMNS, SLO, TIMELINE_COLUMNS, summarize
from simulator.records.run_result import RunResult
from simulator.records.workload import Workload

STATUS_NAMES = {Status.FINISHED: "completed", Status.REJECTED: "rejected", Status.ABORTED: "aborted",
                # only in a run stopped early (simulate(stop_on_interrupt=True))
                Status.WAITING: "unfinished", Status.RUNNING: "unfinished", Status.PREEMPTED: "unfinished"}



@dataclass
class SimulatedRun(RunResult):
    """A simulated run's RunResult; ``decisions`` holds every step's SchedulerOutput, in order,
    when ``simulate(keep_decisions=True)`` asked for them (else None)."""

    decisions: list[SchedulerOutput] | None = None
    #: which of the engine's paths ran: "compiled", "fast" or "step by step" ("": not said)
    engine_path: str = ""
    #: why a run asked to be compiled was not ("": it was, or was not asked)
    not_compiled: str = ""


def kv_usage(used: np.ndarray, num_blocks: int, out: np.ndarray | None = None) -> np.ndarray:
    """KV usage from blocks used, as vLLM reports it (the null block excluded)."""
    return np.true_divide(used, max(num_blocks - 1, 1), out=out)


def timeline_columns(steps: dict[str, np.ndarray], usage: np.ndarray) -> dict[str, np.ndarray]:
    """The timeline table (TIMELINE_COLUMNS) from an engine's step columns (``StepLog.columns``)
    and its KV usage per step (``kv_usage``)."""
    return {
        "time_s": steps["end_s"],
        "step_time_s": steps["step_s"],
        "running": steps["running"],
        "waiting": steps["waiting"],
        "kv_blocks_used": steps["kv_blocks_used"],
        "kv_usage": usage,
        "prefill_tokens": steps["prefill_tokens"],
        "decode_tokens": steps["decode_tokens"],
        "batch_size": steps["batch_size"],
        "preempted": steps["preempted"],
    }


def tabulate(run: EngineRun, workload: Workload, slo: SLO,
             timeline: dict[str, np.ndarray] | None = None) -> SimulatedRun:
    """Turn an EngineRun into request and timeline columns and a summary (``timeline``: its
    timeline table where the caller made it, ``timeline_columns``; a cluster's replicas get
    views of the cluster's)."""
    reqs = run.requests
    n = len(reqs)
    nan = np.nan

    def col(getter, dtype=float):
        return np.fromiter((getter(r) for r in reqs), dtype=dtype, count=n)

    arrival = col(lambda r: r.arrival_s)
    first_sched = col(lambda r: r.first_scheduled_s if r.first_scheduled_s >= 0 else nan)
    first_tok = col(lambda r: r.first_token_s if r.first_token_s >= 0 else nan)
    first_vis = col(lambda r: r.first_visible_s if r.first_visible_s >= 0 else nan)
    last_tok = col(lambda r: r.last_token_s if r.last_token_s >= 0 else nan)
    finish = col(lambda r: r.finish_s)
    out_tokens = col(lambda r: r.num_output, np.int64)
    completed = np.array([r.status == Status.FINISHED for r in reqs], dtype=bool)
    status = np.array([STATUS_NAMES.get(r.status, "failed") for r in reqs], dtype=object)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out_tokens > 1, (last_tok - first_tok) / (out_tokens - 1), nan)
    e2e = np.where(completed, finish - arrival, nan)
    queue = np.where(np.isfinite(first_sched), first_sched - arrival, nan)
    block_seconds = np.array([run.block_seconds.get(r.rid, 0.0) for r in reqs], dtype=float)
    block_seconds *= 1.0
    rid = np.array([r.rid for r in reqs], dtype=np.int64)
    requests = {
        "request_id": rid,
        "arrival_s": arrival,
        "domain": workload.domain[rid].astype(str).astype(object) if n else np.array([], object),
        "prompt_tokens": col(lambda r: r.num_prompt, np.int64),
        "output_tokens": out_tokens,
        "reasoning_tokens": col(lambda r: min(r.reasoning_tokens, r.num_output), np.int64),
        "status": status,
        "queue_s": queue,
        "ttft_s": first_tok - arrival,
        "ttfvt_s": first_vis - arrival,
        "tpot_s": tpot,
        "e2e_s": e2e,
        "finish_s": finish,
        "preemptions": col(lambda r: r.num_preemptions, np.int64),
        "kv_block_seconds": block_seconds,
        "reject_reason": np.array([r.reject_reason for r in reqs], dtype=object),
    }
    if timeline is None:
        steps = run.steps.columns()
        timeline = timeline_columns(steps, kv_usage(steps["kv_blocks_used"], run.kv.num_blocks))
    assert tuple(requests) == REQUEST_COLUMNS and tuple(timeline) == TIMELINE_COLUMNS
    summary = summarize(requests, timeline, slo, run.end_s)
    summary.sections["kv_cache"] = {
        "num_blocks": run.kv.num_blocks,
        "block_size": run.kv.block_size,
        "bytes_per_token": run.kv.bytes_per_token,
        "capacity_tokens": run.kv.num_tokens,
    }
    summary.sections["prefix_cache"] = {
        "queried_tokens": run.prefix_queries,
        "hit_tokens": run.prefix_hits,
        "hit_rate": run.prefix_hits / run.prefix_queries if run.prefix_queries else 0.0,
    }
    return SimulatedRun(requests=requests, timeline=timeline, summary=summary)
