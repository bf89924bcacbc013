"""The profiling grid: which batch compositions to measure, as a list of points.

Pure functions: no vLLM here. A point is the unit of progress, resume and
out-of-memory handling. Phases:

- ``prefill``: one request computes ``chunk`` new tokens over ``context`` cached tokens;
- ``decode``: ``batch`` requests decode over ``context`` tokens each; with ``decode_windows`` > 1
  every decode point is measured again in later rounds (``window`` 1, 2, ...: after the other
  phases, before the shapes), its prompts found in the prefix cache;
- ``mixed``: a small workload; the scheduler mixes prefill chunks and decodes itself;
- ``prefix``: requests sharing a ``prefix`` (first one misses, the others hit), ``suffix`` new tokens;
- ``spec``: ``batch`` requests with repetitive prompts of ``context`` tokens, so drafts get proposed;
- ``shapes`` (last): a prefill of ``tokens`` new tokens that no step before had, then the same count
  again: the first step pays the engine's per-shape set-up (vLLM CPU's oneDNN primitives), the
  others are warm (steps phased ``shape_cold`` / ``shape_warm``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from profiler.field_types import check_fields, check_known
from simulator.records.errors import require

PHASES = ("prefill", "decode", "mixed", "prefix", "spec", "shapes")
EXTRA_PHASES = ("prefix", "spec")


@dataclass(frozen=True)
class MixedSpec:
    requests: int = 32
    prompt_tokens: tuple[int, int] = (32, 1536)
    output_tokens: tuple[int, int] = (8, 64)
    wave_size: int = 4
    wave_every_steps: int = 6

    def __post_init__(self) -> None:
        check_fields(self, "grid.mixed.")


@dataclass(frozen=True)
class PrefixSpec:
    prefix_lengths: tuple[int, ...] = (512, 2048, 6144)
    suffix_lengths: tuple[int, ...] = (64, 512)
    requests_per_prefix: int = 3

    def __post_init__(self) -> None:
        check_fields(self, "grid.prefix.")


@dataclass(frozen=True)
class SpecSpec:
    batches: tuple[int, ...] = (1, 4, 16)
    contexts: tuple[int, ...] = (256, 2048)
    steps: int = 8
    pattern_tokens: int = 16

    def __post_init__(self) -> None:
        check_fields(self, "grid.spec.")


@dataclass(frozen=True)
class ShapesSpec:
    enabled: bool = True
    #: token counts as shares of max_num_batched_tokens, made odd; each is measured at T and T + 2
    budget_shares: tuple[float, ...] = (0.05, 0.15, 0.30, 0.55, 0.85)
    #: warm steps after the cold one, per token count
    warm_repeats: int = 2

    def __post_init__(self) -> None:
        check_fields(self, "grid.shapes.")
        require(all(0 < s <= 1 for s in self.budget_shares), "grid.shapes.budget_shares",
                f"must be numbers in (0, 1], got {list(self.budget_shares)}")
        require(self.warm_repeats >= 1, "grid.shapes.warm_repeats", f"must be >= 1, got {self.warm_repeats}")


def shape_token_counts(spec: ShapesSpec, max_num_batched_tokens: int) -> list[int]:
    """Odd token counts (T and T + 2 per share) within the budget: the grid's counts are even."""
    counts: set[int] = set()
    for share in spec.budget_shares:
        odd = max(1, int(round(share * max_num_batched_tokens))) | 1
        counts.update(t for t in (odd, odd + 2) if t <= max_num_batched_tokens)
    return sorted(counts)


@dataclass(frozen=True)
class GridSpec:
    """Grid parameters (conf/profiler/grid/<name>.yaml)."""

    name: str = "default"
    repeats: int = 3
    prefill_chunks: tuple[int, ...] = (32, 128, 512, 2048)
    prefill_contexts: tuple[int, ...] = (0, 1024, 4096, 8192)
    decode_batches: tuple[int, ...] = (1, 4, 16, 64)
    decode_contexts: tuple[int, ...] = (128, 1024, 4096, 16384)
    decode_max_batch_tokens: int = 16384
    #: rounds each decode point is measured in, apart in time (a step's speed on a shared CPU
    #: moves from one moment to the next; consecutive repeats share the moment)
    decode_windows: int = 3
    mixed: MixedSpec = field(default_factory=MixedSpec)
    prefix: PrefixSpec = field(default_factory=PrefixSpec)
    spec: SpecSpec = field(default_factory=SpecSpec)
    shapes: ShapesSpec = field(default_factory=ShapesSpec)

    def __post_init__(self) -> None:
        check_fields(self, "grid.")
        require(self.repeats >= 1, "grid.repeats", "must be >= 1")
        require(self.decode_windows >= 1, "grid.decode_windows", "must be >= 1")
        for key in ("prefill_chunks", "decode_batches", "decode_contexts"):
            values = getattr(self, key)
            require(len(values) > 0 and min(values) >= 1, f"grid.{key}", "must be a non-empty list of integers >= 1")
        require(min(self.prefill_contexts, default=0) >= 0, "grid.prefill_contexts", "must be >= 0")
        require(self.mixed.requests >= 0, "grid.mixed.requests", "must be >= 0")
        require(self.spec.steps >= 1, "grid.spec.steps", "must be >= 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GridSpec:
        data = dict(data)
        sub = {"mixed": MixedSpec, "prefix": PrefixSpec, "spec": SpecSpec, "shapes": ShapesSpec}
        check_known(data, cls.__dataclass_fields__, "grid.")
        for key, typ in sub.items():
            if key in data:
                require(isinstance(data[key] or {}, dict), f"grid.{key}", f"must be a mapping, got {data[key]!r}")
                part = dict(data[key] or {})
                check_known(part, typ.__dataclass_fields__, f"grid.{key}.")
                data[key] = typ(**{k: tuple(v) if isinstance(v, list) else v for k, v in part.items()})
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class GridPoint:
    """One measurement: its phase, parameters and size (for out-of-memory skipping)."""

    phase: str
    params: tuple[tuple[str, int], ...]
    #: compared component-wise: a point at least this large in every component is "larger"
    size: tuple[int, ...]

    @property
    def point_id(self) -> str:
        return self.phase + "".join(f"/{k}{v}" for k, v in self.params)

    def param(self, key: str) -> int:
        return dict(self.params)[key]

    def is_larger_or_equal(self, other: GridPoint) -> bool:
        """True when self is in other's phase and at least as large in every size component."""
        return self.phase == other.phase and all(a >= b for a, b in zip(self.size, other.size, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {"point_id": self.point_id, "phase": self.phase, "params": dict(self.params)}


def _point(phase: str, size_keys: tuple[str, ...], **params: int) -> GridPoint:
    return GridPoint(phase, tuple(params.items()), tuple(params[k] for k in size_keys))


def build_points(
    grid: GridSpec,
    phases: tuple[str, ...],
    max_model_len: int,
    max_num_batched_tokens: int,
    shape_cache: bool = True,
) -> tuple[list[GridPoint], list[dict[str, Any]]]:
    """The grid's points in measuring order, and the nominal points left out (with why).

    Prefill chunks above the engine's token budget and points that do not fit
    in ``max_model_len`` cannot be built by the scheduler, so they are left out; so are the
    shapes phase's points where the engine keeps no per-shape set-up (``shape_cache`` False:
    simulator.records.performance.keeps_shape_cache).
    """
    points: list[GridPoint] = []
    left_out: list[dict[str, Any]] = []

    def keep(point: GridPoint, fits: bool, why: str) -> None:
        if fits:
            points.append(point)
        else:
            left_out.append({**point.to_dict(), "reason": why})

    for context in sorted(grid.prefill_contexts):
        for chunk in sorted(grid.prefill_chunks):
            point = _point("prefill", ("chunk", "context"), chunk=chunk, context=context)
            if chunk > max_num_batched_tokens:
                keep(point, False, f"chunk {chunk} > max_num_batched_tokens {max_num_batched_tokens}")
            else:
                keep(point, context + chunk + 1 <= max_model_len,
                     f"context + chunk exceeds max_model_len {max_model_len}")
    decode_steps = 2 * grid.repeats + 3  # measured steps, with retries, and the warm-up step
    decode_points = []
    for context in sorted(grid.decode_contexts):
        for batch in sorted(grid.decode_batches):
            if batch * context > grid.decode_max_batch_tokens:
                continue
            point = _point("decode", ("batch", "context"), batch=batch, context=context)
            fits = context + decode_steps <= max_model_len
            keep(point, fits, f"context + {decode_steps} decode steps exceeds max_model_len {max_model_len}")
            if fits:
                decode_points.append(point)
    if grid.mixed.requests > 0:
        fits = grid.mixed.prompt_tokens[1] + grid.mixed.output_tokens[1] <= max_model_len
        keep(_point("mixed", ("requests",), requests=grid.mixed.requests), fits,
             f"longest mixed request exceeds max_model_len {max_model_len}")
    if "prefix" in phases:
        for prefix in sorted(grid.prefix.prefix_lengths):
            for suffix in sorted(grid.prefix.suffix_lengths):
                keep(_point("prefix", ("prefix", "suffix"), prefix=prefix, suffix=suffix),
                     prefix + suffix + 1 <= max_model_len,
                     f"prefix + suffix exceeds max_model_len {max_model_len}")
    if "spec" in phases:
        for context in sorted(grid.spec.contexts):
            for batch in sorted(grid.spec.batches):
                keep(_point("spec", ("batch", "context"), batch=batch, context=context),
                     context + grid.spec.steps * 16 <= max_model_len,
                     f"context + decode steps exceed max_model_len {max_model_len}")
    for window in range(1, grid.decode_windows):
        points += [_point("decode", ("batch", "context"), **dict(p.params), window=window) for p in decode_points]
    if grid.shapes.enabled:
        for tokens in shape_token_counts(grid.shapes, max_num_batched_tokens):
            if not shape_cache:
                keep(_point("shapes", ("tokens",), tokens=tokens), False,
                     "the engine's linear layers keep no per-shape set-up (not oneDNN): nothing to measure")
                continue
            keep(_point("shapes", ("tokens",), tokens=tokens), tokens + 1 <= max_model_len,
                 f"tokens exceed max_model_len {max_model_len}")
    return points, left_out


def kv_tokens_needed(point: GridPoint, grid: GridSpec, block_size: int) -> int:
    """KV-cache tokens (rounded up to whole blocks per request) a point holds at its peak."""

    def blocks(tokens: int) -> int:
        return -(-tokens // block_size) * block_size

    if point.phase == "prefill":
        return blocks(point.param("context") + point.param("chunk") + 1)
    if point.phase == "decode":
        return point.param("batch") * blocks(point.param("context") + 2 * grid.repeats + 4)
    if point.phase == "spec":
        return point.param("batch") * blocks(point.param("context") + grid.spec.steps * 16)
    if point.phase == "prefix":
        return blocks(point.param("prefix") + point.param("suffix") + 1) + blocks(point.param("suffix") + 1)
    if point.phase == "mixed":
        return blocks(grid.mixed.prompt_tokens[1] + grid.mixed.output_tokens[1])
    if point.phase == "shapes":
        return blocks(point.param("tokens") + 1)
    raise ValueError(point.phase)
