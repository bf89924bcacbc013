"""A step-time model from BLIS's black-box coefficients (inference-sim, Apache-2.0).

BLIS fitted, per (model, GPU, TP, vLLM version), a linear step time to real
vLLM runs: ``step_us = beta0 + beta1 x prefill_tokens + beta2 x decode_tokens``.
It has no term for context length, so it prices a decode at 500 and at 20,000
tokens of KV alike; it is shipped as an independent reference (check 2 of the
calibration issue), not as a default.

``total_kv_blocks`` in the same file is not a measurement: it equals
``(0.9 x 80 GiB - weights) / (16 x KV bytes per token)`` summed over the TP
ranks (Qwen2.5-7B on one H100: 67,659). Per GPU, as vLLM counts blocks, that
is ``total_kv_blocks / tp``; this model uses that, and says so in describe().
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from calibration.memory import MemoryModel
from simulator.records.errors import ConfigError
from simulator.records.hardware import Hardware
from simulator.records.model_arch import ModelArchitecture
from simulator.records.performance import KVCapacity, MemoryBreakdown, PerformanceModel, StepBatch

DATA_FILE = Path(__file__).resolve().parent / "data" / "blis" / "derived_blackbox_coefficients_per_model_gpu.csv"
#: simulator hardware names -> BLIS GPU labels
GPU_LABELS = {"h100": "H100", "a100": "A100-80"}
#: simulator model names -> BLIS model ids (instruct checkpoints of the same architecture)
MODEL_IDS = {"llama-3.1-8b": "meta-llama/llama-3.1-8b-instruct", "qwen2.5-7b": "qwen/qwen2.5-7b-instruct"}
BLIS_BLOCK_SIZE = 16


@dataclass(frozen=True)
class BlisCoefficients:
    """One row of BLIS's per-model, per-GPU fit (times in microseconds)."""

    model: str
    gpu: str
    tp: int
    vllm_version: str
    total_kv_blocks: int
    alpha0: float
    alpha1: float
    alpha2: float
    beta0: float
    beta1: float
    beta2: float

    def step_us(self, prefill_tokens: float, decode_tokens: float) -> float:
        return self.beta0 + self.beta1 * prefill_tokens + self.beta2 * decode_tokens


@lru_cache(maxsize=1)
def load_coefficients() -> tuple[BlisCoefficients, ...]:
    """All rows of the shipped BLIS file (duplicates dropped)."""
    import csv

    rows, seen = [], set()
    with DATA_FILE.open() as fh:
        for r in csv.DictReader(fh):
            key = (r["model"], r["GPU"], r["tensor_parallelism"], r["vllm_version"])
            if key in seen:
                continue
            seen.add(key)
            rows.append(BlisCoefficients(
                model=r["model"], gpu=r["GPU"], tp=int(r["tensor_parallelism"]),
                vllm_version=r["vllm_version"].rsplit(":", 1)[-1], total_kv_blocks=int(r["total_kv_blocks"]),
                **{k: float(r[k]) for k in ("alpha0", "alpha1", "alpha2", "beta0", "beta1", "beta2")},
            ))
    return tuple(rows)


def find_coefficients(hardware_name: str, model_name: str, tp: int) -> BlisCoefficients:
    """The BLIS row for (hardware, model, tp), or a ConfigError listing the rows there are."""
    gpu = GPU_LABELS.get(hardware_name)
    model_id = MODEL_IDS.get(model_name)
    for row in load_coefficients():
        if row.gpu == gpu and row.model == model_id and row.tp == tp:
            return row
    inverse_gpu = {v: k for k, v in GPU_LABELS.items()}
    inverse_model = {v: k for k, v in MODEL_IDS.items()}
    have = sorted({f"{inverse_gpu[r.gpu]}/{inverse_model[r.model]}/tp{r.tp}" for r in load_coefficients()
                   if r.gpu in inverse_gpu and r.model in inverse_model})
    raise ConfigError("perf.source", f"no BLIS coefficients for {hardware_name}/{model_name}/tp{tp}; "
                                     f"allowed: {', '.join(have)}")


class BlisPerformanceModel(PerformanceModel):
    """``beta0 + beta1 x prefill tokens + beta2 x decode tokens`` (microseconds)."""

    def __init__(self, coeffs: BlisCoefficients, arch: ModelArchitecture, hardware: Hardware,
                 *, kv_dtype: str = "bf16", max_num_batched_tokens: int = 8192, max_num_seqs: int = 1024,
                 via_model: str = ""):
        self.coeffs = coeffs
        self.via_model = via_model
        self.arch = arch
        self.hardware = hardware
        self.name = f"blis:{hardware.name}:{arch.name}:bf16:tp{coeffs.tp}"
        self.memory_model = MemoryModel(arch, hardware, coeffs.tp, "bf16", kv_dtype,
                                        max_num_batched_tokens, max_num_seqs)
        self.blocks_per_gpu = coeffs.total_kv_blocks // coeffs.tp

    def step_time(self, batch: StepBatch) -> float:
        if batch.is_empty:
            return 0.0
        decode = len(batch.decode_context) + sum(batch.decode_spec_tokens)
        return 1e-6 * self.coeffs.step_us(sum(batch.prefill_tokens), decode)

    def kv_bytes_per_token(self) -> int:
        return self.memory_model.kv_bytes_per_token()

    def memory(self, gpu_memory_utilization: float) -> MemoryBreakdown:
        est = self.memory_model.breakdown(gpu_memory_utilization)
        kv = self.blocks_per_gpu * BLIS_BLOCK_SIZE * self.kv_bytes_per_token()
        return MemoryBreakdown(total=est.total, usable=est.usable, weights=est.weights,
                               activation_peak=est.activation_peak, other=est.other, kv_cache=kv)

    def kv_capacity(self, block_size: int, gpu_memory_utilization: float = 0.9,
                    num_gpu_blocks_override: int | None = None) -> KVCapacity:
        if num_gpu_blocks_override:
            return super().kv_capacity(block_size, gpu_memory_utilization, num_gpu_blocks_override)
        blocks = self.blocks_per_gpu * BLIS_BLOCK_SIZE // block_size
        return KVCapacity(num_blocks=blocks, block_size=block_size, bytes_per_token=self.kv_bytes_per_token())

    def describe(self) -> dict:
        out = super().describe()
        c = self.coeffs
        out.update({
            "built_from": f"BLIS black-box coefficients {c.model} {c.gpu} tp{c.tp} vLLM {c.vllm_version} "
                          "(Apache-2.0, inference-sim/inference-sim)",
            "beta_us": [c.beta0, c.beta1, c.beta2],
            "via_model": self.via_model,
            "kv_blocks_note": "BLIS total_kv_blocks / tp: computed by BLIS as (0.9 x 80 GiB - weights), "
                              "not measured; ignores gpu_memory_utilization",
        })
        return out
