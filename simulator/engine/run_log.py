"""What an engine run produces: the per-step log and, at the end, the EngineRun."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from simulator.engine.interface import SchedulerOutput
from simulator.engine.request import SimRequest
from simulator.records.performance import KVCapacity

#: the step log's columns: per step its end and duration, then the counts
STEP_COLUMNS = ("end_s", "step_s", "kv_blocks_used", "running", "waiting", "prefill_tokens",
                "decode_tokens", "batch_size", "preempted")


class StepLog:
    """Per-step columns, kept cheaply: single steps go into plain lists, runs of
    fast-forwarded steps arrive as numpy arrays (times, KV) and as one value per
    stretch of steps for the columns that change rarely (batch, queues and
    preemptions, run-length encoded); ``columns()`` joins them. Counts are
    int32: a long run has millions of steps, and its columns are written once."""

    ROW_COLUMNS = ("end_s", "step_s", "kv_blocks_used")
    RUN_COLUMNS = ("running", "waiting", "prefill_tokens", "decode_tokens", "batch_size", "preempted")

    def __init__(self) -> None:
        self._chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.ROW_COLUMNS}
        self._rows: dict[str, list] = {name: [] for name in self.ROW_COLUMNS}
        self._values: dict[str, list[int]] = {name: [] for name in self.RUN_COLUMNS}
        self._counts: list[int] = []  # steps each run-length value covers
        #: run columns given whole (``add_columns``) or frozen before them, in order, before the lists
        self._parts: list[dict[str, np.ndarray]] = []
        self._row_lists = tuple(self._rows[name] if name in self._rows else self._values[name]
                                for name in STEP_COLUMNS)

    def add_step(self, start_s: float, end_s: float, *counts: int) -> None:
        """Append one step: its start and end, then its counts in STEP_COLUMNS order."""
        for column, value in zip(self._row_lists, (end_s, end_s - start_s, *counts), strict=True):
            column.append(value)
        self._counts.append(1)

    def add_run(self, k: int, start_s: np.ndarray, end_s: np.ndarray, kv_blocks_used: np.ndarray,
                segments: list[tuple[int, int, int, int, int]], waiting: int, waiting_changes: dict[int, int],
                preempted: dict[int, int]) -> None:
        """Append the k steps of a run: per-step times and KV blocks; ``segments`` from row 0
        on, (row, batch, running after it, prompt tokens prefilled, requests prefilling; the
        rest of the batch decodes), where they change; the queue length, ``waiting`` at the
        first row, changed by ``waiting_changes[row]``; ``preempted[row]``: the preemptions of
        the row's step."""
        self._flush()
        for name, array in (("end_s", end_s), ("step_s", end_s - start_s), ("kv_blocks_used", kv_blocks_used)):
            self._chunks[name].append(array)
        bounds = sorted({0, *([1] if k > 1 else []), *(row for row, *_ in segments), *waiting_changes,
                         *(row + 1 for row in preempted if row + 1 < k), *preempted})
        values = self._values
        counts = self._counts
        seg = -1
        for i, row in enumerate(bounds):
            while seg + 1 < len(segments) and segments[seg + 1][0] <= row:
                seg += 1
            _, batch, running, prefill, prefilling = segments[seg]
            waiting += waiting_changes.get(row, 0)
            values["running"].append(running)
            values["waiting"].append(waiting)
            values["prefill_tokens"].append(prefill)
            values["decode_tokens"].append(batch - prefilling)
            values["batch_size"].append(batch)
            values["preempted"].append(preempted.get(row, 0))
            counts.append((bounds[i + 1] if i + 1 < len(bounds) else k) - row)

    def add_columns(self, times: np.ndarray, counts: np.ndarray) -> None:
        """Append steps given column by column, one row a step: ``times`` the end and duration,
        ``counts`` the other STEP_COLUMNS in order (the compiled engine's log)."""
        self._flush()
        self._freeze_runs()
        self._chunks["end_s"].append(times[:, 0].copy())
        self._chunks["step_s"].append(times[:, 1].copy())
        self._chunks["kv_blocks_used"].append(counts[:, 0].astype(np.int32))
        self._parts.append({name: counts[:, 1 + i].astype(np.int32) for i, name in enumerate(self.RUN_COLUMNS)})

    def _freeze_runs(self) -> None:
        """The run-length lists so far, as a part (steps given whole come after them)."""
        if self._counts:
            counts = np.array(self._counts, dtype=np.int64)
            self._parts.append({name: np.repeat(np.array(values, dtype=np.int32), counts)
                                for name, values in self._values.items()})
            for values in self._values.values():
                values.clear()
            self._counts.clear()

    def _flush(self) -> None:
        if self._rows["end_s"]:
            for name, column in self._rows.items():
                self._chunks[name].append(np.asarray(column))
                column.clear()

    def __len__(self) -> int:
        return sum(self._counts) + sum(len(part["running"]) for part in self._parts)

    def kv_before(self, t: float) -> int:
        """KV blocks used after the last step that ended before ``t`` (0 before any): what the
        replica had reported by then (a cluster's router reads it)."""
        rows = self._rows["end_s"]
        if rows and rows[0] < t:
            return self._rows["kv_blocks_used"][bisect.bisect_left(rows, t) - 1]
        for ends, used in zip(reversed(self._chunks["end_s"]), reversed(self._chunks["kv_blocks_used"]),
                              strict=True):
            if len(ends) and ends[0] < t:
                return int(used[int(np.searchsorted(ends, t, side="left")) - 1])
        return 0

    def columns(self) -> dict[str, np.ndarray]:
        """Every step's values, one numpy array per column (STEP_COLUMNS)."""
        return StepLog.join([self])[0]

    @staticmethod
    def join(logs: list[StepLog]) -> tuple[dict[str, np.ndarray], list[int]]:
        """The steps of ``logs``, one log after the other, one numpy array per column
        (STEP_COLUMNS), and the first row of each log (then the number of rows). Each log keeps
        its rows as a view of the joined ones: one copy in memory, not the chunks as well."""
        for log in logs:
            log._flush()
        starts = [0]
        for log in logs:
            starts.append(starts[-1] + len(log))
        out = {}
        for name in StepLog.ROW_COLUMNS:
            dtype = np.int32 if name == "kv_blocks_used" else np.float64
            parts = [part for log in logs for part in log._chunks[name]]
            out[name] = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
            for i, log in enumerate(logs):
                log._chunks[name][:] = [out[name][starts[i] : starts[i + 1]]]
        if not any(log._parts for log in logs):  # (the usual case: run-length lists only)
            counts = np.array([c for log in logs for c in log._counts], dtype=np.int64)
            for name in StepLog.RUN_COLUMNS:
                values = [v for log in logs for v in log._values[name]]
                out[name] = np.repeat(np.array(values, dtype=np.int32), counts)
            return out, starts
        for log in logs:
            log._freeze_runs()
        for name in StepLog.RUN_COLUMNS:
            parts = [part[name] for log in logs for part in log._parts]
            out[name] = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return out, starts


@dataclass
class EngineRun:
    """Everything one simulation produced, before it is tabulated."""

    requests: list[SimRequest]
    steps: StepLog
    kv: KVCapacity
    block_seconds: dict[int, float]
    prefix_queries: int
    prefix_hits: int
    end_s: float
    decisions: list[SchedulerOutput] | None = None
