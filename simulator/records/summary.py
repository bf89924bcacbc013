"""Summary: the figures of a run (summary.json), simulated or live, as a typed record.

The core fields come from ``metrics.summarize`` for every run; ``sections`` holds what a
producer adds after them, in the order added (written in that order):

- simulated runs: ``kv_cache`` {num_blocks, block_size, bytes_per_token, capacity_tokens},
  ``prefix_cache`` {queried_tokens, hit_tokens, hit_rate}, ``async_scheduling`` (bool),
  ``scheduler`` ("native" or "vllm"), ``partial`` {interrupted_at_s, unfinished, not_arrived}
  (a run stopped early), ``rejected_by_reason`` {reason: count}, ``warning`` (text);
- live runs also: ``spec_decode``, ``live`` (health figures and probes), ``source``.

JSON on disk is ``to_dict()``: the core fields in their order, then the sections. The record
also reads like the dictionary it replaces (``summary["completed"]``, ``summary.get("partial")``,
``summary["warning"] = ...``), so dictionary-style callers keep working.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypedDict


class Percentiles(TypedDict):
    """Of the completed requests' values (None when there are none)."""

    p50: float | None
    p90: float | None
    p99: float | None
    mean: float | None


class KVUsage(TypedDict):
    """KV-cache usage over time (time-weighted; None where a live source has no series)."""

    mean: float | None
    peak: float | None
    std: float | None
    seconds_above_95pct: float | None


class Throughput(TypedDict):
    output_tokens_per_s: float
    requests_per_s: float


class Goodput(TypedDict):
    """Requests meeting every SLO limit: count, rate, share, and whether the share meets the target."""

    good_requests: int
    requests_per_s: float
    attainment: float
    meets_slo: bool


class Stragglers(TypedDict):
    """The slowest ``share_of_requests`` (``count`` requests): their share of KV block-seconds
    and their mean E2E over the median."""

    share_of_requests: float
    count: int
    kv_block_seconds_share: float
    e2e_over_median: float



@dataclass
class Summary:
    """The figures of one run; a field is None when its source did not report it."""

    requests: int | None = None  # requests in the run
    completed: int | None = None
    rejected: int | None = None  # refused at admission (too long for the engine)
    aborted: int | None = None  # the client gave up (workload.timeout_s): left the engine unfinished
    failed: int | None = None  # live runs: errors
    duration_s: float | None = None  # from the first arrival to the end of the run
    ttft_s: Percentiles | None = None  # time to first token
    ttfvt_s: Percentiles | None = None  # time to first visible (non-reasoning) token
    tpot_s: Percentiles | None = None  # time per output token after the first
    e2e_s: Percentiles | None = None  # arrival to last token
    queue_s: Percentiles | None = None  # arrival to first scheduled
    kv_usage: KVUsage | None = None
    preemptions: int | None = None
    requests_preempted: int | None = None
    throughput: Throughput | None = None
    goodput: Goodput | None = None
    stragglers: Stragglers | None = None
    running_peak: int | None = None
    waiting_peak: int | None = None
    steps: int | None = None  # engine steps (timeline rows)
    #: what producers add after the core fields, in order (see the module docstring)
    sections: dict[str, Any] = field(default_factory=dict)
    #: core fields a summary read from disk did not have (left out again when written)
    absent: frozenset[str] = field(default=frozenset(), repr=False, compare=False)
    #: the key order of a summary read from disk (kept when written again)
    order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @staticmethod
    def core_names() -> tuple[str, ...]:
        """The core fields, in summary.json's order."""
        return CORE_FIELDS

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Summary:
        """From summary.json's content (without ``metadata``); unknown keys become sections."""
        core = cls.core_names()
        known = {k: data[k] for k in core if k in data}
        sections = {k: v for k, v in data.items() if k not in core}
        return cls(**known, sections=sections, absent=frozenset(k for k in core if k not in data),
                   order=tuple(data))

    def to_dict(self) -> dict[str, Any]:
        """summary.json's content: the core fields in order, then the sections in order (a
        summary read from disk keeps the file's order, new keys after)."""
        out = {k: getattr(self, k) for k in self.core_names() if k not in self.absent}
        out.update(self.sections)
        if not self.order:
            return out
        keys = [k for k in self.order if k in out] + [k for k in out if k not in self.order]
        return {k: out[k] for k in keys}

    # --- reads like the dictionary it replaces ---------------------------------------------
    def _is_core(self, key: str) -> bool:
        return key in self.core_names() and key not in self.absent

    def __getitem__(self, key: str) -> Any:
        if self._is_core(key):
            return getattr(self, key)
        return self.sections[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self.core_names():
            setattr(self, key, value)
            self.absent = self.absent - {key}
        else:
            self.sections[key] = value

    def __contains__(self, key: object) -> bool:
        return (isinstance(key, str) and self._is_core(key)) or key in self.sections

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        return default

    def keys(self) -> list[str]:
        return list(self.to_dict())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


CORE_FIELDS = tuple(f.name for f in fields(Summary) if f.name not in ("sections", "absent", "order"))
