"""RunResult: the requests, timeline and summary of a run, simulated or live.

One schema for both, so that validation is a join. Written as
``requests.parquet``, ``timeline.parquet`` and ``summary.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simulator.records.summary import Summary
from simulator.records.workload import Workload


@dataclass
class RunResult:
    """Column arrays for requests and timeline, the summary, and the run's provenance
    (``metadata``: seed, versions, config; written into summary.json under "metadata")."""

    requests: dict[str, np.ndarray]
    timeline: dict[str, np.ndarray]
    summary: Summary
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.summary, Summary):  # a summary.json-like mapping
            self.summary = Summary.from_dict(self.summary)

    def requests_frame(self):
        import pandas as pd

        return pd.DataFrame(self.requests)

    def timeline_frame(self):
        import pandas as pd

        return pd.DataFrame(self.timeline)

    def write(self, out_dir: str | Path) -> Path:
        """Write requests.parquet, timeline.parquet and summary.json into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_parquet(self.requests, out / "requests.parquet")
        _write_parquet(self.timeline, out / "timeline.parquet")
        payload = self.summary.to_dict()
        if self.metadata:
            payload["metadata"] = self.metadata
        (out / "summary.json").write_text(json.dumps(payload, indent=2, default=json_default))
        return out

    @classmethod
    def read(cls, out_dir: str | Path) -> RunResult:
        """Read a run directory written by ``write`` (simulated or live)."""
        import pandas as pd

        out = Path(out_dir)
        for name in ("requests.parquet", "timeline.parquet", "summary.json"):
            if not (out / name).exists():
                from simulator.records.errors import ConfigError

                raise ConfigError("run_dir", f"{out} has no {name}")
        req = pd.read_parquet(out / "requests.parquet")
        tl = pd.read_parquet(out / "timeline.parquet")
        summary = json.loads((out / "summary.json").read_text())
        metadata = summary.pop("metadata", {})
        return cls(
            requests={c: req[c].to_numpy() for c in req.columns},
            timeline={c: tl[c].to_numpy() for c in tl.columns},
            summary=Summary.from_dict(summary),
            metadata=metadata,
        )


def _write_parquet(columns: dict[str, np.ndarray], path: Path) -> None:
    """Columns to a Parquet file, through pyarrow directly (no DataFrame copy on the way).

    Float columns (times, usage) are written without dictionary encoding: their
    values hardly repeat, so the dictionary only costs time (about half of the
    write of a million-step timeline); the data read back is the same.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {name: arrow_array(values) for name, values in columns.items()}
    table = pa.Table.from_arrays(list(arrays.values()), names=list(arrays))
    repeating = [name for name, a in arrays.items() if not pa.types.is_floating(a.type)]
    pq.write_table(table, path, use_dictionary=repeating)


def write_workload(workload: Workload, path: str | Path) -> None:
    """Write a workload as Parquet, the columns and types of ``Workload.save``, without pandas.

    ``Workload.load`` reads it back to the same workload; only pandas' own
    schema metadata (which ``load`` does not need) is absent.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "request_id": np.arange(len(workload), dtype=np.int64),
        "arrival_s": np.asarray(workload.arrival_s, dtype=np.float64),
        "prompt_tokens": workload.prompt_tokens,
        "output_tokens": workload.output_tokens,
        "reasoning_tokens": workload.reasoning_tokens,
        "domain": workload.domain.astype(str),
        "prefix_group": workload.prefix_group,
        "prefix_tokens": workload.prefix_tokens,
    }
    if workload.has_outer_groups:  # as Workload.to_frame: only when used
        columns.update(outer_group=workload.outer_group, outer_tokens=workload.outer_tokens)
    if workload.has_timeouts:
        columns["timeout_s"] = workload.timeout_s
    arrays = [arrow_array(values, large_strings=True) for values in columns.values()]
    pq.write_table(pa.Table.from_arrays(arrays, names=list(columns)), path)


def arrow_array(values, large_strings: bool = False):
    """A numpy column as an Arrow array, built from its buffers.

    Numbers are shared without a copy; text (str objects, None as null) becomes
    an Arrow string column. This is what ``pyarrow.array`` gives, but
    ``pyarrow.array`` imports pandas (about 0.2 s) on its first call.
    """
    import pyarrow as pa

    values = np.asarray(values)
    n = len(values)
    if values.dtype.kind in "iuf":
        values = np.ascontiguousarray(values)
        return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), n, [None, pa.py_buffer(values)])
    if values.dtype.kind == "b":
        bits = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), n, [None, pa.py_buffer(bits)])
    if values.dtype.kind not in "OU":
        raise TypeError(f"no Arrow conversion for numpy dtype {values.dtype}")
    valid = np.array([v is not None for v in values.tolist()], dtype=bool)
    if values.dtype.kind == "O" and not valid.any():
        return pa.Array.from_buffers(pa.null(), n, [None], null_count=n)  # as pyarrow types an all-None column
    encoded = [str(v).encode() if ok else b"" for v, ok in zip(values.tolist(), valid.tolist(), strict=True)]
    offsets = np.zeros(n + 1, dtype=np.int64 if large_strings else np.int32)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    nulls = n - int(valid.sum())
    validity = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    kind = pa.large_string() if large_strings else pa.string()
    return pa.Array.from_buffers(kind, n, [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))],
                                 null_count=nulls)


def json_default(value):
    """``json.dumps`` default for numpy scalars, paths and nested summaries (a cluster's replicas)."""
    if isinstance(value, Summary):
        return value.to_dict()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def rejection_reasons(requests: dict[str, np.ndarray]) -> dict[str, int]:
    """How many requests were rejected for each reason, the reason without the request's
    own token count (``prompt+max_tokens=5000 exceeds max_model_len=2048`` counts under
    ``exceeds max_model_len=2048``), most frequent first."""
    from collections import Counter

    status = requests.get("status")
    reasons = requests.get("reject_reason")
    if status is None or reasons is None:
        return {}
    counts = Counter(str(r).split(" ", 1)[-1] if str(r).startswith("prompt+max_tokens=") else str(r)
                     for s, r in zip(status, reasons, strict=True) if s == "rejected")
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
