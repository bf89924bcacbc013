"""EngineConfig: the vLLM engine arguments the simulator honours, under vLLM's names."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from simulator.records.errors import ConfigError, require

# speculative methods the simulator models (EAGLE, MTP, draft models: not modelled)
SPECULATIVE_METHODS = ("ngram",)


#: vLLM's VllmConfig.num_lookahead_tokens (vllm/config/vllm.py), as an offset to
#: num_speculative_tokens per drafter: None for drafters that keep no KV of their own
#: (n-gram: its drafts are scheduled tokens and get their slots as such, so no lookahead),
#: 0 for EAGLE / MTP / draft models (k slots), 1 for DFlash (k + 1).
LOOKAHEAD_PAST_SPEC = {"ngram": None, "eagle": 0, "eagle3": 0, "mtp": 0, "draft_model": 0, "dflash": 1}


def lookahead_tokens(method: str, num_speculative_tokens: int) -> int:
    """KV slots vLLM reserves past a request's scheduled tokens for its drafter (0: none)."""
    extra = LOOKAHEAD_PAST_SPEC.get(method)
    if not num_speculative_tokens or extra is None:
        return 0
    return num_speculative_tokens + extra


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding as the simulator models it.

    Each decode step proposes up to ``num_speculative_tokens`` draft tokens
    (with probability ``proposal_rate``, since n-gram drafters often find no
    match); draft position i is accepted with probability
    ``acceptance_rate[i]`` given that positions before it were accepted.
    ``num_lookahead_tokens`` (null: vLLM's rule for the method, 0 for n-gram; see
    lookahead_tokens below) KV slots are reserved past each scheduled step,
    as vLLM's allocate_slots does for drafters that write KV of their own (EAGLE: k).
    """

    method: str = "ngram"
    num_speculative_tokens: int = 0
    acceptance_rate: tuple[float, ...] = ()
    proposal_rate: float = 1.0
    num_lookahead_tokens: int | None = None

    def __post_init__(self) -> None:
        check_field_types(self, "engine.speculative", {"acceptance_rate"})
        require(self.method in SPECULATIVE_METHODS, "engine.speculative.method",
                f"{self.method!r} is not modelled; allowed: {', '.join(SPECULATIVE_METHODS)}")
        require(
            isinstance(self.acceptance_rate, (list, tuple))
            and all(isinstance(r, numbers.Real) and not isinstance(r, bool) for r in self.acceptance_rate),
            "engine.speculative.acceptance_rate",
            f"must be a list of numbers in [0, 1], got {self.acceptance_rate!r}",
        )
        require(self.num_speculative_tokens >= 0, "engine.speculative.num_speculative_tokens", "must be >= 0")
        rates = tuple(float(r) for r in self.acceptance_rate)
        object.__setattr__(self, "acceptance_rate", rates)
        if self.num_speculative_tokens:
            require(
                len(rates) in (1, self.num_speculative_tokens),
                "engine.speculative.acceptance_rate",
                f"needs 1 or {self.num_speculative_tokens} entries, got {len(rates)}",
            )
        require(all(0 <= r <= 1 for r in rates), "engine.speculative.acceptance_rate", "entries must lie in [0, 1]")
        require(0 <= self.proposal_rate <= 1, "engine.speculative.proposal_rate", "must lie in [0, 1]")
        require(self.num_lookahead_tokens is None or self.num_lookahead_tokens >= 0,
                "engine.speculative.num_lookahead_tokens",
                f"must be null (vLLM's rule for the method) or >= 0, got {self.num_lookahead_tokens}")

    @property
    def enabled(self) -> bool:
        return self.num_speculative_tokens > 0

    @property
    def lookahead(self) -> int:
        """KV slots reserved past a request's scheduled tokens (0 without speculation)."""
        if not self.enabled:
            return 0
        if self.num_lookahead_tokens is not None:
            return self.num_lookahead_tokens
        return lookahead_tokens(self.method, self.num_speculative_tokens)

    def rate_at(self, position: int) -> float:
        """Acceptance probability of draft position ``position`` (0-based)."""
        rates = self.acceptance_rate
        return rates[position] if len(rates) > 1 else (rates[0] if rates else 0.0)


@dataclass(frozen=True)
class EngineConfig:
    """Scheduler and KV-cache settings of one vLLM V1 replica.

    Defaults are vLLM 0.32's for its OpenAI server on a data-centre GPU.
    ``num_gpu_blocks_override`` sets the KV capacity directly, as in vLLM.
    """

    block_size: int = 16
    max_num_seqs: int = 1024
    max_num_batched_tokens: int = 8192
    max_model_len: int = 32768
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_dtype: str = "auto"
    scheduler: str = "native"
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    #: vLLM's async scheduling (step k+1 scheduled while step k runs, its output processing
    #: overlapped); null: vLLM's rule (on, off for n-gram speculation; a profile: its server's)
    async_scheduling: bool | None = None
    #: vLLM's --enable-expert-parallel: a mixture-of-experts model's experts are spread whole
    #: over the tp GPUs instead of each being split tp ways (calibration.sparse)
    enable_expert_parallel: bool = False
    #: vLLM's --data-parallel-size: that many engine ranks, each with its own scheduler, KV cache
    #: and attention (weights replicated); a mixture-of-experts model's experts spread over all
    #: dp x tp GPUs. The simulator runs the ranks as replicas on one clock (simulator.cluster_run)
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        check_field_types(self, "engine", {"speculative"})
        require(self.data_parallel_size >= 1, "engine.data_parallel_size",
                f"must be an integer >= 1, got {self.data_parallel_size!r}")
        require(self.block_size >= 1, "engine.block_size", "must be >= 1")
        require(self.max_num_seqs >= 1, "engine.max_num_seqs", "must be >= 1")
        require(self.max_num_batched_tokens >= 1, "engine.max_num_batched_tokens", "must be >= 1")
        require(self.max_model_len >= 2, "engine.max_model_len", "must be >= 2")
        require(
            self.max_num_batched_tokens >= self.block_size,
            "engine.max_num_batched_tokens",
            f"must be >= block_size={self.block_size} (a step must fit at least one KV block), "
            f"got {self.max_num_batched_tokens}",
        )
        require(  # vLLM's SchedulerConfig refuses it too
            self.max_num_batched_tokens >= self.max_num_seqs,
            "engine.max_num_batched_tokens",
            f"must be >= max_num_seqs={self.max_num_seqs} (vLLM refuses a smaller token budget), "
            f"got {self.max_num_batched_tokens}",
        )
        if self.max_model_len % self.block_size:
            # a power-of-two block size (vLLM's) blames max_model_len; any other blames block_size
            if self.block_size & (self.block_size - 1) == 0:
                nearest = max(1, round(self.max_model_len / self.block_size)) * self.block_size
                raise ConfigError(
                    "engine.max_model_len",
                    f"must be a multiple of block_size={self.block_size} (e.g. {nearest}), "
                    f"got {self.max_model_len}",
                )
            raise ConfigError(
                "engine.block_size",
                f"{self.block_size} does not divide max_model_len={self.max_model_len}; "
                "allowed: a divisor of max_model_len such as 16, 32, 64 or 128",
            )
        require(
            0 < self.gpu_memory_utilization <= 1,
            "engine.gpu_memory_utilization",
            "must lie in (0, 1]",
        )
        full = -(-self.max_model_len // self.block_size) + 1
        require(
            self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 2,
            "engine.num_gpu_blocks_override",
            f"must be null or >= 2 blocks (one is vLLM's null block; {full} blocks hold a request of "
            f"max_model_len={self.max_model_len} tokens, fewer reject longer requests), "
            f"got {self.num_gpu_blocks_override}",
        )
        require(self.long_prefill_token_threshold >= 0, "engine.long_prefill_token_threshold", "must be >= 0")
        require(
            self.scheduler in ("native", "vllm"),
            "engine.scheduler",
            f"unknown scheduler {self.scheduler!r}; allowed: native, vllm",
        )
        if not self.enable_chunked_prefill:
            require(
                self.max_num_batched_tokens >= self.max_model_len,
                "engine.max_num_batched_tokens",
                f"must be >= max_model_len={self.max_model_len} when chunked prefill is off",
            )
        if isinstance(self.speculative, dict):
            object.__setattr__(self, "speculative", SpeculativeConfig(**self.speculative))
        k = self.speculative.num_speculative_tokens
        require(  # a decode with k draft tokens schedules 1 + k tokens; a smaller budget stalls
            self.max_num_batched_tokens >= 1 + k,
            "engine.max_num_batched_tokens",
            f"must be >= 1 + num_speculative_tokens={1 + k} (one speculative decode), "
            f"got {self.max_num_batched_tokens}",
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineConfig:
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError("engine", f"unknown fields {sorted(unknown)}; allowed: {sorted(known)}")
        spec = data.pop("speculative", None) or {}
        if not isinstance(spec, SpeculativeConfig):
            spec_known = {f.name for f in fields(SpeculativeConfig)}
            bad = set(spec) - spec_known
            if bad:
                raise ConfigError(
                    "engine.speculative", f"unknown fields {sorted(bad)}; allowed: {sorted(spec_known)}"
                )
            spec = SpeculativeConfig(**spec)
        return cls(speculative=spec, **data)


_KINDS = {
    "int": (numbers.Integral, "an integer"),
    "float": (numbers.Real, "a number"),
    "bool": (bool, "true or false"),
    "str": (str, "a string"),
}


def check_field_types(record, prefix: str, skip: frozenset[str] | set[str] = frozenset()) -> None:
    """Refuse a field whose value has the wrong type (e.g. ``block_size=abc``), naming it."""
    for f in fields(record):
        if f.name in skip:
            continue
        value = getattr(record, f.name)
        annotation = str(f.type)
        if value is None and "None" in annotation:
            continue
        kind = annotation.split("|")[0].strip()
        if kind not in _KINDS:
            continue
        types, words = _KINDS[kind]
        ok = isinstance(value, types) and (kind == "bool" or not isinstance(value, bool))
        if not ok:
            allowed = f"{words} or null" if "None" in annotation else words
            raise ConfigError(f"{prefix}.{f.name}", f"must be {allowed}, got {value!r}")


def parse_key_values(items: list[str] | None, field: str) -> dict[str, Any]:
    """``key=value`` strings (command-line settings) -> dict, values parsed as YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(field, f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out
