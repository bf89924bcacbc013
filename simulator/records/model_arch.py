"""ModelArchitecture: the few numbers of a transformer that set its cost and memory.

Each model is a small YAML file in conf/model/ (no hub needed). The same record
is used by the profiler (checking measured KV bytes), calibration (GEMM shapes)
and the simulator (KV capacity).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from simulator.records.engine_config import check_field_types
from simulator.records.errors import ConfigError, require

DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4,
               "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1, "int4": 0.5,
               # OCP MX FP4: 4-bit elements plus one 8-bit scale per 32 (4.25 bits)
               "mxfp4": 4.25 / 8,
               # int4 with one bf16 scale per group of 32 (compressed-tensors W4A16, Kimi-K2's experts)
               "int4_g32": (4 + 16 / 32) / 8}


def dtype_bytes(dtype: str, field: str = "dtype") -> float:
    """Bytes per element of a dtype name."""
    if dtype not in DTYPE_BYTES:
        raise ConfigError(field, f"unknown dtype {dtype!r}; allowed: {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class ModelArchitecture:
    """A decoder-only transformer: dense (Llama / Qwen family) unless the optional fields say more.

    Optional, all 0 / "" for a dense model (whose numbers are then unchanged):

    - mixture of experts: ``num_experts`` routed experts of ``moe_intermediate_size``, of which
      ``num_experts_per_tok`` run per token, plus ``num_shared_experts`` always-on ones of the
      same size; the first ``first_k_dense_replace`` layers keep a dense MLP of
      ``intermediate_size``;
    - multi-head latent attention (DeepSeek): ``kv_lora_rank`` + ``qk_rope_head_dim`` are what a
      token keeps in the KV cache per layer; ``q_lora_rank``, ``qk_nope_head_dim`` and
      ``v_head_dim`` shape the projections;
    - sliding windows: ``sliding_window_layers`` of the layers attend over the last
      ``sliding_window`` tokens only (gpt-oss alternates sliding and full layers);
    - ``weight_dtype``: the checkpoint's linear layers when they ship quantized ("fp8" for
      DeepSeek-R1; "" = ``dtype``); ``expert_dtype``: the routed experts' ("mxfp4" for gpt-oss).
    """

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    dtype: str = "bf16"
    hf_name: str = ""
    family: str = "llama"
    weight_dtype: str = ""
    num_experts: int = 0
    num_experts_per_tok: int = 0
    num_shared_experts: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    expert_dtype: str = ""
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    sliding_window: int = 0
    sliding_window_layers: int = 0

    def __post_init__(self) -> None:
        check_field_types(self, "model")
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for f in ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size", "head_dim"):
            require(int(getattr(self, f)) > 0, f"model.{f}", "must be a positive integer")
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "model.num_key_value_heads",
            f"must divide num_attention_heads={self.num_attention_heads}",
        )
        dtype_bytes(self.dtype, "model.dtype")
        for f in ("weight_dtype", "expert_dtype"):
            if getattr(self, f):
                dtype_bytes(getattr(self, f), f"model.{f}")
        for f in ("num_experts", "num_experts_per_tok", "num_shared_experts", "moe_intermediate_size",
                  "first_k_dense_replace", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
                  "qk_nope_head_dim", "v_head_dim", "sliding_window", "sliding_window_layers"):
            require(int(getattr(self, f)) >= 0, f"model.{f}", "must be >= 0")
        if self.num_experts:
            require(0 < self.num_experts_per_tok <= self.num_experts, "model.num_experts_per_tok",
                    f"must lie in [1, num_experts={self.num_experts}]")
            require(self.moe_intermediate_size > 0, "model.moe_intermediate_size", "must be > 0 with experts")
            require(self.first_k_dense_replace < self.num_layers, "model.first_k_dense_replace",
                    f"must be < num_layers={self.num_layers}")
        if self.kv_lora_rank:
            require(self.qk_rope_head_dim > 0 and self.qk_nope_head_dim > 0 and self.v_head_dim > 0,
                    "model.qk_rope_head_dim", "MLA needs qk_rope_head_dim, qk_nope_head_dim and v_head_dim > 0")
            require(not self.sliding_window_layers, "model.sliding_window_layers",
                    "sliding windows with latent attention are not modelled")
        if self.sliding_window_layers:
            require(self.sliding_window > 0, "model.sliding_window", "must be > 0 with sliding_window_layers")
            require(self.sliding_window_layers < self.num_layers, "model.sliding_window_layers",
                    f"must be < num_layers={self.num_layers} (some layers attend fully)")

    # --- kinds -----------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_layers(self) -> int:
        """Layers whose MLP is a mixture of experts."""
        return self.num_layers - self.first_k_dense_replace if self.is_moe else 0

    @property
    def full_attention_layers(self) -> int:
        return self.num_layers - self.sliding_window_layers

    @property
    def expert_params(self) -> int:
        """Parameters of the routed experts (all layers)."""
        return self.moe_layers * self.num_experts * 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def active_params(self) -> int:
        """Parameters one token runs through (routed experts: only its ``num_experts_per_tok``)."""
        if not self.is_moe:
            return self.num_params
        active = self.moe_layers * self.num_experts_per_tok * 3 * self.hidden_size * self.moe_intermediate_size
        return self.num_params - self.expert_params + active

    def _attention_params(self) -> int:
        h, q, kv, d = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q_proj = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * q * qk
                      if self.q_lora_rank else h * q * qk)
            kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv_b = self.kv_lora_rank * q * (self.qk_nope_head_dim + self.v_head_dim)
            return q_proj + kv_a + kv_b + q * self.v_head_dim * h
        attn = h * (q * d) + 2 * h * (kv * d) + (q * d) * h
        if self.attention_bias:
            attn += q * d + 2 * kv * d
        return attn

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings and LM head included)."""
        if self.is_moe or self.is_mla:
            return self._sparse_params()
        h, q, kv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        d = self.head_dim
        attn = h * (q * d) + 2 * h * (kv * d) + (q * d) * h
        if self.attention_bias:
            attn += q * d + 2 * kv * d
        mlp = 3 * h * self.intermediate_size
        norms = 2 * h
        layer = attn + mlp + norms
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * layer + embed + head + h

    def _sparse_params(self) -> int:
        """num_params of a mixture-of-experts or latent-attention model."""
        h = self.hidden_size
        dense_layers = self.num_layers - self.moe_layers
        mlp = dense_layers * 3 * h * self.intermediate_size
        if self.is_moe:
            per_moe = (self.num_experts * h  # router
                       + self.num_shared_experts * 3 * h * self.moe_intermediate_size)
            mlp += self.moe_layers * per_moe + self.expert_params
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (self._attention_params() + 2 * h) + mlp + embed + h

    def weight_bytes(self, weight_dtype: str | None = None, tp: int = 1) -> int:
        """Weight bytes per GPU under tensor parallelism tp."""
        return int(self.num_params * dtype_bytes(weight_dtype or self.weight_dtype or self.dtype) / tp)

    def kv_bytes_per_token(self, kv_dtype: str | None = None, tp: int = 1) -> int:
        """KV-cache bytes per token slot per GPU: 2 (K and V) x layers x KV heads x head_dim.

        Latent attention keeps one latent vector of ``kv_lora_rank + qk_rope_head_dim`` per
        layer, the same on every tensor-parallel rank (vLLM's MLA cache is not split by heads).
        With sliding-window layers, ``layers`` is the layers of one KV cache group of vLLM's
        hybrid allocator (simulator.engine.kv_layout): a block of the shared pool holds
        ``block_size`` tokens of one group.
        """
        check_tp(self, tp)
        nbytes = dtype_bytes(kv_dtype or self.dtype)
        if self.is_mla:
            return int(self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * nbytes)
        kv_heads = max(1, self.num_key_value_heads // tp)
        layers = self.num_layers
        if self.sliding_window_layers:
            from simulator.records.kv_groups import kv_groups

            layers = kv_groups(self.full_attention_layers, self.sliding_window_layers).group_size
        return int(2 * layers * kv_heads * self.head_dim * nbytes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelArchitecture:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError("model", f"unknown fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str = "") -> ModelArchitecture:
        """Build from a Hugging Face config.json dictionary."""
        try:
            return cls(
                name=name or config.get("_name_or_path", "") or config.get("model_type", "model"),
                num_layers=config["num_hidden_layers"],
                hidden_size=config["hidden_size"],
                num_attention_heads=config["num_attention_heads"],
                num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
                intermediate_size=config["intermediate_size"],
                vocab_size=config["vocab_size"],
                head_dim=config.get("head_dim") or 0,
                max_position_embeddings=config.get("max_position_embeddings", 32768),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
                dtype={"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(
                    str(config.get("torch_dtype", config.get("dtype", "bfloat16"))), "bf16"),
                family=config.get("model_type", "llama"),
            )
        except KeyError as err:
            raise ConfigError("model", f"config.json lacks {err.args[0]!r}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelArchitecture:
        import yaml

        path = Path(path)
        if not path.exists():
            raise ConfigError("model", f"no such model file {path}")
        return cls.from_dict(yaml.safe_load(path.read_text()))


def check_tp(arch: ModelArchitecture, tp: int) -> None:
    """Tensor parallelism must split the attention heads evenly."""
    require(tp >= 1, "tp", "must be >= 1")
    require(
        arch.num_attention_heads % tp == 0,
        "tp",
        f"tp={tp} does not divide num_attention_heads={arch.num_attention_heads} of {arch.name}",
    )
    require(
        arch.num_key_value_heads % tp == 0 or tp % arch.num_key_value_heads == 0,
        "tp",
        f"tp={tp} and num_key_value_heads={arch.num_key_value_heads} of {arch.name} do not divide",
    )
