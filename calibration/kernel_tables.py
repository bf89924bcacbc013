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

This module reads them and interpolates. All interpolation is linear in
log(latency) against log(size), which reproduces power laws exactly (latency
proportional to m, n, k or to a length squared) and is what makes sparse
power-of-two tables usable between their points. Beyond a table's last point
the latency is extrapolated with the physical scaling of that axis: linear in
m, n, k, batch, message size and decode KV length; quadratic in prefill length.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from simulator.errors import ConfigError

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
            # More KV heads than measured (MHA such as Llama-2): the latency above
            # the kernel's floor grows with the KV heads read.
            top = kv_avail[-1]
            base = self._at_kv(heads, top, dtype)
            floor = base.min()
            return floor + (base - floor) * kv_heads / top
        lo = max(k for k in kv_avail if k < kv_heads)
        hi = min(k for k in kv_avail if k > kv_heads)
        w = (kv_heads - lo) / (hi - lo)
        return (1 - w) * self._at_kv(heads, lo, dtype) + w * self._at_kv(heads, hi, dtype)

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

    def describe(self) -> str:
        return f"aiconfigurator {self.system} vLLM {self.version} kernel tables (Apache-2.0)"


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
    from calibration.table_cache import cached

    version = resolve_version(system, version)
    sources = [Path(__file__), *_table_paths(system, version).values(), DATA_DIR / f"{system}.yaml"]
    existing = [p for p in sources if p.exists()]
    return cached(f"kernel-tables-{system}-{version}", existing, lambda: _read_tables(system, version))


#: the tables of a system, each in its folder under data/<system>/<folder>/vllm/<version>/
TABLE_FILES = {"gemm_perf.csv": "gemm", "context_attention_perf.csv": "attention",
               "generation_attention_perf.csv": "attention", "custom_allreduce_perf.csv": "comm"}


def _table_paths(system: str, version: str) -> dict[str, Path]:
    """Each table file of ``system`` at ``version``, by file name."""
    base = DATA_DIR / "data" / system
    return {name: base / folder / "vllm" / version / name for name, folder in TABLE_FILES.items()}


def _read_tables(system: str, version: str) -> KernelTables:
    """Read and index one system's tables from their CSVs."""
    import yaml

    paths = _table_paths(system, version)
    gemm_rows = read_columns(paths["gemm_perf.csv"], ["gemm_dtype", "m", "n", "k", "latency"],
                             text=("gemm_dtype",))
    gemm = {}
    for table_dtype, key in (("bfloat16", "bf16"), ("fp8", "fp8")):
        part = _rows_where(gemm_rows, gemm_rows["gemm_dtype"] == table_dtype)
        if len(part["m"]):
            gemm[key] = _gemm_table(part)
    context = _attention_table(_read_attention(paths["context_attention_perf.csv"]), "context")
    generation = _attention_table(_read_attention(paths["generation_attention_perf.csv"]), "generation")
    ar = read_columns(paths["custom_allreduce_perf.csv"], text=("backend",))
    if "backend" in ar:
        ar = _rows_where(ar, ar["backend"] == "vllm_graph")
    by_gpus = {}
    for gpus in np.unique(ar["num_gpus"]):
        part = _rows_where(ar, ar["num_gpus"] == gpus)
        # repeated measurements of one message size are averaged
        sizes, which = np.unique(part["message_size"], return_inverse=True)
        latency = np.bincount(which, weights=part["latency"].astype(float)) / np.bincount(which)
        by_gpus[int(gpus)] = (sizes.astype(float), latency)
    spec_path = DATA_DIR / f"{system}.yaml"
    spec = yaml.safe_load(spec_path.read_text()) if spec_path.exists() else {}
    return KernelTables(system, version, gemm, context, generation, AllReduceTable(by_gpus), spec)


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
    names = ["batch_size", "isl", "step", "num_heads", "num_key_value_heads", "kv_cache_dtype", "latency"]
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
    # A few (n, k) pairs were not measured: take them from the neighbouring n
    # scaled linearly in n (GEMM time grows as n at fixed m, k).
    for ni_, ki_ in zip(*np.nonzero(np.isnan(cube).any(axis=0)), strict=True):
        src = ni_ - 1 if ni_ > 0 else ni_ + 1
        cube[:, ni_, ki_] = cube[:, src, ki_] * n[ni_] / n[src]
    if np.isnan(cube).any():
        raise ConfigError("kernel_tables", "GEMM table has unfillable holes")
    return GemmTable(m, n, k, cube)


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
