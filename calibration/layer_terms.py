"""The per-layer and per-step terms every composed step model shares: a layer's shapes per GPU,
the bytes its memory-bound kernels move, and the constants that price them (calibration.composed,
calibration.sparse, calibration.non_kernel and calibration.llmservingsim read them here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from simulator.records.model_arch import ModelArchitecture, check_tp, dtype_bytes

#: memory-bound kernels not in the tables: aiconfigurator's empirical constants
#: (``mem_bw_empirical_scaling_factor: 0.8``, ``mem_empirical_constant_latency: 3 us``)
MEMORY_EFFICIENCY = 0.8
MEMORY_OP_LATENCY_S = 3e-6
#: Per-step cost outside the measured kernels: input preparation and its
#: host-to-device copies, embedding look-up, the step's synchronisation and the
#: gaps between kernels. 0.7 ms is what the BLIS fit of real vLLM 0.11 runs of
#: Qwen2.5-7B on an H100 (beta0 = 7.05 ms for a step of one short decode) leaves
#: after this model's GPU time for that step (6.36 ms); see
#: tests/calibration/test_blis_agreement.py. It is below the 1.3-1.5 ms that
#: vLLM 0.32's engine loop spends between steps on a CPU (../shared/vllm-cpu.md)
#: because on a GPU async scheduling (vLLM's default) overlaps that host work
#: with the previous step's kernels.
STEP_OVERHEAD_S = 0.7e-3


@dataclass(frozen=True)
class LayerShapes:
    """Per-GPU shapes of one transformer layer under tensor parallelism."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int

    @classmethod
    def of(cls, arch: ModelArchitecture, tp: int) -> LayerShapes:
        check_tp(arch, tp)
        return cls(
            hidden=arch.hidden_size,
            heads=arch.num_attention_heads // tp,
            kv_heads=max(1, arch.num_key_value_heads // tp),
            head_dim=arch.head_dim,
            inter=arch.intermediate_size // tp,
            vocab=arch.vocab_size // tp,
        )


ACT_BYTES = 2  # bf16 activations


def layer_memory_ops(sh: LayerShapes, weight_dtype: str, kv_dtype: str) -> dict[str, int]:
    """Bytes read and written per token by one layer's memory-bound kernels, by kernel (vLLM's fused ones)."""
    act, q_dim, kv_dim = ACT_BYTES, sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
    ops = {
        "add_rmsnorm_attn": 4 * sh.hidden * act,             # fused residual add + RMSNorm before attention
        "add_rmsnorm_mlp": 4 * sh.hidden * act,              # the same before the MLP
        "rotary": 2 * (q_dim + kv_dim) * act,                # rotary embedding on q and k
        "kv_cache_write": 2 * kv_dim * (act + dtype_bytes(kv_dtype)),  # K and V into the paged cache
        "silu_mul": 3 * sh.inter * act,                      # SiLU(gate) * up
    }
    # per-token activation quantization before o and down (not for weight-only int4, W4A16)
    if weight_dtype != "int4" and dtype_bytes(weight_dtype) < act:
        ops.update(quant_o=q_dim * (act + 1), quant_down=sh.inter * (act + 1))
    return ops


#: ``allreduce_ms(num_gpus, elements)``: a kernel source's all-reduce of ``elements`` bf16 values, in ms
AllReduceMs = Callable[[int, np.ndarray], np.ndarray]


def embedding_allreduce_ms(allreduce_ms: AllReduceMs, tp: int, tokens: np.ndarray, hidden: int) -> np.ndarray:
    """Tensor parallelism's one all-reduce a step outside the layers, for ``tokens`` tokens (ms).

    vLLM's ``VocabParallelEmbedding`` looks each token up in this rank's slice of the vocabulary
    (zeros elsewhere) and all-reduces the ``tokens x hidden`` result. 0 at tp 1.
    """
    m = np.asarray(tokens, dtype=float)
    return np.where(m > 0, allreduce_ms(tp, m * hidden), 0.0) if tp > 1 else np.zeros_like(m)


def logits_allgather_ms(allreduce_ms: AllReduceMs, tp: int, rows: np.ndarray, vocab: int) -> np.ndarray:
    """The all-gather of the LM head's logits under tensor parallelism, for ``rows`` sampled rows (ms).

    Each rank computes ``rows x vocab / tp`` bf16 logits; vLLM's ``LogitsProcessor._gather_logits``
    all-gathers them (``Platform.use_all_gather``: True on GPUs), each GPU receiving the other
    ranks' ``(tp - 1) / tp`` of ``rows x vocab`` values. A ring all-reduce of ``e`` values moves
    ``2 (tp - 1) / tp x e`` of them per GPU (a reduce-scatter, then an all-gather), so the gather
    is priced as an all-reduce of half the logits: the same bytes and one latency. 0 at tp 1.
    """
    r = np.asarray(rows, dtype=float)
    return np.where(r > 0, allreduce_ms(tp, r * vocab / 2), 0.0) if tp > 1 else np.zeros_like(r)


def moe_exchange_ms(allreduce_ms: AllReduceMs, ranks: int, tokens: np.ndarray, hidden: int,
                    num_experts: int) -> np.ndarray:
    """One MoE layer's exchange between ``ranks`` data-parallel engines for ``tokens`` tokens of all
    of them (ms).

    vLLM's default ``allgather_reducescatter`` backend (``AgRsAll2AllManager``): the dispatch
    all-gathers every rank's hidden states and router logits (``tokens x (hidden + experts)`` bf16
    values), the combine reduce-scatters the experts' ``tokens x hidden`` output. Each is priced as
    an all-reduce of half its values (the same bytes a GPU moves, one latency). 0 for one rank.
    """
    t = np.asarray(tokens, dtype=float)
    if ranks <= 1:
        return np.zeros_like(t)
    both = allreduce_ms(ranks, t * (hidden + num_experts) / 2) + allreduce_ms(ranks, t * hidden / 2)
    return np.where(t > 0, both, 0.0)
