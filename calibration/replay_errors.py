"""A replayed real run against its record: the card it ran on, its live latencies, the signed errors.

Shared by the one-engine replay (``calibration.accuracy``) and the data-parallel one
(``calibration.dp_replay``), so that both read the run's machine and compare percentiles alike.
Views (see ``calibration.accuracy``): ``engine`` from the engine core's arrival (``queued_ts``),
``client`` from the API server's ``arrival_time``; the simulated client figure is that of a
replay from the API server's arrivals (a request then waits for the step in progress, as the
engine core takes new requests only between steps) plus the front-end term.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from calibration import catalog
from calibration.live_replay import LiveRun
from simulator.records.hardware import Hardware

QUANTILES = (50, 90, 99)
METRICS = ("ttft", "e2e")
VIEWS = ("engine", "client")


def run_link_gbps(run_dir: Path) -> float | None:
    """The GPU-to-GPU link the run's ``config.json`` records (``link_bw``, GB/s), or None."""
    cfg = run_dir / "config.json"
    link = json.loads(cfg.read_text()).get("link_bw") if cfg.exists() else None
    return float(link) if link else None


def run_hardware(run_dir: Path, name: str) -> Hardware:
    """The card, with the GPU-to-GPU link the run's ``config.json`` records (``run_link_gbps``) if any.

    The record is LLMServingSim's description of the machine it ran on (16 GB/s for its RTX PRO
    6000 runs: PCIe without NVLink), the same for all its runs, not fitted to one. It prices the
    collectives of a TP > 1 step and the expert gather of an expert-parallel one. Its unit is
    LLMServingSim's: ASTRA-Sim's analytical network, which that simulator feeds it to, times a
    message over a link as its bytes / ``link_bw`` (plus a latency), with no efficiency
    factor, and LLMServingSim chose the value to match its all-reduces ("the same ``link_bw``
    that already matches AllReduce", ``serving/core/trace_generator.py``). It is the bandwidth
    a collective gets, not a datasheet peak; ``conf/hardware`` holds peaks, which the roofline
    derates by ``INTERCONNECT_EFFICIENCY``. The card is therefore given the peak that the derate
    turns back into the recorded link: ``link_bw / INTERCONNECT_EFFICIENCY``.
    """
    from calibration.roofline import INTERCONNECT_EFFICIENCY

    card = catalog.load_hardware(name)
    link = run_link_gbps(run_dir)
    return replace(card, interconnect_gbps=link / INTERCONNECT_EFFICIENCY) if link else card


def live_latencies(run: LiveRun) -> dict[tuple[str, str], np.ndarray]:
    """Per (view, metric) the live per-request seconds; ``client`` only where the run records it."""
    out = {("engine", "ttft"): run.first_token_s - run.arrival_s, ("engine", "e2e"): run.last_token_s - run.arrival_s}
    if run.api_arrival_s is not None:
        out[("client", "ttft")] = run.first_token_s - run.api_arrival_s
        out[("client", "e2e")] = run.last_token_s - run.api_arrival_s
    return out


def error_rows(live: dict[tuple[str, str], np.ndarray], sim: dict[str, np.ndarray],
               frontend_s: float = 0.0, sim_client: dict[str, np.ndarray] | None = None) -> list[dict]:
    """One row per (view, metric, quantile) of ``live``: live and simulated seconds, signed error.

    ``sim`` holds the simulated seconds per metric of the replay from the engine core's arrivals;
    ``sim_client`` those of the replay from the API server's arrivals (default: ``sim``), to which
    the client view adds ``frontend_s``.
    """
    rows = []
    for (view, metric), values in live.items():
        simulated = (sim_client or sim)[metric] + frontend_s if view == "client" else sim[metric]
        for q in QUANTILES:
            lv, sv = float(np.percentile(values, q)), float(np.percentile(simulated, q))
            rows.append({"view": view, "metric": metric, "quantile": q, "live_s": lv, "sim_s": sv,
                         "error": sv / lv - 1})
    return rows
