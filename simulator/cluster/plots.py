"""A cluster's figure: KV-cache usage of each replica over time (simulator.plots' style)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simulator.plots import _downsample, _figure, _finish_time_series
from simulator.results import RunResult


def plot_kv_per_replica(result: RunResult, path: str | Path, title: str = "") -> Path:
    """One line per replica: its KV-cache usage (%) after each of its steps."""
    tl = result.timeline
    replicas = [r.get("replica", i) for i, r in enumerate(result.summary.get("replicas", []))]
    roles = {r.get("replica", i): r.get("role", "replica") for i, r in enumerate(result.summary.get("replicas", []))}
    fig, ax = _figure(9, 3.5)
    for index in replicas or np.unique(tl["replica"]).tolist():
        mask = tl["replica"] == index
        t, u = _downsample(tl["time_s"][mask], tl["kv_usage"][mask] * 100,
                           points=max(400, 4000 // max(len(replicas), 1)))
        role = roles.get(index, "replica")
        ax.plot(t, u, lw=0.8, drawstyle="steps-post", label=f"{role} {index}" if role != "replica" else f"replica {index}")
    ax.set_ylim(0, 105)
    return _finish_time_series(fig, ax, Path(path), "KV-cache usage (%)", title or "KV-cache usage per replica")
