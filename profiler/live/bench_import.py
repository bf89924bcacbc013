"""Read ``vllm bench serve --save-result --save-detailed`` JSON into the RunResult schema.

Users already have these files. With ``--save-detailed`` they hold, per
request: ``input_lens``, ``output_lens``, ``ttfts``, ``itls`` (the gaps
between tokens), ``latencies``, ``errors`` and, in recent vLLM (0.10+),
``start_times`` (perf_counter seconds when the request was sent) and
``queue_times`` (time waiting for the client's concurrency limit). Times come
out relative to the first send. The file also gives the Workload to simulate:
each request arriving when it was sent, with its prompt and output lengths.

The client cannot see the server's KV cache or preemptions: the timeline is
empty and those summary fields are None.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from simulator.records.errors import ConfigError
from simulator.records.metrics import REQUEST_COLUMNS, SLO, TIMELINE_COLUMNS, summarize
from simulator.records.run_result import RunResult
from simulator.records.workload import Workload

REQUIRED = ("input_lens", "output_lens", "ttfts", "itls")


def _floats(values, n: int, field: str) -> np.ndarray:
    if len(values) != n:
        raise ConfigError(f"bench.{field}", f"has {len(values)} entries, expected {n}")
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def read_bench_result(path: str | Path, slo: SLO | None = None) -> tuple[RunResult, Workload]:
    """(RunResult, Workload) of one saved benchmark result."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("bench", f"no such file {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError("bench", f"{path} is not JSON: {err}") from err
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ConfigError("bench", f"{path} lacks {missing}: save it with --save-result --save-detailed")
    n = len(data["input_lens"])
    prompt = np.array(data["input_lens"], dtype=np.int64)
    output = np.array(data["output_lens"], dtype=np.int64)
    if len(output) != n:
        raise ConfigError("bench.output_lens", f"has {len(output)} entries, expected {n}")
    errors = [str(e or "") for e in data.get("errors", [""] * n)]
    ok = np.array([not e for e in errors]) & (output > 0)
    ttft = np.where(ok, _floats(data["ttfts"], n, "ttfts"), np.nan)
    itls = data["itls"]
    if "start_times" in data:
        start = _floats(data["start_times"], n, "start_times")
        start -= np.nanmin(start)
        timing = "start_times"
    else:  # older vLLM: no send times; requests treated as sent at once
        start = np.zeros(n)
        timing = "none (file has no start_times: arrivals unknown)"
    queue = _floats(data["queue_times"], n, "queue_times") if "queue_times" in data else np.zeros(n)
    if "latencies" in data:
        latency = _floats(data["latencies"], n, "latencies")
    else:
        latency = np.array([t + sum(i or []) for t, i in zip(ttft, itls, strict=True)], dtype=float)
    latency = np.where(ok, latency, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(ok & (output > 1), (latency - ttft) / (output - 1), np.nan)
    order = np.argsort(start, kind="stable")
    status = np.where(ok, "completed", "failed").astype(object)
    requests = {
        "request_id": np.arange(n, dtype=np.int64),
        "arrival_s": start,
        "domain": np.full(n, "bench", object),
        "prompt_tokens": prompt,
        "output_tokens": np.where(ok, output, 0),
        "reasoning_tokens": np.zeros(n, np.int64),
        "status": status,
        "queue_s": np.full(n, np.nan),
        "ttft_s": ttft,
        "ttfvt_s": ttft.copy(),
        "tpot_s": tpot,
        "e2e_s": latency,
        "finish_s": start + latency,
        "preemptions": np.zeros(n, np.int64),
        "kv_block_seconds": np.zeros(n),
        "reject_reason": np.full(n, "", object),
        "scheduled_arrival_s": start - queue,
        "error": np.array(errors, dtype=object),
    }
    requests = {k: v[order] for k, v in requests.items()}
    requests["request_id"] = np.arange(n, dtype=np.int64)
    timeline = {c: np.array([], dtype=float) for c in TIMELINE_COLUMNS}
    finite_end = requests["finish_s"][np.isfinite(requests["finish_s"])]
    end_s = float(finite_end.max()) if finite_end.size else 0.0
    summary = summarize({c: requests[c] for c in REQUEST_COLUMNS}, timeline, slo or SLO(), end_s)
    summary["kv_usage"] = {"mean": None, "peak": None, "std": None, "seconds_above_95pct": None}
    summary["preemptions"] = None
    summary["requests_preempted"] = None
    summary["source"] = "vllm bench serve"
    result = RunResult(requests=requests, timeline=timeline, summary=summary, metadata={
        "kind": "vllm-bench-serve",
        "file": str(path),
        "timing": timing,
        "model_id": data.get("model_id"),
        "backend": data.get("backend"),
        "date": data.get("date"),
        "request_rate": data.get("request_rate"),
        "burstiness": data.get("burstiness"),
        "max_concurrency": data.get("max_concurrency"),
    })
    workload = Workload(
        arrival_s=requests["arrival_s"],
        prompt_tokens=np.maximum(requests["prompt_tokens"], 1),
        output_tokens=np.maximum(np.asarray(output)[order], 1),
        reasoning_tokens=np.zeros(n, np.int64),
        domain=np.full(n, "bench", object),
        name=path.stem,
    )
    return result, workload
