"""The table files the kernel profiler writes: aiconfigurator's CSV columns, appended row by row.

Every row is written (and flushed) as soon as it is measured, so an interrupted run
keeps what it measured; a new run in the same folder skips the rows already there
(``done``). ``kernels.json`` records what was measured where (model, card, device,
versions, grid), and a run refuses a folder that holds another model's or device's tables.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from calibration.kernel_tables import ELEMENTWISE_FILE, PROVENANCE_FILE
from simulator.records.errors import ConfigError

ATTENTION_COLUMNS = ["version", "kernel_source", "batch_size", "isl", "num_heads", "num_key_value_heads", "head_dim",
                     "beam_width", "attn_dtype", "kv_cache_dtype", "step", "window_size", "latency", "timing"]
COLUMNS = {
    "gemm_perf.csv": ["kernel_source", "gemm_dtype", "m", "n", "k", "latency", "timing"],
    "context_attention_perf.csv": ATTENTION_COLUMNS,
    "generation_attention_perf.csv": ATTENTION_COLUMNS,
    "custom_allreduce_perf.csv": ["kernel_source", "allreduce_dtype", "num_gpus", "message_size", "latency",
                                  "backend"],
    ELEMENTWISE_FILE: ["kernel_source", "op", "dtype", "tokens", "width", "bytes", "latency", "timing"],
}
#: the columns that name a row (a row with the same values is not measured again)
KEYS = {
    "gemm_perf.csv": ["gemm_dtype", "m", "n", "k"],
    "context_attention_perf.csv": ["batch_size", "isl", "step", "num_heads", "num_key_value_heads", "kv_cache_dtype"],
    "generation_attention_perf.csv": ["batch_size", "isl", "step", "num_heads", "num_key_value_heads",
                                      "kv_cache_dtype"],
    "custom_allreduce_perf.csv": ["num_gpus", "message_size", "backend"],
    ELEMENTWISE_FILE: ["op", "tokens", "width"],
}
#: what must agree for a run to add rows to a folder
SAME = ("model", "tp", "hardware", "device_name")


def row_key(table: str, row: dict[str, Any]) -> tuple[str, ...]:
    """The values naming a row, numbers written alike however they were read (8, 8.0, "8")."""
    return tuple(_canonical(row[c]) for c in KEYS[table])


def _canonical(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(int(number)) if number.is_integer() else repr(number)


class TableFolder:
    """The folder of one profiler run: its CSVs (created with headers) and its provenance."""

    def __init__(self, folder: Path, provenance: dict[str, Any]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / PROVENANCE_FILE
        if meta.exists():
            old = json.loads(meta.read_text())
            for key in SAME:
                if old.get(key) != provenance.get(key):
                    raise ConfigError("out", f"a new folder or one of this run's: {self.folder} holds tables of "
                                             f"{key} {old.get(key)!r}, this run is {provenance.get(key)!r}")
            provenance = {**provenance, "first_created": old.get("first_created", old.get("created"))}
        meta.write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        self.done: dict[str, set[tuple[str, ...]]] = {}
        for table, columns in COLUMNS.items():
            path = self.folder / table
            if not path.exists() or path.stat().st_size == 0:
                with open(path, "w", newline="") as f:
                    csv.writer(f, quoting=csv.QUOTE_NONNUMERIC).writerow(columns)
            with open(path, newline="") as f:
                self.done[table] = {row_key(table, row) for row in csv.DictReader(f)}

    def has(self, table: str, row: dict[str, Any]) -> bool:
        return row_key(table, row) in self.done[table]

    def add(self, table: str, row: dict[str, Any]) -> None:
        """Append one measured row (flushed at once)."""
        with open(self.folder / table, "a", newline="") as f:
            csv.writer(f, quoting=csv.QUOTE_NONNUMERIC).writerow([row[c] for c in COLUMNS[table]])
        self.done[table].add(row_key(table, row))
