"""A step-time model composed from per-kernel latencies (measured tables or roofline).

One engine step of a dense transformer runs, per layer: the QKV, O, gate/up and
down projection GEMMs over every token of the step; attention for the prefill
chunks (causal, over each chunk's context) and for the decode sequences (one
query over their KV); two all-reduces under tensor parallelism; and a handful
of memory-bound element-wise kernels (norms, rotary, KV-cache write, SiLU).
Then the LM head runs on one row per scheduled request (vLLM computes logits
for every request in the batch, even partial prefills) and the sampler on those
rows. Under tensor parallelism a step also all-reduces its embeddings and
all-gathers its logits (``layer_terms.embedding_allreduce_ms``,
``logits_allgather_ms``). A fixed per-step overhead covers what no kernel table holds.

Everything that depends only on the model and the hardware is evaluated once,
at construction, onto lookup grids:

- ``dense[m]``: all layers' GEMMs, element-wise kernels and all-reduces (the
  embedding's included) for a step of m tokens (m = 0 .. max_tokens, one entry per integer);
- ``head[r]``: LM head GEMM, logits all-gather and sampler for r sampled rows;
- a (chunks x effective prefill length) grid of context attention and a
  (decode sequences x mean KV length) grid of generation attention, uniform in
  log2 with ``GRID_PER_OCTAVE`` points per doubling, interpolated log-bilinearly.

``step_time`` is then a few list look-ups and sums: it is a pure function of
the StepBatch and costs a few microseconds.

Approximations, stated:

- Several prefill chunks in one step are priced as ``n`` chunks of one
  effective length ``s`` with the same attention work: ``n s^2 = sum q(2c + q)``
  for chunks of q new tokens over c cached tokens. The result is never below
  the time to read the chunks' whole KV (context + new tokens) once at the
  card's copy ceiling (``COPY_CEILING_FRACTION``); decode attention neither.
- Decode sequences of different KV lengths are priced as a uniform batch at
  their mean KV length (the kernels are bound by the total KV read).
- Speculative verify tokens are extra rows in every GEMM and in the LM head;
  their attention rides on their sequence's decode KV read (FlashAttention
  packs the 1 + k query rows of a GQA group into one tile), so it is not
  counted again.
- Dense cost is made non-decreasing in m (a running maximum), which removes
  the tables' tile-boundary dips (for example m = 3585 measured faster than
  m = 3584).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from calibration.layer_terms import (
    ACT_BYTES,
    MEMORY_EFFICIENCY,
    MEMORY_OP_LATENCY_S,
    STEP_OVERHEAD_S,
    LayerShapes,
    embedding_allreduce_ms,
    layer_memory_ops,
    logits_allgather_ms,
)
from calibration.memory import MemoryModel
from calibration.moe import MeetingExperts
from calibration.roofline import RooflineKernels
from calibration.sparse import SparseParts
from simulator.records.errors import ConfigError
from simulator.records.hardware import Hardware
from simulator.records.model_arch import ModelArchitecture, dtype_bytes
from simulator.records.performance import (
    GridTable,
    MemoryBreakdown,
    PerformanceModel,
    StepBatch,
    StepTimeTables,
)

TABLE_HEAD_DIM = 128
GRID_PER_OCTAVE = 8
#: decode batches and prefill chunk counts covered by the attention grids (linear beyond)
GRID_MAX_SEQS = 4096
#: lengths covered by the attention grids (quadratic beyond for prefill, linear for decode)
GRID_MAX_LEN = 1 << 18
#: The fastest any kernel streams memory, as a fraction of the datasheet bandwidth: a 4 GiB
#: device-to-device copy on a real H200 moved 4,242 GB/s (read + write) of its 4,800
#: (``../shared/data/gpu-measurements/h200-r1-distill-qwen-7b``, ``kind: ceiling``). Attention
#: (prefill and decode) is never priced below reading its KV once at this ceiling: a physical
#: floor for table cells extrapolated beyond the measured KV heads, batches or lengths.
COPY_CEILING_FRACTION = 4242 / 4800
#: vLLM's sampler: a fixed cost plus two fp32 passes over the logits. The 25 us and
#: the two passes match LLMServingSim's measured sampler on an RTX PRO 6000
#: (24.7 us at 1 sequence, 164 us at 256 sequences of a 128,256-token vocabulary).
SAMPLER_FIXED_S = 25e-6
SAMPLER_LOGIT_PASSES = 2


class KernelSource(Protocol):
    """Per-kernel latencies in milliseconds, from measurements or from a roofline."""

    def gemm_ms(self, m: np.ndarray, n: int, k: int, dtype: str) -> np.ndarray: ...

    def context_attention_ms(self, heads: int, kv_heads: int, head_dim: int, kv_dtype: str,
                             batch: np.ndarray, length: np.ndarray) -> np.ndarray: ...

    def generation_attention_ms(self, heads: int, kv_heads: int, head_dim: int, kv_dtype: str,
                                batch: np.ndarray, kv_len: np.ndarray) -> np.ndarray: ...

    def allreduce_ms(self, num_gpus: int, elements: np.ndarray) -> np.ndarray: ...

    def memory_op_ms(self, nbytes: np.ndarray) -> np.ndarray: ...

    def describe(self) -> str: ...


def layer_elementwise(hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int) -> list[tuple[str, int, int]]:
    """The element-wise kernels of one layer as (op, width, count per layer), widths per GPU.

    The kernel profiler measures these at the model's shapes (``elementwise_perf.csv``)
    and the composed model prices a layer with them: a residual add and an RMSNorm
    before attention and before the MLP, rotary on q and k, SiLU(gate) * up.
    """
    return [("residual_add", hidden, 2), ("rmsnorm", hidden, 2),
            ("rotary", (heads + kv_heads) * head_dim, 1), ("silu_mul", inter, 1)]


class TableKernels:
    """KernelSource backed by measured tables (aiconfigurator's, or the kernel profiler's).

    Memory-bound kernels are priced by roofline, unless the tables measured them
    (``KernelTables.elementwise``: the kernel profiler's tables).
    """

    def __init__(self, tables, hardware: Hardware):
        self.tables = tables
        self.bandwidth = hardware.memory_bandwidth_gbps * 1e9
        self.notes: list[str] = []

    def _kv(self, kv_dtype: str) -> str:
        """fp8 KV on a system measured with bf16 KV only (A100) is priced with the bf16 kernels.

        That is an upper bound for decode attention: on H100, where both were
        measured, fp8 KV decode attention takes 0.6-1.0x the bf16 time.
        """
        if self.tables.generation.has_kv_dtype(kv_dtype) and self.tables.context.has_kv_dtype(kv_dtype):
            return kv_dtype
        note = f"{kv_dtype} KV priced with bf16 attention tables (not measured on {self.tables.system})"
        if note not in self.notes:
            self.notes.append(note)
        return "bf16"

    def gemm_ms(self, m, n, k, dtype):
        return self.tables.gemm_table(dtype).latency_ms(m, n, k)

    def context_attention_ms(self, heads, kv_heads, head_dim, kv_dtype, batch, length):
        self._check_head_dim(head_dim)
        return self.tables.context.grid(heads, kv_heads, self._kv(kv_dtype))(batch, length, 2.0)

    def generation_attention_ms(self, heads, kv_heads, head_dim, kv_dtype, batch, kv_len):
        self._check_head_dim(head_dim)
        return self.tables.generation.grid(heads, kv_heads, self._kv(kv_dtype))(batch, kv_len, 1.0)

    def _check_head_dim(self, head_dim: int) -> None:
        measured = getattr(self.tables, "head_dim", TABLE_HEAD_DIM)
        if head_dim != measured:
            raise ConfigError("model.head_dim", f"attention tables were measured for head_dim "
                                                f"{measured} only, not {head_dim}")

    def layer_elementwise_ms(self, m: np.ndarray, ops: list[tuple[str, int, int]]) -> np.ndarray | None:
        """One layer's measured element-wise kernels for m tokens, or None when any was not measured."""
        table = getattr(self.tables, "elementwise", None)
        if table is None:
            return None
        total = np.zeros(np.shape(m))
        for op, width, count in ops:
            ms = table.latency_ms(op, width, m)
            if ms is None:
                return None
            total = total + count * ms
        return total

    def sampler_ms(self, rows: np.ndarray, vocab: int) -> np.ndarray | None:
        """The measured sampler (softmax and argmax over the vocabulary) for ``rows``, or None."""
        table = getattr(self.tables, "elementwise", None)
        return None if table is None else table.latency_ms("sampler", vocab, rows)

    def allreduce_ms(self, num_gpus, elements):
        return self.tables.allreduce.latency_ms(num_gpus, elements)

    def measured_range(self, kv_heads: int, kv_dtype: str) -> MeasuredRange:
        """How far the tables reach for a model with ``kv_heads`` KV heads per GPU."""
        t, kv = self.tables, self._kv(kv_dtype)
        return MeasuredRange(
            tokens=float(min(g.m[-1] for g in t.gemm.values())),
            decode_batch=float(t.generation.batch[-1]), decode_context=float(t.generation.length[-1]),
            prefill_batch=float(t.context.batch[-1]), prefill_length=float(t.context.length[-1]),
            decode_kv_heads_beyond=kv_heads > t.generation.kv_heads_measured(kv),
            prefill_kv_heads_beyond=kv_heads > t.context.kv_heads_measured(kv))

    def memory_op_ms(self, nbytes):
        nbytes = np.asarray(nbytes, dtype=float)
        return 1e3 * (MEMORY_OP_LATENCY_S + nbytes / (self.bandwidth * MEMORY_EFFICIENCY))

    def describe(self) -> str:
        return "; ".join([self.tables.describe(), *self.notes])


@dataclass(frozen=True)
class MeasuredRange:
    """The largest query each kernel table measured; beyond it the model extrapolates."""

    tokens: float = math.inf
    decode_batch: float = math.inf
    decode_context: float = math.inf
    prefill_batch: float = math.inf
    prefill_length: float = math.inf
    decode_kv_heads_beyond: bool = False
    prefill_kv_heads_beyond: bool = False


#: the axes on which a step's queries are counted when they leave the measured range
EXTRAPOLATION_AXES = ("tokens", "decode_batch", "decode_context", "decode_kv_heads",
                      "prefill_batch", "prefill_length", "prefill_kv_heads")


class LogGrid2D:
    """A function of (x, y) >= 1 tabulated on a log2-uniform grid, for fast scalar look-ups."""

    def __init__(self, fn, x_max: float, y_max: float, x_power: float, y_power: float,
                 per_octave: int = GRID_PER_OCTAVE):
        self.res = per_octave
        self.nx = int(math.ceil(math.log2(x_max) * per_octave))
        self.ny = int(math.ceil(math.log2(y_max) * per_octave))
        xs = 2.0 ** (np.arange(self.nx + 1) / per_octave)
        ys = 2.0 ** (np.arange(self.ny + 1) / per_octave)
        self.x_top, self.y_top = float(xs[-1]), float(ys[-1])
        self.x_power, self.y_power = x_power, y_power
        gx, gy = np.meshgrid(xs, ys, indexing="ij")
        values = np.asarray(fn(gx.ravel(), gy.ravel()), dtype=float).reshape(gx.shape)
        self.values = values
        self._log_values = np.log(np.maximum(values, 1e-30))
        self._log = self._log_values.ravel().tolist()
        self._width = self.ny + 1

    def __call__(self, x: float, y: float) -> float:
        scale = 1.0
        if x > self.x_top:
            scale = (x / self.x_top) ** self.x_power
            x = self.x_top
        if y > self.y_top:
            scale *= (y / self.y_top) ** self.y_power
            y = self.y_top
        fx = math.log2(x) * self.res if x > 1.0 else 0.0
        fy = math.log2(y) * self.res if y > 1.0 else 0.0
        i = min(int(fx), self.nx - 1)
        j = min(int(fy), self.ny - 1)
        tx = fx - i
        ty = fy - j
        w = self._width
        v = self._log
        a = i * w + j
        b = a + w
        low = v[a] + (v[a + 1] - v[a]) * ty
        high = v[b] + (v[b + 1] - v[b]) * ty
        return math.exp(low + (high - low) * tx) * scale

    def many(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Vectorised __call__."""
        x = np.maximum(np.asarray(x, dtype=float), 1.0)
        y = np.maximum(np.asarray(y, dtype=float), 1.0)
        scale = np.maximum(x / self.x_top, 1.0) ** self.x_power * np.maximum(y / self.y_top, 1.0) ** self.y_power
        fx = np.log2(np.minimum(x, self.x_top)) * self.res
        fy = np.log2(np.minimum(y, self.y_top)) * self.res
        i = np.minimum(fx.astype(int), self.nx - 1)
        j = np.minimum(fy.astype(int), self.ny - 1)
        tx, ty = fx - i, fy - j
        v = self._log_values
        low = v[i, j] + (v[i, j + 1] - v[i, j]) * ty
        high = v[i + 1, j] + (v[i + 1, j + 1] - v[i + 1, j]) * ty
        return np.exp(low + (high - low) * tx) * scale

    def table(self) -> GridTable:
        """The grid as plain numbers (``__call__`` evaluated from them gives the same bits)."""
        return GridTable(self.res, self.nx, self.ny, self.x_top, self.y_top, float(self.x_power),
                         float(self.y_power), np.ascontiguousarray(self._log_values.ravel()), self._width)

    def at_x(self, x: float) -> LogGridColumn:
        """The grid at one fixed x, for fast vectorised look-ups along y (``many`` with a constant x)."""
        return LogGridColumn(self, x)


class LogGridColumn:
    """``LogGrid2D.many(full(x), y)`` for one fixed x, with everything that depends on x precomputed.

    Bit-identical to ``many``: the same numpy operations on the same values, in
    the same order, only without the per-element work on the constant x.
    """

    def __init__(self, grid: LogGrid2D, x: float):
        self.grid = grid
        x_arr = np.maximum(np.array([x], dtype=float), 1.0)
        self.x_scale = float((np.maximum(x_arr / grid.x_top, 1.0) ** grid.x_power)[0])
        fx = np.log2(np.minimum(x_arr, grid.x_top)) * grid.res
        i = int(np.minimum(fx.astype(int), grid.nx - 1)[0])
        self.tx = float((fx - i)[0])
        v = grid._log_values
        # rows: v[i, j], v[i, j+1] - v[i, j], v[i+1, j], v[i+1, j+1] - v[i+1, j] for j = 0 .. ny-1
        self.rows = np.ascontiguousarray(np.stack([
            v[i, :-1], v[i, 1:] - v[i, :-1], v[i + 1, :-1], v[i + 1, 1:] - v[i + 1, :-1]]))

    def __call__(self, y: np.ndarray) -> np.ndarray:
        """The grid at (x, y) for each y; y is a float array, overwritten."""
        return _along_y(self.grid, self.x_scale, self.tx, self.rows, None, y)

    @staticmethod
    def many(columns: list[LogGridColumn], which: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The grid at (x of ``columns[which[i]]``, ``y[i]``) for each i (columns of one grid);
        bit-identical to each column's own call. y is a float array, overwritten."""
        # each distinct column once (a run's segments come back to the same counts)
        place: dict[int, int] = {}
        distinct: list[LogGridColumn] = []
        for c in columns:
            if id(c) not in place:
                place[id(c)] = len(distinct)
                distinct.append(c)
        which = np.array([place[id(c)] for c in columns])[which]
        x_scale = np.array([c.x_scale for c in distinct])[which]
        tx = np.array([c.tx for c in distinct])[which]
        rows = np.concatenate([c.rows for c in distinct], axis=1)  # column c's rows from c * width on
        return _along_y(distinct[0].grid, x_scale, tx, rows, which * distinct[0].rows.shape[1], y)


def _along_y(grid: LogGrid2D, x_scale, tx, rows: np.ndarray, offset: np.ndarray | None, y: np.ndarray) -> np.ndarray:
    """``LogGridColumn`` look-ups: x's scale and fraction (floats, or one per y) and the rows of
    the grid around x (``offset``: where each y's rows start, or None: the first)."""
    if not y.size:
        return y
    y = np.maximum(y, 1.0, out=y)
    scale = x_scale
    y_max = y.max()
    if y_max > grid.y_top:
        scale = x_scale * np.maximum(y / grid.y_top, 1.0) ** grid.y_power
        np.minimum(y, grid.y_top, out=y)
    fy = np.log2(y, out=y)
    fy *= grid.res
    j = fy.astype(np.intp)
    if y_max > 0.99 * grid.y_top:  # well below the top of the grid, int(fy) <= ny - 1 already
        np.minimum(j, grid.ny - 1, out=j)
    ty = fy
    ty -= j
    low, d_low, high, d_high = rows.take(j if offset is None else offset + j, axis=1)
    d_low *= ty
    low += d_low
    d_high *= ty
    high += d_high
    high -= low
    high *= tx
    low += high
    out = np.exp(low, out=low)
    if not (isinstance(scale, float) and scale == 1.0):
        out *= scale  # (a scale of 1.0 in an array leaves its entry as it is)
    return out


class ComposedPerformanceModel(PerformanceModel):
    """Step time composed from kernel latencies; memory and KV sized as vLLM does."""

    def __init__(
        self,
        arch: ModelArchitecture,
        hardware: Hardware,
        kernels: KernelSource,
        *,
        tp: int = 1,
        weight_dtype: str = "bf16",
        kv_dtype: str = "bf16",
        max_num_batched_tokens: int = 8192,
        max_num_seqs: int = 1024,
        overhead_s: float = STEP_OVERHEAD_S,
        name: str = "",
        calibrated: bool = True,
        host_s_per_token: float = 0.0,
        host_s_per_row: float = 0.0,
        expert_parallel: bool = False,
        data_parallel_size: int = 1,
    ):
        self.arch = arch
        self.hardware = hardware
        self.kernels = kernels
        self.tp = tp
        self.weight_dtype = weight_dtype
        self.kv_dtype = kv_dtype
        self.overhead_s = overhead_s
        self.calibrated = calibrated
        #: host work outside the kernels per scheduled token (prefix-cache block hashing), part
        #: of the dense cost of a step of m tokens, and per scheduled request (prefix-cache
        #: bookkeeping), part of the head cost of r rows (calibration.prefix_caching_cost)
        self.host_s_per_token = host_s_per_token
        self.host_s_per_row = host_s_per_row
        #: mixture of experts: experts spread whole over the GPUs (vLLM's enable_expert_parallel)
        #: rather than split tp ways; with data_parallel_size > 1, that many engines (this one
        #: of them, equally loaded) run attention apart and their MoE layers together
        self.expert_parallel = bool(expert_parallel) or data_parallel_size > 1
        self.data_parallel_size = int(data_parallel_size)
        self.name = name or f"composed:{hardware.name}:{arch.name}:{weight_dtype}:kv-{kv_dtype}:tp{tp}"
        self.memory_model = MemoryModel(arch, hardware, tp, weight_dtype, kv_dtype,
                                        max_num_batched_tokens, max_num_seqs,
                                        expert_ranks=tp * self.data_parallel_size)
        self.shapes = LayerShapes.of(arch, tp)
        self.max_tokens = max(int(max_num_batched_tokens), 16384)
        self.max_rows = max(int(max_num_seqs), 1024) * 4
        kv_layer_bytes = 2 * self.shapes.kv_heads * arch.head_dim * dtype_bytes(kv_dtype)
        #: MoE, latent attention and sliding windows (calibration.sparse); None for a dense model
        self.sparse = SparseParts(self) if (arch.is_moe or arch.is_mla or arch.sliding_window_layers) else None
        if arch.is_mla:
            kv_layer_bytes = (arch.kv_lora_rank + arch.qk_rope_head_dim) * dtype_bytes(kv_dtype)
        #: seconds to read one token's KV across all (full-attention) layers once, at the card's copy ceiling
        self.kv_read_s_per_token = (arch.full_attention_layers * kv_layer_bytes
                                    / (hardware.memory_bandwidth_gbps * 1e9 * COPY_CEILING_FRACTION))
        dense = (self._dense_seconds(np.arange(self.max_tokens + 1)) if self.sparse is None
                 else self.sparse.dense_seconds(np.arange(self.max_tokens + 1)))
        dense = dense + 1e-3 * embedding_allreduce_ms(kernels.allreduce_ms, tp, np.arange(self.max_tokens + 1),
                                                      arch.hidden_size)
        self.dense_s = np.maximum.accumulate(dense)
        #: all MoE layers' experts and their exchange by the tokens of every data-parallel rank
        #: (only where those ranks' tokens meet: a data-parallel mixture of experts)
        self._experts: MeetingExperts | None = None
        if arch.is_moe and self.data_parallel_size > 1:
            meeting = np.arange(self.data_parallel_size * self.max_tokens + 1)
            self._experts = MeetingExperts(1e-3 * arch.moe_layers * self.sparse.experts_layer_ms(meeting))
        rows = np.arange(self.max_rows + 1)
        self.head_s = self._head_seconds(rows) + 1e-3 * logits_allgather_ms(kernels.allreduce_ms, tp, rows,
                                                                             arch.vocab_size)
        self._dense = self.dense_s.tolist()
        self._head = self.head_s.tolist()
        self._dense_slope = float(self.dense_s[-1] - self.dense_s[-1025]) / 1024
        self._head_slope = float(self.head_s[-1] - self.head_s[-257]) / 256
        layers = arch.full_attention_layers
        sh = self.shapes
        context_ms, generation_ms = kernels.context_attention_ms, kernels.generation_attention_ms
        if self.sparse is not None:
            context_ms, generation_ms = self.sparse.context_attention_ms, self.sparse.generation_attention_ms
        self.context_grid = LogGrid2D(
            lambda b, s: layers * 1e-3 * context_ms(
                sh.heads, sh.kv_heads, sh.head_dim, kv_dtype, b, s),
            GRID_MAX_SEQS, GRID_MAX_LEN, x_power=1.0, y_power=2.0)
        # decode attention is never faster than reading the batch's KV once (prefill: in step_time)
        self.generation_grid = LogGrid2D(
            lambda b, kv: np.maximum(layers * 1e-3 * generation_ms(
                sh.heads, sh.kv_heads, sh.head_dim, kv_dtype, b, kv), b * kv * self.kv_read_s_per_token),
            GRID_MAX_SEQS, GRID_MAX_LEN, x_power=1.0, y_power=1.0)
        #: sliding-window layers: attention over at most ``window`` tokens (None without them)
        self.window = arch.sliding_window if arch.sliding_window_layers else 0
        self.sliding_context_grid = self.sliding_generation_grid = None
        if self.window:
            sw = arch.sliding_window_layers
            self.sliding_context_grid = LogGrid2D(
                lambda b, s: sw * 1e-3 * context_ms(sh.heads, sh.kv_heads, sh.head_dim, kv_dtype, b, s),
                GRID_MAX_SEQS, GRID_MAX_LEN, x_power=1.0, y_power=2.0)
            self.sliding_generation_grid = LogGrid2D(
                lambda b, kv: sw * 1e-3 * generation_ms(sh.heads, sh.kv_heads, sh.head_dim, kv_dtype, b, kv),
                GRID_MAX_SEQS, GRID_MAX_LEN, x_power=1.0, y_power=1.0)
        #: per decode-sequence count: the step's fixed part and the attention grid at that count
        self._decode_by_count: dict[int, tuple[float, LogGridColumn]] = {}
        ranged = getattr(kernels, "measured_range", None)
        self.measured_range = ranged(sh.kv_heads, kv_dtype) if ranged else MeasuredRange()
        if self.sparse is not None and self.sparse.attention is not kernels:  # attention not from the tables
            self.measured_range = MeasuredRange(tokens=self.measured_range.tokens)
        r = self.measured_range
        self._top_m, self._top_db, self._top_dc = r.tokens, r.decode_batch, r.decode_context
        self._top_pb, self._top_pl = r.prefill_batch, r.prefill_length
        if r.decode_kv_heads_beyond:  # every decode query is then out of range
            self._top_db = 0.0
        if r.prefill_kv_heads_beyond:
            self._top_pb = 0.0
        #: queries priced outside the tables' measured range, by axis (see EXTRAPOLATION_AXES)
        self.extrapolations = dict.fromkeys(EXTRAPOLATION_AXES, 0)

    # --- construction ------------------------------------------------------------
    def _dense_seconds(self, m: np.ndarray) -> np.ndarray:
        """All layers' projections, element-wise kernels and all-reduces for m tokens."""
        k, sh, arch = self.kernels, self.shapes, self.arch
        h, d, w = sh.hidden, sh.head_dim, self.weight_dtype
        q_dim, kv_dim = sh.heads * d, sh.kv_heads * d
        gemm = (k.gemm_ms(m, q_dim + 2 * kv_dim, h, w)
                + k.gemm_ms(m, h, q_dim, w)
                + k.gemm_ms(m, 2 * sh.inter, h, w)
                + k.gemm_ms(m, h, sh.inter, w))
        ops = layer_memory_ops(sh, w, self.kv_dtype)
        measured = getattr(k, "layer_elementwise_ms", lambda m, ops: None)(
            m, layer_elementwise(h, sh.heads, sh.kv_heads, d, sh.inter))
        if measured is not None:  # norms, adds, rotary, SiLU measured; KV write, quantization: roofline
            ops = {name: b for name, b in ops.items() if name == "kv_cache_write" or name.startswith("quant")}
        per_token_ops = list(ops.values())
        mem = sum(np.where(m > 0, k.memory_op_ms(m * b), 0.0) for b in per_token_ops)
        if measured is not None:
            mem = mem + measured
        comm = 2 * k.allreduce_ms(self.tp, m * h) if self.tp > 1 else 0.0
        layer_ms = gemm + mem + comm + self._non_kernel_ms(m)
        edges = np.where(m > 0, 2 * k.memory_op_ms(m * 2 * h * ACT_BYTES), 0.0)  # embedding, final norm
        return 1e-3 * (arch.num_layers * layer_ms + edges) + m * self.host_s_per_token

    def _non_kernel_ms(self, m: np.ndarray) -> np.ndarray:
        """A layer's work beyond the common kernels, from data (``calibration.non_kernel``): ms for m tokens."""
        from calibration.non_kernel import non_kernel_layer_ms

        return non_kernel_layer_ms(self.kernels, self.arch, self.shapes, m)

    def _head_seconds(self, r: np.ndarray) -> np.ndarray:
        """LM head GEMM (kept in bf16 by vLLM's quantization) plus the sampler, for r rows."""
        sh = self.shapes
        lm = self.kernels.gemm_ms(r, sh.vocab, sh.hidden, "bf16")
        logits_bytes = r * self.arch.vocab_size * 4 * SAMPLER_LOGIT_PASSES
        bandwidth = self.hardware.memory_bandwidth_gbps * 1e9 * MEMORY_EFFICIENCY
        sampler = SAMPLER_FIXED_S + logits_bytes / bandwidth
        measured = getattr(self.kernels, "sampler_ms", lambda r, v: None)(r, self.arch.vocab_size)
        if measured is not None:
            sampler = 1e-3 * measured
        return np.where(r > 0, 1e-3 * lm + sampler + r * self.host_s_per_row, 0.0)

    # --- the hot path -------------------------------------------------------------
    def step_time(self, batch: StepBatch) -> float:
        pt = batch.prefill_tokens
        dc = batch.decode_context
        n_pre = len(pt)
        n_dec = len(dc)
        if not n_pre and not n_dec:
            return 0.0
        spec = sum(batch.decode_spec_tokens) if batch.decode_spec_tokens else 0
        m = (sum(pt) if n_pre else 0) + n_dec + spec
        rows = n_pre + n_dec + spec
        t = self.overhead_s
        if m > self._top_m:
            self.extrapolations["tokens"] += 1
        if m <= self.max_tokens:
            t += self._dense[m]
        else:
            t += self._dense[-1] + (m - self.max_tokens) * self._dense_slope
        if rows <= self.max_rows:
            t += self._head[rows]
        else:
            t += self._head[-1] + (rows - self.max_rows) * self._head_slope
        if n_pre:
            work = 0
            kv_tokens = 0
            for q, c in zip(pt, batch.prefill_context, strict=False):
                work += q * (2 * c + q)
                kv_tokens += q + c
            s_eff = math.sqrt(work / n_pre)
            if n_pre > self._top_pb or s_eff > self._top_pl:
                self._count_prefill(n_pre, s_eff)
            attn = self.context_grid(n_pre, s_eff)
            t += max(attn, kv_tokens * self.kv_read_s_per_token)
            if self.window:
                t += self._sliding_prefill(pt, batch.prefill_context)
        if n_dec:
            kv = sum(dc) / n_dec
            if n_dec > self._top_db or kv > self._top_dc:
                self._count_decode(n_dec, kv)
            t += self.generation_grid(n_dec, kv)
            if self.window:
                t += self.sliding_generation_grid(n_dec, min(kv, self.window))
        return t

    def experts_time(self, tokens: int) -> float:
        return self._experts(tokens) if self._experts is not None else 0.0

    def step_time_tables(self) -> StepTimeTables | None:
        """``step_time`` as tables (``PerformanceModel.step_time_tables``); None with sliding-window
        layers or where a subclass prices steps otherwise."""
        if self.window or type(self).step_time is not ComposedPerformanceModel.step_time:
            return None
        r = self.measured_range
        limits = np.array([self._top_m, self._top_pb, self._top_pl, self._top_db, self._top_dc,
                           r.prefill_batch, r.prefill_length, r.decode_batch, r.decode_context,
                           float(r.prefill_kv_heads_beyond), float(r.decode_kv_heads_beyond)], dtype=float)
        return StepTimeTables(self.overhead_s, np.asarray(self._dense, dtype=float), self._dense_slope,
                              self.max_tokens, np.asarray(self._head, dtype=float), self._head_slope, self.max_rows,
                              self.kv_read_s_per_token, self.context_grid.table(), self.generation_grid.table(),
                              limits)

    def counted(self, extrapolations: dict[str, int]) -> None:
        for axis, n in extrapolations.items():
            self.extrapolations[axis] += n

    def _sliding_prefill(self, prefill_tokens, prefill_context) -> float:
        """Sliding-window layers' prefill attention: each new token attends over at most the window.

        Priced as chunks of one effective length with the same work, counting
        ``q min(2c + q, 2 window)`` per chunk of q new tokens over c cached (full attention: ``q (2c + q)``).
        """
        w2 = 2 * self.window
        work = sum(q * min(2 * c + q, w2) for q, c in zip(prefill_tokens, prefill_context, strict=False))
        n = len(prefill_tokens)
        return self.sliding_context_grid(n, math.sqrt(work / n))

    def _count_prefill(self, chunks: float, length: float, n: int = 1) -> None:
        r, e = self.measured_range, self.extrapolations
        e["prefill_kv_heads"] += n if r.prefill_kv_heads_beyond else 0
        e["prefill_batch"] += n if chunks > r.prefill_batch else 0
        e["prefill_length"] += n if length > r.prefill_length else 0

    def _count_decode(self, seqs: float, kv: float, n: int = 1) -> None:
        r, e = self.measured_range, self.extrapolations
        e["decode_kv_heads"] += n if r.decode_kv_heads_beyond else 0
        e["decode_batch"] += n if seqs > r.decode_batch else 0
        e["decode_context"] += n if kv > r.decode_context else 0

    def decode_times(self, num_seqs: int, total_context) -> np.ndarray:
        """Pure-decode step times: they depend only on the sequence count and their total KV."""
        base, attention = self._decode_at(num_seqs)
        total = np.asarray(total_context, dtype=float)
        kv_mean = np.divide(total, num_seqs, out=np.empty(total.shape))
        self._count_decodes(num_seqs, total.size, kv_mean)
        sliding = None
        if self.window:  # (before ``attention``, which works in kv_mean's buffer)
            flat = kv_mean.reshape(-1)
            sliding = self.sliding_generation_grid.many(np.full(flat.shape, float(num_seqs)),
                                                        np.minimum(flat, self.window))
        out = attention(kv_mean.reshape(-1))
        out += base
        if sliding is not None:
            out += sliding
        return out.reshape(total.shape)

    def decode_times_by_count(self, counts: list[int], lengths: list[int], total_context: np.ndarray) -> np.ndarray:
        """``decode_times`` of several sequence counts in one vectorised pass (bit-identical to
        ``decode_times``, count by count); sliding-window models count by count."""
        if self.window:
            return super().decode_times_by_count(counts, lengths, total_context)
        bases, columns = [], []
        for size, steps in zip(counts, lengths, strict=True):
            base, column = self._decode_at(size)
            bases.append(base)
            columns.append(column)
            self._count_decodes(size, steps, None)
        which = np.repeat(np.arange(len(counts)), lengths)
        kv_mean = np.divide(np.asarray(total_context, dtype=float), np.array(counts)[which])
        self.extrapolations["decode_context"] += int(np.count_nonzero(kv_mean > self._top_dc))
        out = LogGridColumn.many(columns, which, kv_mean)
        out += np.array(bases)[which]
        return out

    def _decode_at(self, num_seqs: int) -> tuple[float, LogGridColumn]:
        """The fixed part of a pure-decode step of ``num_seqs`` sequences and its attention grid."""
        per_count = self._decode_by_count.get(num_seqs)
        if per_count is None:
            base = self.overhead_s + self._dense_at(num_seqs) + self._head_at(num_seqs)
            per_count = self._decode_by_count[num_seqs] = (base, self.generation_grid.at_x(float(num_seqs)))
        return per_count

    def _count_decodes(self, num_seqs: int, steps: int, kv_mean: np.ndarray | None) -> None:
        """Count ``steps`` decode steps of ``num_seqs`` sequences (mean KV ``kv_mean``, or None:
        counted by the caller) beyond the measured range."""
        if num_seqs > self._top_db:
            self._count_decode(num_seqs, 0.0, steps)
        if num_seqs > self._top_m:
            self.extrapolations["tokens"] += steps
        if kv_mean is not None:
            self.extrapolations["decode_context"] += int(np.count_nonzero(kv_mean > self._top_dc))

    def step_time_arrays(
        self,
        prefill_tokens: np.ndarray,
        prefill_context: np.ndarray,
        decode_seqs: np.ndarray,
        decode_context_mean: np.ndarray,
        spec_tokens: np.ndarray | None = None,
    ) -> np.ndarray:
        """Vectorised step time for steps with at most one prefill chunk each.

        Entry i is a step with ``prefill_tokens[i]`` new tokens (0: none) over
        ``prefill_context[i]`` cached ones, and ``decode_seqs[i]`` decode
        sequences whose KV lengths average ``decode_context_mean[i]``.
        Equals ``step_time`` on the corresponding StepBatch with uniform decode KV.
        """
        p = np.asarray(prefill_tokens, dtype=np.int64)
        c = np.asarray(prefill_context, dtype=float)
        n = np.asarray(decode_seqs, dtype=np.int64)
        kv = np.asarray(decode_context_mean, dtype=float)
        s = np.zeros_like(p) if spec_tokens is None else np.asarray(spec_tokens, dtype=np.int64)
        has_pre = p > 0
        m = p + n + s
        rows = has_pre.astype(np.int64) + n + s
        dense = np.where(m <= self.max_tokens, self.dense_s[np.minimum(m, self.max_tokens)],
                         self.dense_s[-1] + (m - self.max_tokens) * self._dense_slope)
        head = np.where(rows <= self.max_rows, self.head_s[np.minimum(rows, self.max_rows)],
                        self.head_s[-1] + (rows - self.max_rows) * self._head_slope)
        s_eff = np.sqrt(np.maximum(p * (2 * c + p), 1.0))
        ctx = np.maximum(self.context_grid.many(np.ones_like(s_eff), s_eff), (p + c) * self.kv_read_s_per_token)
        gen = self.generation_grid.many(np.maximum(n, 1), kv)
        self._count_arrays(has_pre, s_eff, n, kv, m)
        out = self.overhead_s + dense + head + np.where(has_pre, ctx, 0.0) + np.where(n > 0, gen, 0.0)
        if self.window:
            s_sw = np.sqrt(np.maximum(p * np.minimum(2 * c + p, 2 * self.window), 1.0))
            out = out + np.where(has_pre, self.sliding_context_grid.many(np.ones_like(s_sw), s_sw), 0.0)
            out = out + np.where(n > 0, self.sliding_generation_grid.many(np.maximum(n, 1),
                                                                          np.minimum(kv, self.window)), 0.0)
        return np.where((m > 0), out, 0.0)

    def _count_arrays(self, has_pre: np.ndarray, s_eff: np.ndarray, n: np.ndarray, kv: np.ndarray,
                      m: np.ndarray) -> None:
        """``_count_prefill``/``_count_decode`` over the steps of ``step_time_arrays``."""
        r, e = self.measured_range, self.extrapolations
        dec = n > 0
        e["tokens"] += int(np.count_nonzero(m > r.tokens))
        e["prefill_kv_heads"] += int(np.count_nonzero(has_pre)) if r.prefill_kv_heads_beyond else 0
        e["prefill_batch"] += int(np.count_nonzero(has_pre)) if r.prefill_batch < 1 else 0
        e["prefill_length"] += int(np.count_nonzero(has_pre & (s_eff > r.prefill_length)))
        e["decode_kv_heads"] += int(np.count_nonzero(dec)) if r.decode_kv_heads_beyond else 0
        e["decode_batch"] += int(np.count_nonzero(n > r.decode_batch))
        e["decode_context"] += int(np.count_nonzero(dec & (kv > r.decode_context)))

    def components(self, batch: StepBatch) -> dict[str, float]:
        """The step time split into its parts (seconds), for inspection and reports."""
        pt, dc = batch.prefill_tokens, batch.decode_context
        spec = sum(batch.decode_spec_tokens)
        m = sum(pt) + len(dc) + spec
        rows = len(pt) + len(dc) + spec
        out = {"overhead": self.overhead_s if m else 0.0,
               "dense": self._dense_at(m),
               "lm_head_sampler": self._head_at(rows),
               "context_attention": 0.0, "generation_attention": 0.0}
        if pt:
            work = sum(q * (2 * c + q) for q, c in zip(pt, batch.prefill_context, strict=False))
            attn = self.context_grid(len(pt), math.sqrt(work / len(pt)))
            kv_tokens = sum(pt) + sum(batch.prefill_context)
            out["context_attention"] = max(attn, kv_tokens * self.kv_read_s_per_token)
        if dc:
            out["generation_attention"] = self.generation_grid(len(dc), sum(dc) / len(dc))
        if self.window:
            out["sliding_attention"] = ((self._sliding_prefill(pt, batch.prefill_context) if pt else 0.0)
                                        + (self.sliding_generation_grid(len(dc), min(sum(dc) / len(dc), self.window))
                                           if dc else 0.0))
        return out

    def _dense_at(self, m: int) -> float:
        if m <= self.max_tokens:
            return self._dense[m]
        return self._dense[-1] + (m - self.max_tokens) * self._dense_slope

    def _head_at(self, rows: int) -> float:
        if rows <= self.max_rows:
            return self._head[rows]
        return self._head[-1] + (rows - self.max_rows) * self._head_slope

    # --- memory --------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        return self.memory_model.kv_bytes_per_token()

    def kv_groups(self):
        if not self.arch.sliding_window_layers:
            return None
        from simulator.records.kv_groups import model_kv_groups

        return model_kv_groups(self.arch)

    def memory(self, gpu_memory_utilization: float) -> MemoryBreakdown:
        return self.memory_model.breakdown(gpu_memory_utilization)

    def describe(self) -> dict:
        out = super().describe()
        out.update({
            "built_from": self.kernels.describe(),
            "hardware": self.hardware.name,
            "model": self.arch.name,
            "tp": self.tp,
            "weight_dtype": self.weight_dtype,
            "kv_cache_dtype": self.kv_dtype,
            "step_overhead_s": self.overhead_s,
            "extrapolated_queries": {k: v for k, v in self.extrapolations.items() if v},
        })
        if self.sparse is not None:  # what each sparse part's time comes from (measured or roofline)
            out["step_time_sources"] = dict(self.sparse.sources)
            if self.arch.is_moe:
                out["expert_parallel"] = self.expert_parallel
                out["data_parallel_size"] = self.data_parallel_size
        checks = getattr(getattr(self.kernels, "tables", None), "checks", None)
        if checks:  # rows of the kernel tables rejected as faster than physics (calibration.plausibility)
            out["kernel_rows_rejected"] = dict(checks["rejected"])
            out["kernel_rows_checked"] = dict(checks["checked"])
        return out


def roofline_model(
    arch: ModelArchitecture,
    hardware: Hardware,
    *,
    tp: int = 1,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 1024,
    host_s_per_token: float = 0.0,
    host_s_per_row: float = 0.0,
    expert_parallel: bool = False,
    data_parallel_size: int = 1,
) -> ComposedPerformanceModel:
    """The composed step model over roofline kernels, labelled uncalibrated."""
    return ComposedPerformanceModel(
        arch, hardware, RooflineKernels(hardware), tp=tp, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
        max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
        name=f"roofline-UNCALIBRATED:{hardware.name}:{arch.name}:{weight_dtype}:kv-{kv_dtype}:tp{tp}",
        calibrated=False, host_s_per_token=host_s_per_token, host_s_per_row=host_s_per_row,
        expert_parallel=expert_parallel, data_parallel_size=data_parallel_size,
    )
