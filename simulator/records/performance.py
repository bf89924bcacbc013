"""The PerformanceModel boundary between calibration and simulation.

A PerformanceModel turns one engine step's batch composition into a duration,
and tells how much KV cache fits and how the device memory is split. It knows
nothing of SimPy or of the scheduler. Calibration builds the concrete models
(fitted from profiles, composed from GPU kernel tables, roofline).
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field

import numpy as np

from simulator.records.errors import ConfigError


@dataclass(slots=True)
class StepBatch:
    """What one engine step computes.

    Per prefilling request: ``prefill_tokens[i]`` new prompt tokens on top of
    ``prefill_context[i]`` tokens already in the KV cache (earlier chunks or
    prefix-cache hits). Per decoding request: ``decode_context[j]``, the number
    of tokens it attends over (its KV length including the token being
    computed), and ``decode_spec_tokens[j]`` speculative draft tokens verified
    along with it (empty when speculation is off).
    """

    prefill_tokens: list[int] = field(default_factory=list)
    prefill_context: list[int] = field(default_factory=list)
    decode_context: list[int] = field(default_factory=list)
    decode_spec_tokens: list[int] = field(default_factory=list)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_tokens)

    @property
    def num_decode_seqs(self) -> int:
        return len(self.decode_context)

    @property
    def num_spec_tokens(self) -> int:
        return sum(self.decode_spec_tokens)

    @property
    def num_tokens(self) -> int:
        """All tokens run through the model this step."""
        return self.num_prefill_tokens + self.num_decode_seqs + self.num_spec_tokens

    @property
    def is_empty(self) -> bool:
        return not self.prefill_tokens and not self.decode_context


@dataclass(frozen=True)
class KVCapacity:
    """How much paged KV cache an engine gets."""

    num_blocks: int
    block_size: int
    bytes_per_token: int
    #: vLLM's KV cache groups when full-attention and sliding-window layers share the pool
    #: (simulator.records.kv_groups.KVGroups); None: one group of all layers
    groups: object | None = None

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes(self) -> int:
        return self.num_tokens * self.bytes_per_token


@dataclass(frozen=True)
class MemoryBreakdown:
    """Device memory of one replica, in bytes (per GPU for tensor parallel)."""

    total: int
    usable: int
    weights: int
    activation_peak: int
    other: int
    kv_cache: int

    def to_dict(self) -> dict:
        return asdict(self)


def keeps_shape_cache(linear_dispatch: str | None) -> bool:
    """Whether a CPU engine whose linear layers run ``linear_dispatch`` (the profiler's reading:
    ``onednn``, ``torch``, ``sgl``, ``zentorch``, several joined by ``+``) keeps per-row-count
    primitives, the set-up ShapeCacheCost prices: only oneDNN's matmul handlers do. vLLM falls
    back to torch's linear where it cannot build them (AVX2 without AVX-512), and there a new
    token count's first step costs what the next ones do. None (not read) counts as oneDNN."""
    return linear_dispatch is None or "onednn" in linear_dispatch.split("+")


@dataclass(frozen=True)
class ShapeCacheCost:
    """What a step pays when its engine meets a token count it has not run recently.

    vLLM's CPU engine runs every linear layer through a oneDNN matmul handler that
    keeps the primitives of its ``capacity`` most recent row counts (``create_onednn_mm``,
    ``primitive_cache_size=32``); a step whose token count is not among them builds
    new primitives first. What that costs: measured at some token counts
    (``measured_tokens`` -> ``measured_miss_s``, interpolated linearly, flat beyond the
    ends: the cost is far from linear in the count), else ``per_miss_s + per_miss_token_s
    * tokens``. Steps that prefill have varied token counts and pay it; decode-only steps
    (a token per running request: a few recurring counts) are taken as warm. GPU engines
    (CUDA graphs, cuBLAS) have no such term: their models carry none; nor has a CPU engine
    whose linear layers fell back to torch's (``keeps_shape_cache``).
    """

    capacity: int = 32
    per_miss_s: float = 0.0
    per_miss_token_s: float = 0.0
    source: str = ""
    measured_tokens: tuple[int, ...] = ()
    measured_miss_s: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        xs = self.measured_tokens
        if len(xs) != len(self.measured_miss_s) or any(b <= a for a, b in zip(xs, xs[1:], strict=False)):
            raise ConfigError("shape_cache", "measured_tokens must rise and match measured_miss_s one to one")

    def miss_s(self, tokens: int) -> float:
        xs, ys = self.measured_tokens, self.measured_miss_s
        if not xs:
            return max(0.0, self.per_miss_s + self.per_miss_token_s * tokens)
        if tokens <= xs[0]:
            return ys[0]
        if tokens >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, tokens)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(measured_tokens=list(self.measured_tokens), measured_miss_s=list(self.measured_miss_s))
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ShapeCacheCost:
        return cls(capacity=int(data.get("capacity", 32)), per_miss_s=float(data.get("per_miss_s", 0.0)),
                   per_miss_token_s=float(data.get("per_miss_token_s", 0.0)), source=str(data.get("source", "")),
                   measured_tokens=tuple(int(t) for t in data.get("measured_tokens") or ()),
                   measured_miss_s=tuple(float(m) for m in data.get("measured_miss_s") or ()))


@dataclass(frozen=True)
class GridTable:
    """A function of (x, y) >= 1 tabulated on a log2-uniform grid (``calibration.composed.LogGrid2D``)
    as plain numbers: ``res`` points per octave, ``nx`` x ``ny`` cells, beyond ``x_top`` and
    ``y_top`` scaled by powers ``x_power`` and ``y_power``, the logs of its values row by row
    (``log``, rows of ``width``)."""

    res: int
    nx: int
    ny: int
    x_top: float
    y_top: float
    x_power: float
    y_power: float
    log: np.ndarray
    width: int


@dataclass(frozen=True)
class StepTimeTables:
    """A performance model's step time as tables a compiled engine evaluates step by step exactly
    as the model's ``step_time`` does (``simulator.engine.compiled``): a fixed overhead, the dense
    layers by tokens (``dense``, then ``dense_slope`` per token past ``max_tokens``), the LM head
    and sampler by rows (``head``, ``head_slope`` past ``max_rows``), prefill attention by chunks
    and effective length (``context``, never under reading each chunk's KV once at
    ``kv_read_s_per_token``), decode attention by sequences and mean KV (``generation``).
    ``limits``: where its measurements end, by which queries beyond are counted (``counted``)."""

    overhead_s: float
    dense: np.ndarray
    dense_slope: float
    max_tokens: int
    head: np.ndarray
    head_slope: float
    max_rows: int
    kv_read_s_per_token: float
    context: GridTable
    generation: GridTable
    #: (tokens, prefill batch, prefill length, decode batch, decode context): above these a query
    #: counts as extrapolated (``counted``'s gates), then by the measured range itself
    #: (prefill batch, prefill length, decode batch, decode context) and whether the KV heads
    #: were beyond it (prefill, decode: 1.0 or 0.0)
    limits: np.ndarray


class PerformanceModel(ABC):
    """Step time, KV capacity and memory of one model on one hardware setup."""

    #: short identifier, e.g. "aiconfigurator:h100_sxm:r1-distill-qwen-7b:bf16:tp1"
    name: str = "performance-model"
    #: False for models not calibrated on measurements (roofline); shown in outputs
    calibrated: bool = True
    #: the hardware the model was measured on, when it knows better than the hardware group
    #: (a profile: e.g. "cpu-amd-2c"); None: the hardware group's name
    hardware_label: str | None = None
    #: engine settings the model was measured with (a profile), the run's defaults; None: none
    engine_settings: dict | None = None
    #: the engine's per-shape set-up cost (vLLM's CPU engine, from a profile); None: none
    shape_cache: ShapeCacheCost | None = None

    @abstractmethod
    def step_time(self, batch: StepBatch) -> float:
        """Seconds one engine step takes, host overhead included."""

    @abstractmethod
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token occupies across all layers (per GPU)."""

    @abstractmethod
    def memory(self, gpu_memory_utilization: float) -> MemoryBreakdown:
        """How device memory splits into weights, activations, other and KV."""

    def experts_time(self, tokens: int) -> float:
        """Seconds of the layers where every data-parallel rank's tokens meet (a mixture of experts
        run data-parallel with expert parallelism: the routed experts and the exchange around
        them), for ``tokens`` tokens from all ranks; 0 for a model without such layers.

        ``step_time`` prices them for every rank loaded as this one (its tokens times the ranks);
        a lock-step group that knows each rank's tokens takes them out and prices their sum.
        """
        return 0.0

    def decode_times(self, num_seqs: int, total_context):
        """Step times of many pure-decode batches at once, or None if not supported.

        A model whose decode-only step time depends on nothing but the number
        of sequences and the total context they attend over returns, for an
        array ``total_context``, one step time per entry, equal (to rounding)
        to ``step_time`` of such a batch. The engine's fast path uses it to
        advance runs of identical decode steps in closed form.
        """
        return None

    def decode_times_by_count(self, counts: list[int], lengths: list[int], total_context):
        """``decode_times`` of several sequence counts in one call, or None if not supported:
        ``lengths[j]`` steps of ``counts[j]`` sequences, then the next count's; ``total_context``
        holds each step's total. Equal, bit for bit, to ``decode_times`` count by count (this
        default computes it so; a model may do it in one vectorised pass)."""
        bounds = np.cumsum([0, *lengths]).tolist()
        parts = []
        for count, a, b in zip(counts, bounds, bounds[1:], strict=False):
            times = self.decode_times(count, total_context[a:b])
            if times is None:
                return None
            parts.append(np.asarray(times, dtype=float))
        return np.concatenate(parts) if parts else np.zeros(0)

    def step_time_tables(self) -> StepTimeTables | None:
        """``step_time`` as tables a compiled engine evaluates bit for bit as ``step_time`` does,
        or None (the default) where it cannot be written so."""
        return None

    def counted(self, extrapolations: dict[str, int]) -> None:  # noqa: B027  (a hook: most count nothing)
        """Steps a compiled engine priced from ``step_time_tables`` beyond the measured range, by
        axis, as ``step_time`` would have counted them."""

    def kv_capacity(
        self,
        block_size: int,
        gpu_memory_utilization: float = 0.9,
        num_gpu_blocks_override: int | None = None,
    ) -> KVCapacity:
        """KV blocks the engine gets, as vLLM sizes them (or the override)."""
        per_token = self.kv_bytes_per_token()
        if num_gpu_blocks_override:
            blocks = int(num_gpu_blocks_override)
        else:
            kv_bytes = self.memory(gpu_memory_utilization).kv_cache
            blocks = kv_bytes // (per_token * block_size)
        if blocks <= 0:
            raise ConfigError(
                "hardware",
                f"model {self.name} leaves no memory for the KV cache "
                f"(gpu_memory_utilization={gpu_memory_utilization})",
            )
        return KVCapacity(num_blocks=int(blocks), block_size=block_size, bytes_per_token=per_token,
                          groups=self.kv_groups())

    def kv_groups(self):
        """vLLM's KV cache groups of a hybrid (sliding-window) model, or None (one group)."""
        return None

    def describe(self) -> dict:
        """Provenance for the run record: what this model was built from."""
        return {"name": self.name, "calibrated": self.calibrated, "type": type(self).__name__}
