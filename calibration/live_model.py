"""Performance models for simulating a live vLLM server: fitted steps + the gap + jitter.

Also the one part of a live server outside the engine steps that shows in
latencies: the API server's per-request overhead (``add_request_overhead``).

A live server spends time between engine steps (scheduling the next batch,
turning sampled tokens into outputs and shipping them to the API process)
that a per-step measurement can miss: vLLM's iteration log leaves out about
1.3-1.5 ms per step on our CPUs. ``StepGapModel`` adds such a gap to every
step of a fitted model. ``JitteredModel`` multiplies step times by random
noise (per step, plus one factor per simulated run) so that simulated runs
spread like live ones and the two spreads can be compared.
"""

from __future__ import annotations

import math
import random

import numpy as np

from simulator.records.errors import require
from simulator.records.metrics import REQUEST_COLUMNS, SLO, summarize
from simulator.records.performance import KVCapacity, MemoryBreakdown, PerformanceModel, StepBatch


class _Wrapped(PerformanceModel):
    """Delegates everything but step times to ``base``."""

    def __init__(self, base: PerformanceModel):
        self.base = base
        self.calibrated = base.calibrated

    def kv_bytes_per_token(self) -> int:
        return self.base.kv_bytes_per_token()

    def memory(self, gpu_memory_utilization: float) -> MemoryBreakdown:
        return self.base.memory(gpu_memory_utilization)

    def kv_capacity(self, block_size: int, gpu_memory_utilization: float = 0.9,
                    num_gpu_blocks_override: int | None = None) -> KVCapacity:
        return self.base.kv_capacity(block_size, gpu_memory_utilization, num_gpu_blocks_override)


class StepGapModel(_Wrapped):
    """``base`` plus what a live server adds to each step: ``gap_s`` per step,
    ``per_request_s`` per request in the step, ``per_prefill_token_s`` per
    prefill token and ``per_context_token_s`` per KV token a decoding request
    attends over.

    The per-request term stands for work the server does per output token
    outside the model (streaming it to the client); the per-token terms for a
    server process faster or slower than the profiled one at prefill and at
    attention. Negative terms (the profile slower than the server) are allowed;
    no step gets shorter than half its base time.
    """

    def __init__(self, base: PerformanceModel, gap_s: float, per_request_s: float = 0.0,
                 per_prefill_token_s: float = 0.0, per_context_token_s: float = 0.0):
        super().__init__(base)
        for value, name in ((gap_s, "step_gap_s"), (per_request_s, "step_gap_per_request_s"),
                            (per_prefill_token_s, "prefill_offset_per_token_s"),
                            (per_context_token_s, "step_gap_per_context_token_s")):
            require(math.isfinite(value), f"validate.{name}", "must be a finite number")
        self.gap_s = float(gap_s)
        self.per_request_s = float(per_request_s)
        self.per_prefill_token_s = float(per_prefill_token_s)
        self.per_context_token_s = float(per_context_token_s)
        self.name = f"{base.name}+gap{gap_s * 1000:.2f}ms+{per_request_s * 1e6:.0f}us/req"
        if per_context_token_s:
            self.name += f"{per_context_token_s * 1e9:+.0f}ns/kv-token"
        if per_prefill_token_s:
            self.name += f"{per_prefill_token_s * 1e6:+.1f}us/prefill-token"

    def step_time(self, batch: StepBatch) -> float:
        base = self.base.step_time(batch)
        requests = len(batch.decode_context) + len(batch.prefill_tokens)
        extra = self.gap_s + self.per_request_s * requests
        if self.per_prefill_token_s and batch.prefill_tokens:
            extra += self.per_prefill_token_s * sum(batch.prefill_tokens)
        if self.per_context_token_s and batch.decode_context:
            extra += self.per_context_token_s * sum(batch.decode_context)
        return max(base + extra, 0.5 * base)

    def decode_times(self, num_seqs: int, total_context):
        times = self.base.decode_times(num_seqs, total_context)
        if times is None:
            return None
        extra = self.gap_s + self.per_request_s * num_seqs
        if self.per_context_token_s:
            extra = extra + self.per_context_token_s * np.asarray(total_context, dtype=float)
        return np.maximum(times + extra, 0.5 * times)

    def decode_times_by_count(self, counts: list[int], lengths: list[int], total_context):
        times = self.base.decode_times_by_count(counts, lengths, total_context)
        if times is None:
            return None
        seqs = np.repeat(np.asarray(counts, dtype=float), lengths)
        extra = self.gap_s + self.per_request_s * seqs  # as ``decode_times``, element by element
        if self.per_context_token_s:
            extra = extra + self.per_context_token_s * np.asarray(total_context, dtype=float)
        return np.maximum(times + extra, 0.5 * times)

    def describe(self) -> dict:
        return {**self.base.describe(), "name": self.name, "step_gap_s": self.gap_s,
                "step_gap_per_request_s": self.per_request_s,
                "step_gap_per_context_token_s": self.per_context_token_s,
                "prefill_offset_per_token_s": self.per_prefill_token_s}


class JitteredModel(_Wrapped):
    """``base`` step times times ``run_scale`` times lognormal(0, ``step_sigma``) per step.

    ``run_scale`` stands for the drift between processes (one factor per
    simulated run); ``step_sigma`` for step-to-step noise. With noise the
    simulator's pure-decode fast path is off (every step draws its own factor).
    """

    def __init__(self, base: PerformanceModel, seed: int, step_sigma: float = 0.0, run_sigma: float = 0.0):
        super().__init__(base)
        require(step_sigma >= 0, "validate.step_sigma", "must be >= 0")
        require(run_sigma >= 0, "validate.run_sigma", "must be >= 0")
        self.rng = random.Random(seed)
        self.step_sigma = float(step_sigma)
        self.run_sigma = float(run_sigma)
        self.run_scale = math.exp(self.rng.gauss(0.0, run_sigma)) if run_sigma > 0 else 1.0
        self.name = f"{base.name}~jitter(step={step_sigma:g},run={run_sigma:g},seed={seed})"

    def step_time(self, batch: StepBatch) -> float:
        t = self.base.step_time(batch) * self.run_scale
        if self.step_sigma > 0:
            t *= math.exp(self.rng.gauss(0.0, self.step_sigma))
        return t

    def decode_times(self, num_seqs: int, total_context):
        if self.step_sigma > 0:
            return None
        times = self.base.decode_times(num_seqs, total_context)
        return None if times is None else np.asarray(times) * self.run_scale

    def decode_times_by_count(self, counts: list[int], lengths: list[int], total_context):
        if self.step_sigma > 0:
            return None
        times = self.base.decode_times_by_count(counts, lengths, total_context)
        return None if times is None else np.asarray(times) * self.run_scale

    def describe(self) -> dict:
        return {**self.base.describe(), "name": self.name, "run_scale": self.run_scale,
                "step_sigma": self.step_sigma, "run_sigma": self.run_sigma}


def add_request_overhead(result, overhead_s: float, slo: SLO | None = None, busy_extra_s: float = 0.0):
    """A simulated RunResult with the API server's per-request time added to every request's
    TTFT, TTFVT and E2E: ``overhead_s``, plus ``busy_extra_s`` for requests that arrive
    while the engine is running a step.

    The simulator models the engine; a live request also spends time in the
    OpenAI server (HTTP, input processing, streaming the output) that no engine
    step covers. The live runner measures it with isolated probe requests
    (``summary.live.request_overhead_s``: TTFT minus the prefill step) and, on
    a busy server, with lone requests sent during a decode batch
    (``calibration.cmd_validate.busy_overhead``). No request's total goes
    below zero extra. The summary is recomputed with the same function as before.
    """
    from simulator.records.run_result import RunResult

    require(overhead_s >= 0 and math.isfinite(overhead_s), "validate.request_overhead_s",
            "must be a finite number >= 0")
    require(math.isfinite(busy_extra_s), "validate.busy_overhead_s", "must be a finite number")
    requests = {k: np.array(v, copy=True) for k, v in result.requests.items()}
    extra = np.full(len(requests["arrival_s"]), float(overhead_s))
    if busy_extra_s:
        end = np.asarray(result.timeline["time_s"], dtype=float)  # a step's end
        start = end - np.asarray(result.timeline["step_time_s"], dtype=float)
        arrival = requests["arrival_s"].astype(float)
        i = np.searchsorted(end, arrival, side="right")  # the first step ending after the arrival
        inside = i < len(end)
        busy = np.zeros(len(arrival), bool)
        busy[inside] = start[i[inside]] < arrival[inside]  # a step that the arrival itself starts is not busy
        extra = np.maximum(extra + np.where(busy, busy_extra_s, 0.0), 0.0)
    for column in ("ttft_s", "ttfvt_s", "e2e_s"):
        requests[column] = requests[column].astype(float) + extra
    requests["finish_s"] = requests["finish_s"].astype(float) + extra
    schema = {c: requests[c] for c in REQUEST_COLUMNS}
    end_s = float(np.nanmax(requests["finish_s"])) if len(requests["finish_s"]) else 0.0
    summary = {**result.summary, **summarize(schema, result.timeline, slo or SLO(), end_s),
               "request_overhead_s": overhead_s, "busy_overhead_s": busy_extra_s}
    # the server's counters are not recomputed from requests
    summary["preemptions"] = result.summary.preemptions
    summary["requests_preempted"] = result.summary.requests_preempted
    return RunResult(requests=requests, timeline=result.timeline, summary=summary,
                     metadata=dict(result.metadata))
