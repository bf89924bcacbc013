"""Turn what a live run observed into the simulator's RunResult schema.

``requests`` has simulator.records.metrics.REQUEST_COLUMNS first, then live extras;
``timeline`` has TIMELINE_COLUMNS, one row per engine step from the server's
iteration log. The summary comes from simulator.records.metrics.summarize, the very
function that summarises simulated runs, with what only the server knows
(preemptions, prefix-cache and speculative-decoding counters) filled in from
its /metrics counters.

What a client cannot see, and how it is filled:
- ``queue_s``: NaN (the server does not report it per request).
- ``preemptions`` per request: 0; the run's total is the server's counter
  (``summary.preemptions``), and ``summary.requests_preempted`` is None.
- ``kv_block_seconds``: estimated from the token times, as the blocks a
  request needs for its prompt plus the tokens it has so far, integrated from
  its first to its last token.
- timeline ``running``: requests scheduled in the step (under vLLM's
  synchronous scheduling, all running requests unless the token budget binds);
  ``waiting``: the last /metrics sample; ``preempted``: increases of the
  preemption counter, put on the last step before the sample that saw them;
  ``step_time_s``: the logged elapsed time plus the measured inter-step gap;
  ``prefill_tokens`` includes prompts recomputed after a preemption (vLLM
  logs those as generation tokens).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from profiler.live.client import RequestRecord
from profiler.live.iteration_log import inter_step_gap
from simulator.records.metrics import REQUEST_COLUMNS, SLO, TIMELINE_COLUMNS, summarize
from simulator.records.run_result import RunResult

REQUEST_EXTRAS = (
    "scheduled_arrival_s", "send_lag_s", "first_token_s", "last_token_s", "expected_tokens",
    "error", "finish_reason", "http_status", "malformed_chunks",
)


def _block_seconds(rec: RequestRecord, block_size: int) -> float:
    times = np.asarray(rec.token_times, dtype=float)
    if times.size < 2:
        return 0.0
    tokens = rec.prompt_tokens + np.arange(1, times.size)
    blocks = -(-tokens // block_size)
    return float((blocks * np.diff(times)).sum())


def request_columns(records: list[RequestRecord], workload, block_size: int) -> dict[str, np.ndarray]:
    """One row per request: the simulator's columns, then REQUEST_EXTRAS."""
    n = len(records)

    def col(getter, dtype=float):
        return np.array([getter(r) for r in records], dtype=dtype) if n else np.array([], dtype)

    send = col(lambda r: r.send_s)
    scheduled = col(lambda r: r.scheduled_s)
    arrival = np.where(np.isfinite(send), send, scheduled)
    first = col(lambda r: r.first_token_s)
    last = col(lambda r: r.last_token_s)
    out_tokens = col(lambda r: r.output_tokens, np.int64)
    status = col(lambda r: r.status, object)
    done = status == "completed"
    reasoning = np.minimum(workload.reasoning_tokens[col(lambda r: r.request_id, np.int64)],
                           out_tokens) if n else np.array([], np.int64)

    def visible(rec: RequestRecord, r: int) -> float:
        return rec.token_times[r] if r < len(rec.token_times) else math.nan

    first_visible = np.array([visible(rec, int(r)) for rec, r in zip(records, reasoning, strict=True)],
                             dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out_tokens > 1, (last - first) / (out_tokens - 1), np.nan)
    finish = np.where(np.isfinite(last), last, col(lambda r: r.end_s))
    columns: dict[str, Any] = {
        "request_id": col(lambda r: r.request_id, np.int64),
        "arrival_s": arrival,
        "domain": workload.domain.astype(str).astype(object) if n else np.array([], object),
        "prompt_tokens": col(lambda r: r.prompt_tokens, np.int64),
        "output_tokens": out_tokens,
        "reasoning_tokens": reasoning.astype(np.int64),
        "status": status,
        "queue_s": np.full(n, np.nan),
        "ttft_s": first - arrival,
        "ttfvt_s": first_visible - arrival,
        "tpot_s": tpot,
        "e2e_s": np.where(done, last - arrival, np.nan),
        "finish_s": finish,
        "preemptions": np.zeros(n, np.int64),
        "kv_block_seconds": col(lambda r: _block_seconds(r, block_size)),
        "reject_reason": col(lambda r: r.error if r.status == "rejected" else "", object),
        "scheduled_arrival_s": scheduled,
        "send_lag_s": send - scheduled,
        "first_token_s": first,
        "last_token_s": last,
        "expected_tokens": col(lambda r: r.expected_tokens, np.int64),
        "error": col(lambda r: r.error, object),
        "finish_reason": col(lambda r: r.finish_reason, object),
        "http_status": col(lambda r: r.http_status, np.int64),
        "malformed_chunks": col(lambda r: r.malformed_chunks, np.int64),
    }
    assert tuple(columns) == REQUEST_COLUMNS + REQUEST_EXTRAS
    return columns


def token_columns(records: list[RequestRecord]) -> dict[str, np.ndarray]:
    """Long table of every token's arrival: request_id, index (0-based), time_s."""
    rid = [np.full(len(r.token_times), r.request_id, np.int64) for r in records]
    idx = [np.arange(len(r.token_times), dtype=np.int64) for r in records]
    times = [np.asarray(r.token_times, dtype=float) for r in records]

    def cat(parts, dtype):
        return np.concatenate(parts) if parts else np.array([], dtype)

    return {"request_id": cat(rid, np.int64), "index": cat(idx, np.int64), "time_s": cat(times, float)}


def _held(sample_t: np.ndarray, sample_v: np.ndarray, at: np.ndarray, before: float = 0.0) -> np.ndarray:
    """Sample-and-hold of a series onto times ``at`` (``before`` ahead of the first sample)."""
    ok = np.isfinite(sample_v)
    sample_t, sample_v = sample_t[ok], sample_v[ok]
    if sample_t.size == 0:
        return np.full(len(at), before)
    i = np.searchsorted(sample_t, at, side="right") - 1
    return np.where(i >= 0, sample_v[np.clip(i, 0, None)], before)


def timeline_columns(steps: dict[str, np.ndarray], metrics: dict[str, np.ndarray], num_blocks: int,
                     gap_s: float, spec_decode: bool = False) -> dict[str, np.ndarray]:
    """Per-step timeline in TIMELINE_COLUMNS from the iteration log and /metrics samples.

    vLLM logs a preempted request recomputing its prompt as a generation
    request with many tokens; without speculative decoding every generation
    request computes one new token, so the excess is counted as prefill here,
    as the simulator counts it.
    """
    t = steps["time_s"]
    gen_tokens = steps["gen_tokens"].astype(np.int64)
    recompute = np.zeros(len(t), np.int64) if spec_decode else np.maximum(
        gen_tokens - steps["gen_requests"].astype(np.int64), 0)
    usage = steps["kv_usage"]
    waiting = _held(metrics["time_s"], metrics["waiting"], t).astype(np.int64)
    preempted = np.zeros(len(t), np.int64)
    counter = metrics["preemptions_total"]
    ok = np.isfinite(counter)
    mt, mc = metrics["time_s"][ok], counter[ok]
    if len(t) and mc.size > 1:
        for k in range(1, mc.size):
            inc = int(round(mc[k] - mc[k - 1]))
            if inc > 0:
                j = max(int(np.searchsorted(t, mt[k], side="right")) - 1, 0)
                preempted[j] += inc
    timeline = {
        "time_s": t,
        "step_time_s": steps["elapsed_s"] + gap_s,
        "running": steps["batch_size"].astype(np.int64),
        "waiting": waiting,
        "kv_blocks_used": np.rint(usage * max(num_blocks - 1, 1)).astype(np.int64),
        "kv_usage": usage,
        "prefill_tokens": steps["ctx_tokens"].astype(np.int64) + recompute,
        "decode_tokens": gen_tokens - recompute,
        "batch_size": steps["batch_size"].astype(np.int64),
        "preempted": preempted,
    }
    assert tuple(timeline) == TIMELINE_COLUMNS
    return timeline


def timeline_from_metrics(metrics: dict[str, np.ndarray], num_blocks: int) -> dict[str, np.ndarray]:
    """A coarse timeline from /metrics samples, for servers whose iteration log is not available.

    Step columns (tokens, batch size, step time) are 0: only the gauges are known.
    """
    ok = np.isfinite(metrics["kv_usage"])
    t = metrics["time_s"][ok]
    usage = metrics["kv_usage"][ok]
    zeros = np.zeros(len(t), np.int64)
    counter = metrics["preemptions_total"][ok]
    preempted = np.diff(np.nan_to_num(counter), prepend=counter[0] if len(counter) else 0).astype(np.int64)
    return {
        "time_s": t,
        "step_time_s": np.zeros(len(t)),
        "running": np.nan_to_num(metrics["running"][ok]).astype(np.int64),
        "waiting": np.nan_to_num(metrics["waiting"][ok]).astype(np.int64),
        "kv_blocks_used": np.rint(usage * max(num_blocks - 1, 1)).astype(np.int64),
        "kv_usage": usage,
        "prefill_tokens": zeros,
        "decode_tokens": zeros,
        "batch_size": zeros,
        "preempted": np.maximum(preempted, 0),
    }


def _delta(metrics: dict[str, np.ndarray], column: str) -> float | None:
    v = metrics[column]
    v = v[np.isfinite(v)]
    return float(v[-1] - v[0]) if v.size else None


def live_result(records: list[RequestRecord], workload, steps: dict[str, np.ndarray],
                metrics: dict[str, np.ndarray], *, num_blocks: int, block_size: int, slo: SLO,
                gap_s: float | None = None, spec_decode: bool = False) -> RunResult:
    """The RunResult of a live run (summary computed as for simulated runs)."""
    measured_gap = inter_step_gap(steps)
    gap = gap_s if gap_s is not None else (measured_gap or 0.0)
    requests = request_columns(records, workload, block_size)
    if len(steps["time_s"]):
        timeline = timeline_columns(steps, metrics, num_blocks, gap, spec_decode)
        source = "iteration log"
    else:
        timeline = timeline_from_metrics(metrics, num_blocks)
        source = "/metrics samples (no iteration log)"
    ends = [x for x in requests["finish_s"] if np.isfinite(x)]
    end_s = max(ends) if ends else 0.0
    schema_requests = {c: requests[c] for c in REQUEST_COLUMNS}
    summary = summarize(schema_requests, timeline, slo, end_s)
    preemptions = _delta(metrics, "preemptions_total")
    summary["preemptions"] = int(round(preemptions)) if preemptions is not None else None
    summary["requests_preempted"] = None
    queries = _delta(metrics, "prefix_cache_queries_total") or 0.0
    hits = _delta(metrics, "prefix_cache_hits_total") or 0.0
    summary["prefix_cache"] = {"queried_tokens": int(queries), "hit_tokens": int(hits),
                               "hit_rate": hits / queries if queries else 0.0}
    draft = _delta(metrics, "spec_draft_tokens_total")
    accepted = _delta(metrics, "spec_accepted_tokens_total")
    drafts = _delta(metrics, "spec_drafts_total")
    if draft:
        summary["spec_decode"] = {"drafts": int(drafts) if drafts is not None else None,
                                  "draft_tokens": int(draft), "accepted_tokens": int(accepted or 0),
                                  "acceptance_rate": (accepted or 0.0) / draft}
    summary["kv_cache"] = {"num_blocks": num_blocks, "block_size": block_size,
                           "capacity_tokens": num_blocks * block_size}
    lag = requests["send_lag_s"][np.isfinite(requests["send_lag_s"])]
    errors: dict[str, int] = {}
    for status, error in zip(requests["status"], requests["error"], strict=True):
        if status != "completed" and error:
            key = str(error).split(":")[0][:80]
            errors[key] = errors.get(key, 0) + 1
    metric_kv = metrics["kv_usage"]
    summary["live"] = {
        "send_lag_s": {"p50": float(np.median(lag)) if lag.size else None,
                       "p99": float(np.percentile(lag, 99)) if lag.size else None,
                       "max": float(lag.max()) if lag.size else None},
        "inter_step_gap_s": measured_gap,
        "step_time_gap_used_s": gap,
        "steps_logged": int(len(steps["time_s"])),
        "timeline_source": source,
        "metrics_samples": int(len(metrics["time_s"])),
        "kv_usage_metrics_mean": float(np.nanmean(metric_kv)) if np.isfinite(metric_kv).any() else None,
        "malformed_chunks": int(requests["malformed_chunks"].sum()),
        "token_count_mismatches": int(((requests["output_tokens"] != requests["expected_tokens"])
                                       & (requests["status"] == "completed")).sum()),
        "failure_reasons": errors,
    }
    return RunResult(requests=requests, timeline=timeline, summary=summary)
