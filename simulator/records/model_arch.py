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
               "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1, "int4": 0.5}


def dtype_bytes(dtype: str, field: str = "dtype") -> float:
    """Bytes per element of a dtype name."""
    if dtype not in DTYPE_BYTES:
        raise ConfigError(field, f"unknown dtype {dtype!r}; allowed: {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class ModelArchitecture:
    """A dense decoder-only transformer (Llama / Qwen family)."""

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

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings and LM head included)."""
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

    def weight_bytes(self, weight_dtype: str | None = None, tp: int = 1) -> int:
        """Weight bytes per GPU under tensor parallelism tp."""
        return int(self.num_params * dtype_bytes(weight_dtype or self.dtype) / tp)

    def kv_bytes_per_token(self, kv_dtype: str | None = None, tp: int = 1) -> int:
        """KV-cache bytes per token per GPU: 2 (K and V) x layers x KV heads x head_dim."""
        check_tp(self, tp)
        kv_heads = max(1, self.num_key_value_heads // tp)
        return int(2 * self.num_layers * kv_heads * self.head_dim * dtype_bytes(kv_dtype or self.dtype))

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
