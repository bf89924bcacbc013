"""One table for a multirun sweep: ``sweep.csv`` at the sweep's root, a row per run.

``python -m simulator -m workload.rate=1,2`` writes each run to its own folder;
the Hydra callback here (conf/config.yaml, ``hydra.callbacks``) rewrites the
combined table after every run and once more when the sweep ends, so a sweep
stopped part-way still has the table of the runs it finished.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

TABLE = "sweep.csv"
# column name -> path into summary.json
FIGURES: dict[str, tuple[str, ...]] = {
    "completed": ("completed",),
    "rejected": ("rejected",),
    "ttft_p50_s": ("ttft_s", "p50"),
    "ttft_p99_s": ("ttft_s", "p99"),
    "e2e_p50_s": ("e2e_s", "p50"),
    "e2e_p99_s": ("e2e_s", "p99"),
    "kv_usage_mean": ("kv_usage", "mean"),
    "kv_usage_peak": ("kv_usage", "peak"),
    "preemptions": ("preemptions",),
    "output_tokens_per_s": ("throughput", "output_tokens_per_s"),
    "requests_per_s": ("throughput", "requests_per_s"),
    "goodput_requests_per_s": ("goodput", "requests_per_s"),
    "slo_attainment": ("goodput", "attainment"),
}


def run_row(run_dir: Path, root: Path) -> dict[str, Any] | None:
    """The sweep table's row for one run folder, or None if it is not a run's folder.

    ``status`` is ``complete``, ``partial`` (interrupted) or ``missing`` (no
    summary.json: the run failed, or is still running)."""
    import yaml

    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    summary_file = run_dir / "summary.json"
    if not overrides_file.is_file() and not summary_file.is_file():
        return None
    row: dict[str, Any] = {"run": run_dir.relative_to(root).as_posix()}
    if overrides_file.is_file():
        for override in yaml.safe_load(overrides_file.read_text()) or []:
            key, _, value = str(override).partition("=")
            if not key.lstrip("+~").startswith("hydra."):
                row[key.lstrip("+~")] = value
    if not summary_file.is_file():
        return {**row, "status": "missing"}
    summary = json.loads(summary_file.read_text())
    row["status"] = "partial" if summary.get("partial") else "complete"
    for column, path in FIGURES.items():
        value: Any = summary
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        row[column] = value
    return row


def _natural(text: str) -> list:
    """Sort key putting run ``2`` before run ``10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def sweep_rows(root: Path) -> list[dict[str, Any]]:
    """A row for each run folder under the sweep's root, in run order."""
    folders = {p.parent for p in root.rglob("summary.json")}
    folders |= {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    rows = [run_row(f, root) for f in folders if f != root]
    return sorted((r for r in rows if r is not None), key=lambda r: _natural(r["run"]))


def write_sweep_table(root: Path) -> Path | None:
    """Write ``sweep.csv`` at the sweep's root (atomically); None when no run there has a
    summary.json yet (nor ever will: a ``simulator.plan`` sweep writes points tables).

    Columns: ``run`` (its folder), the run's overrides (one column per key), ``status``,
    then the key figures of its summary.json (seconds, shares of the KV cache, per second)."""
    rows = sweep_rows(root)
    if all(r["status"] == "missing" for r in rows):
        return None
    keys = [k for r in rows for k in r if k not in FIGURES and k not in ("run", "status")]
    columns = ["run", *dict.fromkeys(keys), "status", *FIGURES]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = root / TABLE
    partial = root / f".{TABLE}.{os.getpid()}.tmp"
    partial.write_text(text.getvalue())
    os.replace(partial, path)
    return path


def _job_root(config) -> Path:
    """The sweep's root for a job: its output folder less ``hydra.sweep.subdir``."""
    out = Path(str(config.hydra.runtime.output_dir))
    depth = len(Path(str(config.hydra.sweep.subdir)).parts)
    return out.parents[depth - 1] if depth else out


class SweepTable(Callback):
    """Hydra callback: keep ``sweep.csv`` at the sweep's root up to date."""

    def on_job_end(self, config, job_return=None, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            write_sweep_table(_job_root(config))

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        path = write_sweep_table(Path(str(config.hydra.sweep.dir)))
        if path is not None:
            print(f"sweep      {path}")
