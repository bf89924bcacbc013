"""Per-step ground truth from vLLM's ``--enable-logging-iteration-details`` lines.

vLLM 0.32 logs one line per engine step from its API server process::

    ... Engine 000: Iteration(12): 3 context requests, 384 context tokens,
    5 generation requests, 5 generation tokens, iteration elapsed time: 14.12 ms,
    CPU KV cache usage: 21.9%

A "context request" is one with no output token yet (a new request or a
later chunk of its prefill); a request recomputing its prompt after a
preemption already has output tokens and counts as a "generation request"
with many tokens. The elapsed time covers the model's forward pass and
sampling, not scheduling or output processing between steps: that inter-step
gap (about 1.3-1.5 ms on our CPUs) is measured here from the arrival times of
back-to-back lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

ITERATION_RE = re.compile(
    r"Engine (?P<engine>\d+): Iteration\((?P<iteration>\d+)\): "
    r"(?P<ctx_requests>\d+) context requests, (?P<ctx_tokens>\d+) context tokens, "
    r"(?P<gen_requests>\d+) generation requests, (?P<gen_tokens>\d+) generation tokens, "
    r"iteration elapsed time: (?P<elapsed_ms>[0-9.]+) ms(?P<dummy> \(dummy\))?, "
    r"(?P<device>\w+) KV cache usage: (?P<kv_pct>[0-9.]+)%"
)

STEP_COLUMNS = (
    "iteration", "engine", "time_s", "elapsed_s", "wall_s", "ctx_requests", "ctx_tokens",
    "gen_requests", "gen_tokens", "batch_size", "num_tokens", "kv_usage", "dummy",
)


@dataclass(frozen=True)
class IterationRecord:
    """One engine step as the server logged it."""

    iteration: int
    engine: int
    ctx_requests: int
    ctx_tokens: int
    gen_requests: int
    gen_tokens: int
    elapsed_s: float
    kv_usage: float
    dummy: bool = False

    @property
    def batch_size(self) -> int:
        return self.ctx_requests + self.gen_requests

    @property
    def num_tokens(self) -> int:
        return self.ctx_tokens + self.gen_tokens


def parse_line(text: str) -> IterationRecord | None:
    """The step described by one log line, or None if the line is not an iteration line."""
    if "Iteration(" not in text:
        return None
    m = ITERATION_RE.search(text)
    if m is None:
        return None
    return IterationRecord(
        iteration=int(m["iteration"]),
        engine=int(m["engine"]),
        ctx_requests=int(m["ctx_requests"]),
        ctx_tokens=int(m["ctx_tokens"]),
        gen_requests=int(m["gen_requests"]),
        gen_tokens=int(m["gen_tokens"]),
        elapsed_s=float(m["elapsed_ms"]) / 1000.0,
        kv_usage=float(m["kv_pct"]) / 100.0,
        dummy=m["dummy"] is not None,
    )


def steps_table(records: list[tuple[float, IterationRecord]], t0: float = 0.0) -> dict[str, np.ndarray]:
    """Columns (STEP_COLUMNS) from (arrival time, record) pairs; times relative to ``t0``.

    ``wall_s`` is the time between this line's arrival and the previous one's
    (NaN for the first): for back-to-back steps, step time plus the gap.
    """
    recs = [(t, r) for t, r in records if not r.dummy]
    t = np.array([x[0] - t0 for x in recs], dtype=float)

    def col(name, dtype):
        return np.array([getattr(r, name) for _, r in recs], dtype=dtype)

    wall = np.full(len(recs), np.nan)
    if len(recs) > 1:
        wall[1:] = np.diff(t)
    return {
        "iteration": col("iteration", np.int64),
        "engine": col("engine", np.int64),
        "time_s": t,
        "elapsed_s": col("elapsed_s", float),
        "wall_s": wall,
        "ctx_requests": col("ctx_requests", np.int64),
        "ctx_tokens": col("ctx_tokens", np.int64),
        "gen_requests": col("gen_requests", np.int64),
        "gen_tokens": col("gen_tokens", np.int64),
        "batch_size": col("batch_size", np.int64),
        "num_tokens": col("num_tokens", np.int64),
        "kv_usage": col("kv_usage", float),
        "dummy": col("dummy", bool),
    }


def inter_step_gap(steps: dict[str, np.ndarray], min_steps: int = 10) -> float | None:
    """Mean time per step that ``elapsed_s`` leaves out (scheduling, output processing).

    Each line arrives after its step's output is processed. While the engine
    is busy, steps run back to back, so from the first line of a busy period
    to its last, the time is the later steps' elapsed times plus one gap
    each. Lines are read with some jitter, which only moves the ends of a busy
    period, so the gap is measured over whole busy periods:
    ``sum(span - elapsed) / sum(steps - 1)``. A busy period ends at a step
    after which the KV cache is empty (no request left running). None when
    fewer than ``min_steps`` back-to-back steps were seen.
    """
    t = steps["time_s"]
    elapsed = steps["elapsed_s"]
    if t.size < 2:
        return None
    idle_after = steps["kv_usage"] <= 0.0
    total_extra, count, start = 0.0, 0, 0
    for i in range(1, t.size + 1):
        if i == t.size or idle_after[i - 1]:
            if i - 1 > start:
                total_extra += float(t[i - 1] - t[start] - elapsed[start + 1:i].sum())
                count += i - 1 - start
            start = i
    if count < min_steps:
        return None
    return max(total_extra / count, 0.0)
