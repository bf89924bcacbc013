"""Measured GPU kernel latency tables (NVIDIA aiconfigurator, vLLM kernels).

The tables in ``calibration/data/aiconfigurator/data/<system>/<op>/vllm/<version>/``
hold latencies in milliseconds of vLLM's own kernels measured on real GPUs:

- ``gemm_perf.csv``: ``gemm_dtype, m, n, k -> latency`` (an ``m x k`` by ``k x n`` GEMM),
- ``context_attention_perf.csv``: causal prefill attention of ``batch_size``
  sequences of ``isl`` tokens (FlashAttention, head_dim 128),
- ``generation_attention_perf.csv``: one decode token for ``batch_size``
  sequences attending over ``isl + step`` cached tokens,
- ``custom_allreduce_perf.csv``: vLLM's custom all-reduce of ``message_size``
  bf16 elements on ``num_gpus`` NVLink-connected GPUs (CUDA-graph rows used).

Every row is first checked against the card's roofline (``calibration.plausibility``):
a row faster than physics is dropped, counted, and its place filled from its
neighbours as a hole would be. Tables written by the kernel profiler
(``python -m profiler.kernels``) have the same files, in one folder with a
``kernels.json`` provenance record, plus ``elementwise_perf.csv``
(norms, rotary, activation, residual add and the sampler); ``load_table_dir``
reads them.

This module reads them and interpolates. All interpolation is linear in
log(latency) against log(size), which reproduces power laws exactly (latency
proportional to m, n, k or to a length squared) and is what makes sparse
power-of-two tables usable between their points. Beyond a table's last point
the latency is extrapolated with the physical scaling of that axis: linear in
m, n, k, batch, message size and decode KV length; quadratic in prefill length;
beyond the measured KV heads, by the KV bytes read (``AttentionTable._beyond_kv``).
The composed model counts every step priced beyond a table's range
(``composed.MeasuredRange``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from simulator.records.errors import ConfigError

DATA_DIR = Path(__file__).resolve().parent / "data" / "aiconfigurator"
TABLE_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp8": "fp8"}
KV_TABLE_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp8": "fp8",
                   "fp8_e4m3": "fp8", "fp8_e5m2": "fp8"}


@dataclass(frozen=True)
class Grid2D:
    """Latencies (ms) on a complete rectangular grid: ``ms[i, j]`` at ``(x[i], y[j])``."""

    x: np.ndarray
    y: np.ndarray
    ms: np.ndarray

    def __call__(self, x: np.ndarray, y: np.ndarray, y_power: float) -> np.ndarray:
        """Interpolate at points (x, y), log-bilinear; extrapolate linearly in x, y**y_power."""
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        lx, ly = np.log(self.x), np.log(self.y)
        qx = np.log(np.clip(x, self.x[0], self.x[-1]))
        qy = np.log(np.clip(y, self.y[0], self.y[-1]))
        i = np.clip(np.searchsorted(lx, qx, side="right") - 1, 0, len(lx) - 2)
        j = np.clip(np.searchsorted(ly, qy, side="right") - 1, 0, len(ly) - 2)
        tx = (qx - lx[i]) / (lx[i + 1] - lx[i])
        ty = (qy - ly[j]) / (ly[j + 1] - ly[j])
        logv = np.log(self.ms)
        v = ((1 - tx) * (1 - ty) * logv[i, j] + tx * (1 - ty) * logv[i + 1, j]
             + (1 - tx) * ty * logv[i, j + 1] + tx * ty * logv[i + 1, j + 1])
        out = np.exp(v)
        out *= np.maximum(x / self.x[-1], 1.0)
        out *= np.maximum(y / self.y[-1], 1.0) ** y_power
        return out


def interp_loglog(x: np.ndarray, xp: np.ndarray, fp: np.ndarray, power: float = 1.0) -> np.ndarray:
    """Piecewise-linear in log-log; below xp[0] flat, above xp[-1] growing as x**power."""
    x = np.asarray(x, dtype=float)
    safe = np.clip(x, xp[0], xp[-1])
    out = np.exp(np.interp(np.log(safe), np.log(xp), np.log(fp)))
    return out * np.maximum(x / xp[-1], 1.0) ** power


def _complete(grid: np.ndarray, x: np.ndarray, y: np.ndarray, y_power: float) -> np.ndarray:
    """Fill NaN holes of a (batch x length) grid.

    Interior holes of a row are interpolated in log-log along the length.
    Tables skip the largest batch x length corners: a missing entry there takes
    the last measured batch of its column scaled linearly in batch; columns
    with no measurement at all take the last measured length of their row
    scaled as length**y_power.
    """
    g = grid.copy()
    ly = np.log(y)
    for row in g:
        valid = np.flatnonzero(~np.isnan(row))
        if len(valid) > 1:
            inner = np.arange(valid[0], valid[-1] + 1)
            row[inner] = np.exp(np.interp(ly[inner], ly[valid], np.log(row[valid])))
    for j in range(g.shape[1]):
        col = g[:, j]
        valid = np.flatnonzero(~np.isnan(col))
        if len(valid):
            last = valid[-1]
            col[last + 1:] = col[last] * x[last + 1:] / x[last]
            col[:valid[0]] = col[valid[0]]
    for row in g:
        valid = np.flatnonzero(~np.isnan(row))
        if not len(valid):
            raise ConfigError("kernel_tables", "a table row has no measurement at all")
        last, first = valid[-1], valid[0]
        row[last + 1:] = row[last] * (y[last + 1:] / y[last]) ** y_power
        row[:first] = row[first]
    return g


class CompletedGrids(Mapping):
    """Head configuration -> complete (batch x length) grid, completed (``_complete``) on first use.

    A table holds some eighty head configurations and a model uses one or two,
    so completing them all when the tables are read would be wasted time.
    """

    def __init__(self, measured: dict[tuple[int, int, str], np.ndarray], batch: np.ndarray,
                 length: np.ndarray, length_power: float):
        self._measured = measured
        self._batch, self._length, self._power = batch, length, length_power
        self._complete: dict[tuple[int, int, str], np.ndarray] = {}

    def __getitem__(self, key: tuple[int, int, str]) -> np.ndarray:
        grid = self._complete.get(key)
        if grid is None:
            grid = _complete(self._measured[key], self._batch, self._length, self._power)
            self._complete[key] = grid
        return grid

    def __iter__(self) -> Iterator[tuple[int, int, str]]:
        return iter(self._measured)

    def __len__(self) -> int:
        return len(self._measured)


@dataclass(frozen=True)
class GemmTable:
    """GEMM latency on the table's full (m, n, k) grid, one dtype."""

    m: np.ndarray
    n: np.ndarray
    k: np.ndarray
    ms: np.ndarray  # shape (len(m), len(n), len(k))

    def latency_ms(self, m: np.ndarray, n: int, k: int) -> np.ndarray:
        """Latency of m x k by k x n GEMMs for each m (0 gives 0)."""
        m = np.asarray(m, dtype=float)
        scale = max(n / self.n[-1], 1.0) * max(k / self.k[-1], 1.0)
        ln, lk = np.log(self.n), np.log(self.k)
        qn = np.log(np.clip(n, self.n[0], self.n[-1]))
        qk = np.log(np.clip(k, self.k[0], self.k[-1]))
        i = int(np.clip(np.searchsorted(ln, qn, side="right") - 1, 0, len(ln) - 2))
        j = int(np.clip(np.searchsorted(lk, qk, side="right") - 1, 0, len(lk) - 2))
        tn = (qn - ln[i]) / (ln[i + 1] - ln[i])
        tk = (qk - lk[j]) / (lk[j + 1] - lk[j])
        logv = np.log(self.ms)
        per_m = np.exp((1 - tn) * (1 - tk) * logv[:, i, j] + tn * (1 - tk) * logv[:, i + 1, j]
                       + (1 - tn) * tk * logv[:, i, j + 1] + tn * tk * logv[:, i + 1, j + 1])
        out = interp_loglog(np.maximum(m, 1), self.m, per_m, power=1.0) * scale
        return np.where(m > 0, out, 0.0)


@dataclass(frozen=True)
class AttentionTable:
    """Attention latencies by (num_heads, num_key_value_heads, kv dtype) -> (batch x length) grid."""

    kind: str  # "context" or "generation"
    batch: np.ndarray
    length: np.ndarray
    slices: Mapping[tuple[int, int, str], np.ndarray]

    @property
    def length_power(self) -> float:
        """How latency grows with length beyond the table: quadratic for prefill, linear for decode."""
        return 2.0 if self.kind == "context" else 1.0

    def has_kv_dtype(self, kv_dtype: str) -> bool:
        return any(d == KV_TABLE_DTYPES.get(kv_dtype) for (_, _, d) in self.slices)

    def grid(self, heads: int, kv_heads: int, kv_dtype: str) -> Grid2D:
        """The complete (batch x length) grid for one head configuration (per GPU)."""
        dtype = KV_TABLE_DTYPES.get(kv_dtype)
        if dtype is None:
            raise ConfigError("kv_cache_dtype", f"{kv_dtype!r} has no attention tables; allowed: bf16, fp8")
        return Grid2D(self.batch, self.length, self._heads_grid(heads, kv_heads, dtype))

    def _heads_grid(self, heads: int, kv_heads: int, dtype: str) -> np.ndarray:
        kv_avail = sorted({kv for (_, kv, d) in self.slices if d == dtype})
        if not kv_avail:
            raise ConfigError("kv_cache_dtype", f"no {self.kind} attention rows for kv dtype {dtype}")
        if kv_heads in kv_avail:
            return self._at_kv(heads, kv_heads, dtype)
        if kv_heads > kv_avail[-1]:
            return self._beyond_kv(heads, kv_heads, kv_avail, dtype)
        lo = max(k for k in kv_avail if k < kv_heads)
        hi = min(k for k in kv_avail if k > kv_heads)
        w = (kv_heads - lo) / (hi - lo)
        return (1 - w) * self._at_kv(heads, lo, dtype) + w * self._at_kv(heads, hi, dtype)

    def _beyond_kv(self, heads: int, kv_heads: int, kv_avail: list[int], dtype: str) -> np.ndarray:
        """More KV heads than measured (MHA such as Llama-2): scale by the KV bytes read.

        At a fixed (batch, length) cell the KV bytes an attention kernel reads are
        proportional to the KV heads, so each cell is fitted ``t = a + b x kv_heads``
        (least squares over the measured KV-head rows, ``a, b >= 0``) and evaluated
        at ``kv_heads``: a kernel whose time is all bytes scales exactly with them,
        and a fixed cost ``a`` is not multiplied. Never below the largest measured row.
        """
        rows = list(kv_avail)
        x = np.array(rows, dtype=float)
        ys = np.stack([self._at_kv(heads, k, dtype) for k in rows])
        top = ys[-1]
        if len(rows) == 1:
            return top * kv_heads / x[0]
        xm = x.mean()
        slope = np.tensordot(x - xm, ys - ys.mean(axis=0), axes=(0, 0)) / np.sum((x - xm) ** 2)
        slope = np.maximum(slope, 0.0)
        intercept = np.maximum(ys.mean(axis=0) - slope * xm, 0.0)
        slope = np.where(intercept > 0, slope, ys.mean(axis=0) / xm)
        return np.maximum(intercept + slope * kv_heads, top)

    def kv_heads_measured(self, kv_dtype: str) -> int:
        """The largest KV-head count measured for this KV dtype (0 when none)."""
        dtype = KV_TABLE_DTYPES.get(kv_dtype)
        return max((kv for (_, kv, d) in self.slices if d == dtype), default=0)

    def _at_kv(self, heads: int, kv_heads: int, dtype: str) -> np.ndarray:
        h_avail = sorted(h for (h, kv, d) in self.slices if kv == kv_heads and d == dtype)
        if heads in h_avail:
            return self.slices[(heads, kv_heads, dtype)]
        if heads > h_avail[-1]:
            return self.slices[(h_avail[-1], kv_heads, dtype)] * heads / h_avail[-1]
        if heads < h_avail[0]:
            return self.slices[(h_avail[0], kv_heads, dtype)]
        lo = max(h for h in h_avail if h < heads)
        hi = min(h for h in h_avail if h > heads)
        w = (heads - lo) / (hi - lo)
        return (1 - w) * self.slices[(lo, kv_heads, dtype)] + w * self.slices[(hi, kv_heads, dtype)]


@dataclass(frozen=True)
class AllReduceTable:
    """vLLM custom all-reduce (CUDA graph) latency by GPU count and bf16 elements."""

    by_gpus: dict[int, tuple[np.ndarray, np.ndarray]]

    def latency_ms(self, num_gpus: int, elements: np.ndarray) -> np.ndarray:
        if num_gpus == 1:
            return np.zeros_like(np.asarray(elements, dtype=float))
        if num_gpus not in self.by_gpus:
            raise ConfigError("tp", f"no all-reduce measurements for {num_gpus} GPUs; "
                                    f"allowed: {sorted(self.by_gpus)}")
        size, ms = self.by_gpus[num_gpus]
        elements = np.asarray(elements, dtype=float)
        out = interp_loglog(np.maximum(elements, 1), size, ms, power=1.0)
        return np.where(elements > 0, out, 0.0)


@dataclass(frozen=True)
class KernelTables:
    """All measured tables of one system (e.g. ``h100_sxm``) at one vLLM version."""

    system: str
    version: str
    gemm: dict[str, GemmTable]
    context: AttentionTable
    generation: AttentionTable
    allreduce: AllReduceTable
    spec: dict
    #: plausibility.Rejections.to_dict() of the rows read (rows rejected per kernel family)
    checks: dict = field(default_factory=dict)
    #: the head dim the attention rows were measured at
    head_dim: int = 128
    #: measured element-wise kernels and sampler (kernel profiler tables only)
    elementwise: ElementwiseTable | None = None
    #: where the tables come from: "aiconfigurator", or the profiler's folder and provenance
    origin: dict = field(default_factory=dict)

    @property
    def gemm_dtypes(self) -> list[str]:
        return sorted(self.gemm)

    def gemm_table(self, dtype: str) -> GemmTable:
        key = {"bfloat16": "bf16"}.get(dtype, dtype)
        if key not in self.gemm:
            raise ConfigError(
                "optimization.weight_dtype",
                f"{dtype} GEMMs were not measured for {self.system} (vLLM {self.version}); "
                f"allowed: {', '.join(self.gemm_dtypes)}",
            )
        return self.gemm[key]

    @property
    def rejections(self):
        from calibration.plausibility import Rejections

        return Rejections.from_dict(self.checks)

    def describe(self) -> str:
        if self.origin.get("source") == "kernel-profiler":
            o = self.origin
            head = (f"kernel profiler tables {o.get('folder', '')} (measured on {o.get('device', '?')}, "
                    f"torch {o.get('torch', '?')}, {o.get('created', '?')})")
        else:
            head = f"aiconfigurator {self.system} vLLM {self.version} kernel tables (Apache-2.0)"
        return f"{head}; {self.rejections.summary()}" if self.checks else head


def kv_heads_extrapolation(tables: KernelTables, kv_heads: int, kv_dtype: str = "bf16") -> str:
    """Which attention tables a model with ``kv_heads`` KV heads per GPU is priced beyond ("" when none)."""
    out = []
    for name, table in (("decode", tables.generation), ("prefill", tables.context)):
        top = table.kv_heads_measured(kv_dtype) or table.kv_heads_measured("bf16")
        if kv_heads > top:
            out.append(f"{name} kv_heads {kv_heads}>{top} (scaled by KV bytes)")
    return ", ".join(out)


@dataclass(frozen=True)
class ElementwiseTable:
    """Measured latency (ms) of element-wise kernels by (op, width) against token count."""

    by_op: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]

    def latency_ms(self, op: str, width: int, tokens: np.ndarray) -> np.ndarray | None:
        """Interpolated latency at each token count (0 gives 0), or None when (op, width) was not measured."""
        if (op, int(width)) not in self.by_op:
            return None
        size, ms = self.by_op[(op, int(width))]
        tokens = np.asarray(tokens, dtype=float)
        out = interp_loglog(np.maximum(tokens, 1), size, ms, power=1.0)
        return np.where(tokens > 0, out, 0.0)


def available_systems() -> dict[str, list[str]]:
    """Systems with a complete set of tables, and their vLLM versions (newest last)."""
    out: dict[str, list[str]] = {}
    root = DATA_DIR / "data"
    if not root.is_dir():
        return out
    for system_dir in sorted(root.iterdir()):
        versions = []
        gemm_dir = system_dir / "gemm" / "vllm"
        if not gemm_dir.is_dir():
            continue
        for vdir in gemm_dir.iterdir():
            version = vdir.name
            if all((system_dir / op / "vllm" / version / f).exists() for op, f in (
                ("gemm", "gemm_perf.csv"),
                ("attention", "context_attention_perf.csv"),
                ("attention", "generation_attention_perf.csv"),
                ("comm", "custom_allreduce_perf.csv"),
            )):
                versions.append(version)
        if versions:
            out[system_dir.name] = sorted(versions, key=lambda v: tuple(int(p) for p in v.split(".")))
    return out


def resolve_version(system: str, version: str | None = None) -> str:
    """The requested table version, or the newest one measured for system."""
    systems = available_systems()
    if system not in systems:
        raise ConfigError("hardware.kernel_tables", f"no kernel tables for {system!r}; allowed: {', '.join(systems)}")
    if version is None:
        return systems[system][-1]
    if version not in systems[system]:
        raise ConfigError("hardware.kernel_tables",
                          f"no vLLM {version} tables for {system}; allowed: {', '.join(systems[system])}")
    return version


@lru_cache(maxsize=8)
def load_tables(system: str, version: str | None = None) -> KernelTables:
    """Read and index one system's tables (the CSVs are read once per process, and their
    indexed form is kept on disk for the next one: calibration.table_cache)."""
    from calibration import plausibility
    from calibration.table_cache import cached

    version = resolve_version(system, version)
    card = hardware_for_system(system)
    sources = [Path(__file__), Path(plausibility.__file__), *_table_paths(system, version).values(),
               DATA_DIR / f"{system}.yaml", *([card[1]] if card else [])]
    existing = [p for p in sources if p.exists()]

    def decode(arrays: Mapping[str, np.ndarray]) -> KernelTables:
        tables = tables_from_arrays(arrays)
        if (tables.system, tables.version) != (system, version):
            raise ValueError(f"holds {tables.system} {tables.version}")
        return tables

    return cached(f"kernel-tables-{system}-{version}", existing, lambda: _read_tables(system, version),
                  encode=tables_to_arrays, decode=decode)


def tables_to_arrays(tables: KernelTables) -> dict[str, np.ndarray]:
    """KernelTables as named plain arrays (numbers and fixed-width text; no objects)."""
    out = {"system": np.array(tables.system), "version": np.array(tables.version),
           "spec": np.array(repr(tables.spec)),  # a Python literal: read back by ast.literal_eval
           "checks": np.array(repr(tables.checks)), "head_dim": np.array(tables.head_dim, dtype=np.int64)}
    for dtype, g in tables.gemm.items():
        for axis in ("m", "n", "k", "ms"):
            out[f"gemm.{dtype}.{axis}"] = getattr(g, axis)
    for kind, att in (("context", tables.context), ("generation", tables.generation)):
        measured = att.slices._measured if isinstance(att.slices, CompletedGrids) else dict(att.slices)
        keys = list(measured)
        out[f"{kind}.batch"], out[f"{kind}.length"] = att.batch, att.length
        out[f"{kind}.heads"] = np.array([[h, kv] for h, kv, _ in keys], dtype=np.int64).reshape(-1, 2)
        out[f"{kind}.kv_dtype"] = np.array([d for _, _, d in keys], dtype=str)
        out[f"{kind}.grids"] = np.stack([measured[k] for k in keys]) if keys else \
            np.zeros((0, len(att.batch), len(att.length)))
    for gpus, (size, ms) in tables.allreduce.by_gpus.items():
        out[f"allreduce.{gpus}.size"], out[f"allreduce.{gpus}.ms"] = size, ms
    return out


def tables_from_arrays(arrays: Mapping[str, np.ndarray]) -> KernelTables:
    """The KernelTables ``tables_to_arrays`` stored; ValueError when the arrays do not hold one."""
    import ast

    def get(name: str, kind: str, ndim: int) -> np.ndarray:
        value = arrays[name]
        if value.dtype.kind != kind or value.ndim != ndim:
            raise ValueError(f"{name}: dtype {value.dtype}, {value.ndim} dimensions")
        return value

    def axis(name: str) -> np.ndarray:
        value = get(name, "f", 1)
        if len(value) < 2 or not np.all(np.diff(value) > 0) or value[0] <= 0:
            raise ValueError(f"{name}: not an increasing positive axis")
        return value

    gemm = {}
    for dtype in sorted({name.split(".")[1] for name in arrays if name.startswith("gemm.")}):
        m, n, k = (axis(f"gemm.{dtype}.{a}") for a in "mnk")
        ms = get(f"gemm.{dtype}.ms", "f", 3)
        if ms.shape != (len(m), len(n), len(k)) or not np.all(ms > 0):
            raise ValueError(f"gemm.{dtype}.ms: shape {ms.shape}")
        gemm[dtype] = GemmTable(m, n, k, ms)
    attention = {}
    for kind in ("context", "generation"):
        batch, length = axis(f"{kind}.batch"), axis(f"{kind}.length")
        heads, dtypes = get(f"{kind}.heads", "i", 2), get(f"{kind}.kv_dtype", "U", 1)
        grids = get(f"{kind}.grids", "f", 3)
        if heads.shape[1:] != (2,) or len(heads) != len(dtypes) or \
                grids.shape != (len(heads), len(batch), len(length)):
            raise ValueError(f"{kind}: inconsistent shapes")
        measured = {(int(h), int(kv), str(d)): grids[i] for i, ((h, kv), d) in enumerate(zip(heads, dtypes, strict=True))}
        attention[kind] = AttentionTable(kind, batch, length,
                                         CompletedGrids(measured, batch, length, 2.0 if kind == "context" else 1.0))
    by_gpus = {}
    for gpus in sorted({int(name.split(".")[1]) for name in arrays if name.startswith("allreduce.")}):
        size, ms = get(f"allreduce.{gpus}.size", "f", 1), get(f"allreduce.{gpus}.ms", "f", 1)
        if size.shape != ms.shape or not len(size) or not np.all(np.diff(size) > 0) or not np.all(ms > 0):
            raise ValueError(f"allreduce.{gpus}: shapes {size.shape} and {ms.shape}")
        by_gpus[gpus] = (size, ms)
    spec = ast.literal_eval(str(get("spec", "U", 0)))  # literals only: never runs code
    checks = ast.literal_eval(str(get("checks", "U", 0)))
    if not isinstance(spec, dict) or not isinstance(checks, dict):
        raise ValueError("spec or checks: not a mapping")
    return KernelTables(str(get("system", "U", 0)), str(get("version", "U", 0)), gemm, attention["context"],
                        attention["generation"], AllReduceTable(by_gpus), spec, checks,
                        int(get("head_dim", "i", 0)), origin={"source": "aiconfigurator"})


#: the tables of a system, each in its folder under data/<system>/<folder>/vllm/<version>/
TABLE_FILES = {"gemm_perf.csv": "gemm", "context_attention_perf.csv": "attention",
               "generation_attention_perf.csv": "attention", "custom_allreduce_perf.csv": "comm"}


def _table_paths(system: str, version: str) -> dict[str, Path]:
    """Each table file of ``system`` at ``version``, by file name."""
    base = DATA_DIR / "data" / system
    return {name: base / folder / "vllm" / version / name for name, folder in TABLE_FILES.items()}


def hardware_for_system(system: str):
    """(Hardware, its conf file) of the conf/hardware entry whose ``kernel_tables`` is ``system``, or None."""
    from calibration import catalog

    for name in catalog.names("hardware"):
        hardware = catalog.load_hardware(name)
        if hardware.kernel_tables == system:
            return hardware, catalog.CONF_DIR / "hardware" / f"{name}.yaml"
    return None


def _read_tables(system: str, version: str) -> KernelTables:
    """Read, check against the card's roofline and index one system's tables from their CSVs."""
    import yaml

    from calibration.plausibility import Rejections, Roofline

    card = hardware_for_system(system)
    roofline = Roofline.of(card[0]) if card else None
    spec_path = DATA_DIR / f"{system}.yaml"
    spec = yaml.safe_load(spec_path.read_text()) if spec_path.exists() else {}
    checks = Rejections(roofline.card if roofline else "")
    tables = _read_kernel_csvs(_table_paths(system, version), roofline, checks)
    return KernelTables(system, version, *tables[:4], spec, checks.to_dict() if roofline else {}, tables[4],
                        origin={"source": "aiconfigurator"})


def _read_kernel_csvs(paths: Mapping[str, Path], roofline, checks):
    """(gemm tables by dtype, context, generation, all-reduce tables, head dim) from the four CSVs.

    With a ``roofline`` (plausibility.Roofline), rows faster than physics are dropped
    and counted in ``checks`` (plausibility.Rejections) before the tables are indexed.
    """
    from calibration.plausibility import implausible

    def keep(family: str, rows: dict[str, np.ndarray], floor_s) -> dict[str, np.ndarray]:
        bad = implausible(rows["latency"], floor_s)
        checks.add(family, bad)
        return _rows_where(rows, ~bad)

    gemm_rows = read_columns(paths["gemm_perf.csv"], ["gemm_dtype", "m", "n", "k", "latency"],
                             text=("gemm_dtype",))
    gemm = {}
    for table_dtype, key in (("bfloat16", "bf16"), ("fp8", "fp8")):
        part = _rows_where(gemm_rows, gemm_rows["gemm_dtype"] == table_dtype)
        if roofline is not None and len(part["m"]):
            part = keep("gemm", part, roofline.gemm_s(part["m"], part["n"], part["k"], key))
        if len(part["m"]):
            gemm[key] = _gemm_table(part)
    attention, head_dims = {}, set()
    for kind in ("context", "generation"):
        cols = _read_attention(paths[f"{kind}_attention_perf.csv"])
        head_dims.update(np.unique(cols["head_dim"]).astype(int).tolist())
        if roofline is not None and len(cols["latency"]):
            fp8 = np.isin(cols["kv_cache_dtype"].astype(str), ["fp8", "fp8_e4m3", "fp8_e5m2"])
            kv_bytes = np.where(fp8, 1.0, 2.0)
            if kind == "context":  # ``step``: tokens cached before the chunk (always 0 in aiconfigurator's)
                floor = roofline.context_attention_s(cols["batch_size"], cols["isl"], cols["num_heads"],
                                                     cols["num_key_value_heads"], cols["head_dim"], kv_bytes,
                                                     cols["step"])
            else:
                floor = roofline.generation_attention_s(cols["batch_size"], cols["isl"] + cols["step"],
                                                        cols["num_heads"], cols["num_key_value_heads"],
                                                        cols["head_dim"], kv_bytes)
            cols = keep(f"{kind}_attention", cols, floor)
        if kind == "context":  # the grid holds chunks without cached context; the other rows are checks
            cols = _rows_where(cols, cols["step"] == 0)
        attention[kind] = _attention_table(cols, kind)
    if len(head_dims) > 1:
        raise ConfigError("kernel_tables", f"attention rows of several head dims {sorted(head_dims)}")
    ar = read_columns(paths["custom_allreduce_perf.csv"], text=("backend",))
    if "backend" in ar and len(ar["latency"]):
        graphs = np.array([str(b).endswith("graph") for b in ar["backend"]], dtype=bool)
        ar = _rows_where(ar, graphs) if graphs.any() else ar
    if roofline is not None and len(ar.get("latency", ())):
        ar = keep("allreduce", ar, roofline.allreduce_s(ar["message_size"], ar["num_gpus"]))
    by_gpus = {}
    for gpus in np.unique(ar.get("num_gpus", np.zeros(0))):
        part = _rows_where(ar, ar["num_gpus"] == gpus)
        # repeated measurements of one message size are averaged
        sizes, which = np.unique(part["message_size"], return_inverse=True)
        latency = np.bincount(which, weights=part["latency"].astype(float)) / np.bincount(which)
        by_gpus[int(gpus)] = (sizes.astype(float), latency)
    head_dim = head_dims.pop() if head_dims else 128
    return gemm, attention["context"], attention["generation"], AllReduceTable(by_gpus), head_dim


#: the kernel profiler's provenance record in its table folder
PROVENANCE_FILE = "kernels.json"
ELEMENTWISE_FILE = "elementwise_perf.csv"


def load_table_dir(folder: str | Path) -> KernelTables:
    """Tables the kernel profiler wrote into ``folder``, checked against the card it recorded."""
    import json

    from calibration.plausibility import Rejections, Roofline, implausible
    from simulator.records.hardware import Hardware

    folder = Path(folder)
    meta_path = folder / PROVENANCE_FILE
    if not meta_path.is_file():
        raise ConfigError("perf.tables", f"a folder written by python -m profiler.kernels ({PROVENANCE_FILE} "
                                         f"inside), got {str(folder)!r}")
    meta = json.loads(meta_path.read_text())
    paths = {name: folder / name for name in TABLE_FILES}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        raise ConfigError("perf.tables", f"{folder} lacks {', '.join(missing)} (did the profiler finish?)")
    hardware = Hardware.from_dict(dict(meta["hardware"]))
    roofline = Roofline.of(hardware)
    checks = Rejections(hardware.name)
    gemm, context, generation, allreduce, head_dim = _read_kernel_csvs(paths, roofline, checks)
    elementwise = None
    if (folder / ELEMENTWISE_FILE).is_file():
        cols = read_columns(folder / ELEMENTWISE_FILE, ["op", "tokens", "width", "bytes", "latency"], text=("op",))
        if len(cols["latency"]):
            bad = implausible(cols["latency"], roofline.elementwise_s(cols["bytes"]))
            checks.add("elementwise", bad)
            cols = _rows_where(cols, ~bad)
        ops = cols["op"].astype(str)
        by_op = {}
        for op, width in sorted(set(zip(ops.tolist(), cols["width"].astype(int).tolist(), strict=True))):
            part = _rows_where(cols, (ops == op) & (cols["width"] == width))
            sizes, which = np.unique(part["tokens"], return_inverse=True)
            latency = np.bincount(which, weights=part["latency"].astype(float)) / np.bincount(which)
            by_op[(op, width)] = (sizes.astype(float), latency)
        elementwise = ElementwiseTable(by_op)
    origin = {"source": "kernel-profiler", "folder": str(folder), "device": meta.get("device", {}).get("name"),
              "torch": meta.get("versions", {}).get("torch"), "created": meta.get("created"),
              "hardware": hardware.name, "model": meta.get("model", {}).get("name"), "tp": meta.get("tp")}
    return KernelTables(f"kernels:{folder.name}", str(meta.get("versions", {}).get("torch", "")), gemm, context,
                        generation, allreduce, {}, checks.to_dict(), head_dim, elementwise, origin)


def read_columns(path: Path, names: list[str] | None = None, text: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The named columns (default: all) of a CSV file with a header, as numpy arrays.

    Numbers become int64 or float64 arrays; the ``text`` columns (and any other
    non-numeric one) become arrays of str objects. Read with pyarrow's CSV
    reader rather than pandas (importing pandas costs ~0.2 s; the simulator
    writes its results through pyarrow anyway), and converted from the Arrow
    buffers directly because pyarrow's own ``to_numpy`` imports pandas.
    """
    import pyarrow as pa
    from pyarrow import csv

    as_codes = pa.dictionary(pa.int32(), pa.string())
    options = csv.ConvertOptions(include_columns=names, column_types={name: as_codes for name in text})
    table = csv.read_csv(path, convert_options=options)
    out = {}
    for name in table.column_names:
        column = table.column(name)
        if column.null_count:
            raise ConfigError("kernel_tables", f"{path.name}: column {name} has empty cells")
        parts = [_numpy_chunk(chunk) for chunk in column.chunks]
        out[name] = np.concatenate(parts) if parts else np.array([], dtype=_NUMPY_TYPES.get(str(column.type), object))
    return out


def _numpy_chunk(chunk) -> np.ndarray:
    """One Arrow array (numbers, dictionary-coded or plain text) as a numpy array."""
    import pyarrow as pa

    if pa.types.is_dictionary(chunk.type):
        words = np.array(chunk.dictionary.to_pylist(), dtype=object)
        return words[_numpy_chunk(chunk.indices)]
    dtype = _NUMPY_TYPES.get(str(chunk.type))
    if dtype is None:
        return np.array(chunk.to_pylist(), dtype=object)
    return np.frombuffer(chunk.buffers()[1], dtype=dtype, count=len(chunk),
                         offset=chunk.offset * np.dtype(dtype).itemsize)


_NUMPY_TYPES = {"int32": np.int32, "int64": np.int64, "double": np.float64}


def _read_attention(path: Path) -> dict[str, np.ndarray]:
    names = ["batch_size", "isl", "step", "num_heads", "num_key_value_heads", "head_dim", "kv_cache_dtype",
             "latency"]
    return read_columns(path, names, text=("kv_cache_dtype",))


def _rows_where(columns: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[keep] for name, values in columns.items()}


def _gemm_table(part: dict[str, np.ndarray]) -> GemmTable:
    m = np.unique(part["m"]).astype(float)
    n = np.unique(part["n"]).astype(float)
    k = np.unique(part["k"]).astype(float)
    cube = np.full((len(m), len(n), len(k)), np.nan)
    mi = np.searchsorted(m, part["m"])
    ni = np.searchsorted(n, part["n"])
    ki = np.searchsorted(k, part["k"])
    cube[mi, ni, ki] = part["latency"].astype(float)
    return GemmTable(m, n, k, _fill_gemm(cube, m, n, k))


def _fill_gemm(cube: np.ndarray, m: np.ndarray, n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Fill the holes of a GEMM cube (cells never measured, or rejected as faster than physics).

    Along m, a hole between measured cells is interpolated in log-log, one above
    them grows linearly in m, one below takes the smallest measured m (small GEMMs
    are bound by reading the weights). An (n, k) pair with no cell at all takes the
    nearest measured pair in log(n k), scaled by n k (GEMM time grows as n k at fixed m).
    """
    cube = cube.copy()
    empty, full = [], []
    for ni, ki in np.ndindex(cube.shape[1], cube.shape[2]):
        col = cube[:, ni, ki]
        valid = np.flatnonzero(~np.isnan(col))
        if not len(valid):
            empty.append((ni, ki))
            continue
        full.append((ni, ki))
        holes = np.isnan(col)
        if holes.any():
            col[holes] = interp_loglog(m[holes], m[valid], col[valid], power=1.0)
    if not full:
        raise ConfigError("kernel_tables", "GEMM table has no measured (n, k) pair")
    size = np.log(n)[:, None] + np.log(k)[None, :]
    for ni, ki in empty:
        src = min(full, key=lambda p: (abs(size[p] - size[ni, ki]), p))
        cube[:, ni, ki] = cube[:, src[0], src[1]] * n[ni] * k[ki] / (n[src[0]] * k[src[1]])
    return cube


def _attention_table(cols: dict[str, np.ndarray], kind: str) -> AttentionTable:
    """Index rows by head configuration; repeated measurements are averaged."""
    length_col = (cols["isl"] + cols["step"]) if kind == "generation" else cols["isl"]
    length_all = length_col.astype(float)
    batch_all = cols["batch_size"].astype(float)
    batch = np.unique(batch_all)
    lengths = np.unique(length_all)
    keys = list(zip(cols["num_heads"].astype(int).tolist(), cols["num_key_value_heads"].astype(int).tolist(),
                    [str(d) for d in cols["kv_cache_dtype"]], strict=True))
    names = sorted(set(keys))
    code = {key: i for i, key in enumerate(names)}
    idx = (np.fromiter((code[key] for key in keys), int, len(keys)),
           np.searchsorted(batch, batch_all), np.searchsorted(lengths, length_all))
    total = np.zeros((len(names), len(batch), len(lengths)))
    count = np.zeros_like(total)
    np.add.at(total, idx, cols["latency"].astype(float))
    np.add.at(count, idx, 1.0)
    with np.errstate(invalid="ignore"):
        mean = total / count
    power = 2.0 if kind == "context" else 1.0
    measured = {(int(h), int(kv), str(d)): mean[i] for i, (h, kv, d) in enumerate(names)}
    return AttentionTable(kind, batch, lengths, CompletedGrids(measured, batch, lengths, power))
