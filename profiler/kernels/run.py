"""One kernel-profiler run: plan the rows of every table at the model's shapes, measure the missing ones."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from calibration.composed import LayerShapes, layer_elementwise
from calibration.kernel_tables import ELEMENTWISE_FILE
from profiler.kernels import device as devices
from profiler.kernels import measure
from profiler.kernels.settings import Settings
from profiler.kernels.tables import TableFolder

DTYPE_NAMES = {"bf16": "bfloat16", "fp8": "fp8"}


@dataclass(frozen=True)
class Job:
    """One row to measure: its table, the row without its latency, and how to build its kernel."""

    table: str
    row: dict[str, Any]
    build: Callable[[], tuple]  # () -> (calls over copies of the operands, kernel name[, bytes])


def gemm_shapes(shapes: LayerShapes) -> dict[str, tuple[int, int]]:
    """(n, k) of each projection per GPU: QKV, O, gate-up, down, LM head."""
    d = shapes.head_dim
    q, kv = shapes.heads * d, shapes.kv_heads * d
    return {"qkv": (q + 2 * kv, shapes.hidden), "o": (shapes.hidden, q), "gate_up": (2 * shapes.inter, shapes.hidden),
            "down": (shapes.hidden, shapes.inter), "lm_head": (shapes.vocab, shapes.hidden)}


def plan(s: Settings) -> list[Job]:
    """Every row of the run, in table order (GEMMs, element-wise, decode, prefill attention)."""
    sh, g, dev = LayerShapes.of(s.model, s.tp), s.grid, s.device
    jobs: list[Job] = []
    projections = gemm_shapes(sh)
    for dtype in s.dtypes:
        for name, (n, k) in projections.items():
            if dtype == "fp8" and name == "lm_head":
                continue  # vLLM keeps the LM head in bf16
            for m in g.tokens:
                jobs.append(Job("gemm_perf.csv", {"gemm_dtype": DTYPE_NAMES[dtype], "m": m, "n": n, "k": k},
                                lambda m=m, n=n, k=k, dtype=dtype: measure.gemm(m, n, k, dtype, dev)))
    ops = [(op, width) for op, width, _ in layer_elementwise(sh.hidden, sh.heads, sh.kv_heads, sh.head_dim, sh.inter)]
    for op, width in [*ops, ("sampler", s.model.vocab_size)]:
        for tokens in g.tokens:
            jobs.append(Job(ELEMENTWISE_FILE, {"op": op, "dtype": "bfloat16", "tokens": tokens, "width": width},
                            lambda op=op, t=tokens, w=width: measure.elementwise(op, t, w, sh.head_dim, dev)))
    attn = {"version": "torch", "num_heads": sh.heads, "num_key_value_heads": sh.kv_heads, "head_dim": sh.head_dim,
            "beam_width": 1, "attn_dtype": "bfloat16", "kv_cache_dtype": "bfloat16", "window_size": 0}
    for b in g.decode_batch:
        for n in g.decode_len:
            if b * n <= g.max_attention_tokens:
                jobs.append(Job("generation_attention_perf.csv", {**attn, "batch_size": b, "isl": n, "step": 0},
                                lambda b=b, n=n: measure.generation_attention(
                                    b, n, sh.heads, sh.kv_heads, sh.head_dim, dev)))
    chunks = [(b, n, 0) for b in g.context_batch for n in g.context_len] + [(1, q, c) for q, c in g.chunked]
    for b, n, prior in chunks:
        if b * (n + prior) <= g.max_attention_tokens:
            jobs.append(Job("context_attention_perf.csv", {**attn, "batch_size": b, "isl": n, "step": prior},
                            lambda b=b, n=n, c=prior: measure.context_attention(
                                b, n, c, sh.heads, sh.kv_heads, sh.head_dim, dev)))
    return jobs


def provenance(s: Settings) -> dict[str, Any]:
    info = devices.describe(s.device)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"tool": "python -m profiler.kernels", "created": now, "first_created": now,
            "model": s.model.to_dict(), "tp": s.tp, "hardware": s.hardware.to_dict(), "device_name": info["name"],
            "device": info, "versions": devices.versions(), "grid": s.grid_name, "grid_values": s.grid.__dict__,
            "dtypes": list(s.dtypes),
            "timing": ("CUDA graph replays timed with CUDA events, median after warm-up" if s.device == "cuda"
                       else "time.perf_counter, median after warm-up (CPU path: tests only)"),
            "allreduce": ("torch.distributed NCCL, one process per GPU" if s.tp > 1 and s.device == "cuda"
                          else "not measured (tp=1, or no GPUs)")}


def run(s: Settings, progress: bool = True) -> TableFolder:
    """Measure every planned row not already in ``s.out``; rows are written as they are measured."""
    devices.require_device(s.device)
    import torch

    if s.device == "cuda" and s.hardware.gpu and s.hardware.gpu.lower() not in torch.cuda.get_device_name(0).lower() \
            and torch.cuda.get_device_name(0).lower() not in s.hardware.gpu.lower():
        print(f"warning: hardware {s.hardware.name} is a {s.hardware.gpu}, this device is a "
              f"{torch.cuda.get_device_name(0)}; both are recorded", file=sys.stderr)
    torch.manual_seed(0)
    folder = TableFolder(s.out, provenance(s))
    todo = [job for job in plan(s) if not folder.has(job.table, job.row)]
    bar = _progress(len(todo), progress)
    failed: list[str] = []
    g = s.grid
    for job in todo:
        bar.set_description(f"{job.table.split('_perf')[0]} {_short(job.row)}", refresh=False)
        try:
            built = job.build()  # (calls over copies of the operands, kernel name[, bytes])
            ms, how = measure.time_ms(built[0], s.device, g.warmup, g.repeats)
        except (RuntimeError, TypeError, ValueError) as err:  # out of memory, a shape a kernel refuses
            failed.append(f"{job.table} {_short(job.row)}: {str(err).strip().splitlines()[0][:200]}")
            print(f"warning: not measured (a rerun tries again): {failed[-1]}", file=sys.stderr)
            built = None
            if s.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            bar.update(1)
            continue
        row = {**job.row, "kernel_source": built[1], "latency": ms, "timing": how}
        if len(built) > 2:
            row["bytes"] = built[2]
        folder.add(job.table, row)
        del built
        bar.update(1)
    bar.close()
    if s.tp > 1 and s.device == "cuda":
        from profiler.kernels.allreduce import measure_allreduce

        measure_allreduce(folder, s.tp, g)
    import json

    from calibration.kernel_tables import PROVENANCE_FILE

    meta = json.loads((folder.folder / PROVENANCE_FILE).read_text())
    meta["not_measured"] = failed
    if s.device == "cuda":
        meta["nvml_after"] = devices.nvml_readings()
    (folder.folder / PROVENANCE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def _short(row: dict[str, Any]) -> str:
    keys = ("gemm_dtype", "m", "n", "k", "op", "tokens", "batch_size", "isl", "step")
    return " ".join(f"{k}={row[k]}" for k in keys if k in row)


def _progress(total: int, enabled: bool):
    """A tqdm bar on stderr (a plain count every 50 rows where tqdm is not installed)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Count(total, enabled)
    return tqdm(total=total, disable=not enabled, unit="row", file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 10.0)


class _Count:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.text = total, 0, enabled, ""

    def set_description(self, text: str, refresh: bool = False) -> None:
        self.text = text

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled and (self.done % 50 == 0 or self.done == self.total):
            print(f"{self.done}/{self.total} rows ({self.text})", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass
