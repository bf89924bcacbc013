"""Device memory of a vLLM replica, sized the way vLLM sizes its KV cache.

vLLM (``vllm/v1/worker/gpu_worker.py: determine_available_memory``) gives the
KV cache what is left of ``gpu_memory_utilization x total memory`` after:

- the weights (``model_memory_usage``),
- the peak of PyTorch activations in a profiling forward pass of
  ``max_num_batched_tokens`` tokens followed by a dummy sampler run over
  ``max_num_seqs`` sequences,
- memory allocated outside PyTorch during start-up (NCCL, cuBLAS workspaces),
- and, since vLLM 0.21, an estimate of the CUDA-graph pool.

No GPU is at hand, so the last three are estimated here from the architecture
(see each function); the weights and the KV bytes per token are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.records.hardware import Hardware
from simulator.records.model_arch import ModelArchitecture, check_tp, dtype_bytes
from simulator.records.performance import MemoryBreakdown

GIB = 1024**3

#: Non-PyTorch memory at tp=1 (cuBLAS/cuDNN workspaces, allocator slack); vLLM
#: logs typically show 0.1-0.3 GiB of "non_torch_memory" for one GPU.
NON_TORCH_BYTES = int(0.2 * GIB)
#: NCCL buffers by tensor-parallel size, from aiconfigurator's system files
#: (``misc.nccl_mem``: 342 MB at 2 GPUs, 392 MB at 4 and 8).
NCCL_BYTES = {1: 0, 2: 358_612_992, 4: 411_041_792, 8: 411_041_792}
#: CUDA-graph pool: vLLM logs "Graph capturing finished ... took 0.4-1.0 GiB"
#: for 7-70B dense models (graph nodes grow with the layer count).
CUDA_GRAPH_BASE_BYTES = int(0.25 * GIB)
CUDA_GRAPH_PER_LAYER_BYTES = int(0.01 * GIB)


#: Bytes per weight stored beside grouped low-bit weights: GPTQ and AWQ checkpoints (group size
#: 128) keep one fp16 scale and one packed 4-bit zero point per 128 weights. fp8 and int8 use
#: per-tensor or per-channel scales: negligible.
GROUP_BYTES_PER_WEIGHT = {"int4": (2 + 0.5) / 128}


def weight_bytes(arch: ModelArchitecture, weight_dtype: str, tp: int, expert_ranks: int = 0) -> int:
    """Weight bytes per GPU. Quantized checkpoints keep embeddings, LM head and norms in bf16."""
    if arch.is_moe or arch.is_mla:
        return sparse_weight_bytes(arch, weight_dtype, tp, expert_ranks or tp)
    total = arch.num_params
    h, v = arch.hidden_size, arch.vocab_size
    unquantized = v * h * (1 if arch.tie_word_embeddings else 2) + (2 * arch.num_layers + 1) * h
    quantized = total - unquantized
    wbytes = dtype_bytes(weight_dtype, "optimization.weight_dtype") + GROUP_BYTES_PER_WEIGHT.get(weight_dtype, 0.0)
    base = dtype_bytes(arch.dtype, "model.dtype")
    return int((quantized * wbytes + unquantized * base) / tp)


def sparse_weight_bytes(arch: ModelArchitecture, weight_dtype: str, tp: int, expert_ranks: int = 0) -> int:
    """``weight_bytes`` of a mixture-of-experts or latent-attention model.

    Routed experts are in ``arch.expert_dtype`` when the checkpoint ships them so (gpt-oss:
    MXFP4), else in the weight dtype; routers, embeddings, LM head and norms stay in the model
    dtype. Experts split over ``expert_ranks`` GPUs (default tp) whether by tensor or by expert
    parallelism (1/tp of each expert, or whole experts: the same bytes). vLLM replicates MLA's
    down-projections (``fused_qkv_a_proj``: hidden -> q_lora_rank + kv_lora_rank + rope dim)
    on every rank.
    """
    h, v = arch.hidden_size, arch.vocab_size
    wbytes = dtype_bytes(weight_dtype, "optimization.weight_dtype") + GROUP_BYTES_PER_WEIGHT.get(weight_dtype, 0.0)
    base = dtype_bytes(arch.dtype, "model.dtype")
    ebytes = dtype_bytes(arch.expert_dtype, "model.expert_dtype") if arch.expert_dtype else wbytes
    unquantized = (v * h * (1 if arch.tie_word_embeddings else 2) + (2 * arch.num_layers + 1) * h
                   + arch.moe_layers * arch.num_experts * h)
    experts = arch.expert_params
    replicated = 0
    if arch.is_mla:
        replicated = arch.num_layers * h * (arch.q_lora_rank + arch.kv_lora_rank + arch.qk_rope_head_dim)
    split = arch.num_params - unquantized - experts - replicated
    return int((split * wbytes + unquantized * base) / tp + experts * ebytes / (expert_ranks or tp)
               + replicated * wbytes)


def activation_peak_bytes(
    arch: ModelArchitecture, tp: int, max_num_batched_tokens: int, max_num_seqs: int
) -> int:
    """Peak of vLLM's profiling run: the larger of the forward pass and the sampler.

    Forward: the MLP holds hidden state and residual (2 x h) plus the gate/up
    output (2 x I/tp) and the activated half (I/tp), in bf16, for every token.
    Sampler: ``min(max_num_seqs, max_num_batched_tokens)`` rows of full-vocabulary
    logits in fp32, twice (logits and the probabilities derived from them).
    """
    t = max_num_batched_tokens
    inter = arch.intermediate_size / tp
    forward = t * 2 * (2 * arch.hidden_size + 3 * inter)
    if arch.is_moe:  # fused MoE's caches: per token and chosen expert, gate/up, activated, output
        k = arch.num_experts_per_tok
        forward = max(forward, t * 2 * (2 * arch.hidden_size
                                        + k * (3 * arch.moe_intermediate_size / tp + arch.hidden_size)))
    rows = min(max_num_seqs, max_num_batched_tokens)
    sampler = rows * arch.vocab_size * 4 * 2
    return int(max(forward, sampler))


def other_bytes(arch: ModelArchitecture, tp: int) -> int:
    """Non-PyTorch memory, NCCL buffers and the CUDA-graph pool (estimates, see constants)."""
    nccl = NCCL_BYTES.get(tp, NCCL_BYTES[8])
    graphs = CUDA_GRAPH_BASE_BYTES + CUDA_GRAPH_PER_LAYER_BYTES * arch.num_layers
    return NON_TORCH_BYTES + nccl + graphs


@dataclass(frozen=True)
class MemoryModel:
    """Memory of one model on one GPU type under tp, as vLLM would split it."""

    arch: ModelArchitecture
    hardware: Hardware
    tp: int = 1
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 1024
    #: GPUs the routed experts spread over (0: tp; tp x data_parallel_size with data-parallel attention)
    expert_ranks: int = 0

    def __post_init__(self) -> None:
        check_tp(self.arch, self.tp)
        dtype_bytes(self.weight_dtype, "optimization.weight_dtype")
        dtype_bytes(self.kv_dtype, "optimization.kv_cache_dtype")

    def kv_bytes_per_token(self) -> int:
        return self.arch.kv_bytes_per_token(self.kv_dtype, self.tp)

    def breakdown(self, gpu_memory_utilization: float) -> MemoryBreakdown:
        """Weights, activation peak, other and KV cache per GPU, in bytes (KV may be negative)."""
        total = self.hardware.memory_bytes
        usable = int(total * gpu_memory_utilization)
        weights = weight_bytes(self.arch, self.weight_dtype, self.tp, self.expert_ranks or self.tp)
        activation = activation_peak_bytes(self.arch, self.tp, self.max_num_batched_tokens,
                                           self.max_num_seqs)
        other = other_bytes(self.arch, self.tp)
        kv = usable - weights - activation - other
        return MemoryBreakdown(total=total, usable=usable, weights=weights,
                               activation_peak=activation, other=other, kv_cache=kv)
