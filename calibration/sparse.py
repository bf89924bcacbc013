"""The parts of a step that differ for mixture-of-experts, latent-attention and sliding-window models.

``ComposedPerformanceModel`` hands these to ``SparseParts`` (a dense model never
gets here, so its numbers are unchanged). Per step of ``m`` tokens, a layer runs:

- attention projections: grouped-query attention as in a dense model; or, for
  multi-head latent attention (MLA, DeepSeek), vLLM's ``fused_qkv_a_proj``
  (hidden -> q_lora_rank + kv_lora_rank + rope dim, replicated on every rank),
  ``q_b_proj``, the latent up-projection (``kv_b_proj``, or the absorbed
  ``W_UK``/``W_UV`` products of decode: the same FLOPs and weights) and ``o_proj``;
- MLP: dense in the first ``first_k_dense_replace`` layers; else the router GEMM,
  the shared experts as a dense MLP, and the routed experts as the fused MoE
  kernel (``calibration.moe``: fitted to a measured H100 fused-MoE layer,
  weights read once per expected distinct expert);
- attention: MLA decode reads each sequence's latent cache
  (``kv_lora_rank + rope`` per token and layer) and does
  ``2 h L (kv_lora_rank + rope + kv_lora_rank)`` FLOPs per layer (absorbed
  form); MLA prefill runs as multi-head attention over decompressed heads
  (query/key width ``qk_nope + rope``, value width ``v_head_dim``). Neither has
  measured tables: both are roofline, and so is attention at a head_dim the
  tables did not measure (gpt-oss: 64). ``sources`` says which part came from where.

Not modelled, stated: decompressing a prefill's cached prefix through
``kv_b_proj`` (chunked prefill over long contexts), MoE load imbalance across
experts, the MTP layer.
"""

from __future__ import annotations

import numpy as np

from calibration.layer_terms import moe_exchange_ms
from calibration.moe import measured_fit, moe_ep_layer_seconds, moe_layer_seconds
from simulator.records.errors import ConfigError
from simulator.records.model_arch import dtype_bytes


class SparseParts:
    """Dense-part costs and attention kernels of one sparse model under one ComposedPerformanceModel."""

    def __init__(self, pm):
        from calibration.roofline import RooflineKernels

        self.pm, self.arch, self.hw = pm, pm.arch, pm.hardware
        self.roofline = RooflineKernels(pm.hardware)
        self.sources: dict[str, str] = {}
        kernels = pm.kernels
        tables = getattr(kernels, "tables", None)
        measured_head_dim = getattr(tables, "head_dim", 128) if tables is not None else None
        self.attention = kernels
        if self.arch.is_mla:
            self.attention = self.roofline
            self.sources["attention"] = "MLA: roofline (no measured MLA kernels)"
        elif measured_head_dim is not None and measured_head_dim != self.arch.head_dim:
            self.attention = self.roofline
            self.sources["attention"] = (f"roofline (tables measure head_dim {measured_head_dim}, "
                                         f"not {self.arch.head_dim})")
        else:
            self.sources["attention"] = kernels.describe() if tables is not None else "roofline"
        if self.arch.sliding_window_layers:
            self.sources["sliding_window"] = (f"{self.arch.sliding_window_layers} layers attend over at most "
                                              f"{self.arch.sliding_window} tokens")
        if self.arch.is_moe:
            self.fit = measured_fit()
            self.sources["moe"] = self.fit.describe()
            if pm.expert_parallel:
                self.sources["expert_parallel"] = (
                    f"experts whole over {pm.tp * pm.data_parallel_size} GPUs, the busiest one's touched "
                    f"experts timed" + (f"; {pm.data_parallel_size} data-parallel engines' tokens and router "
                                        f"logits all-gathered, the experts' output reduce-scattered, over "
                                        f"the link" if pm.data_parallel_size > 1 else ""))
        self._gemm_fallback: set[str] = set()

    # --- attention (per layer, ms; the KernelSource signatures) ---------------------------
    def context_attention_ms(self, heads, kv_heads, head_dim, kv_dtype, batch, length):
        if self.arch.is_mla:  # multi-head over decompressed heads: mean of the qk and v widths
            a = self.arch
            width = (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) / 2
            return self.roofline.context_attention_ms(heads, heads, width, kv_dtype, batch, length)
        return self.attention.context_attention_ms(heads, kv_heads, head_dim, kv_dtype, batch, length)

    def generation_attention_ms(self, heads, kv_heads, head_dim, kv_dtype, batch, kv_len):
        if self.arch.is_mla:
            return self.mla_decode_ms(heads, kv_dtype, batch, kv_len)
        return self.attention.generation_attention_ms(heads, kv_heads, head_dim, kv_dtype, batch, kv_len)

    def mla_decode_ms(self, heads, kv_dtype, batch, kv_len):
        """Absorbed MLA decode of ``batch`` sequences over ``kv_len`` latent tokens, one layer (roofline)."""
        from calibration.layer_terms import MEMORY_EFFICIENCY
        from calibration.roofline import ATTENTION_EFFICIENCY, DECODE_ATTENTION_FLOOR_S

        a = self.arch
        b, n = np.asarray(batch, dtype=float), np.asarray(kv_len, dtype=float)
        latent = a.kv_lora_rank + a.qk_rope_head_dim
        nbytes = b * n * latent * dtype_bytes(kv_dtype)
        flops = 2.0 * b * heads * n * (latent + a.kv_lora_rank)
        t = np.maximum(flops / (self.hw.bf16_tflops * 1e12 * ATTENTION_EFFICIENCY),
                       nbytes / (self.hw.memory_bandwidth_gbps * 1e9 * MEMORY_EFFICIENCY))
        return 1e3 * (t + DECODE_ATTENTION_FLOOR_S)

    # --- GEMMs, MLP, MoE --------------------------------------------------------------------
    def gemm_ms(self, m, n, k, dtype):
        """Measured GEMM, or roofline for a dtype the tables lack (fp8 on H200), labelled so."""
        if dtype not in self._gemm_fallback:
            try:
                return self.pm.kernels.gemm_ms(m, n, k, dtype)
            except ConfigError:
                self._gemm_fallback.add(dtype)
                self.sources[f"{dtype}_gemm"] = f"roofline ({dtype} GEMMs not measured for {self.hw.name})"
        return self.roofline.gemm_ms(m, n, k, dtype)

    def experts_layer_ms(self, tokens: np.ndarray) -> np.ndarray:
        """One MoE layer's routed experts for ``tokens`` tokens meeting there (every data-parallel
        rank's), with the exchange around them (``layer_terms.moe_exchange_ms``), in ms."""
        pm, a, w = self.pm, self.arch, self.pm.weight_dtype
        tp, dp = pm.tp, pm.data_parallel_size
        peak = (self.hw.fp8_tflops if w.startswith("fp8") and self.hw.fp8_tflops else self.hw.bf16_tflops) * 1e12
        shape = dict(hidden=pm.shapes.hidden, inter=a.moe_intermediate_size, num_experts=a.num_experts,
                     top_k=a.num_experts_per_tok, expert_bytes=dtype_bytes(a.expert_dtype or w),
                     bandwidth=self.hw.memory_bandwidth_gbps * 1e9, peak=peak, fit=self.fit)
        if pm.expert_parallel:
            ms = 1e3 * moe_ep_layer_seconds(tokens, ranks=tp * dp, **shape)
        else:
            ms = 1e3 * moe_layer_seconds(tokens, tp=tp, **shape)
        return ms + moe_exchange_ms(pm.kernels.allreduce_ms, dp, tokens, pm.shapes.hidden, a.num_experts)

    def dense_seconds(self, m: np.ndarray) -> np.ndarray:
        """All layers' projections, MLP or MoE, element-wise kernels and all-reduces for m tokens."""
        from calibration.layer_terms import ACT_BYTES, layer_memory_ops

        pm, a, g = self.pm, self.arch, self.gemm_ms
        sh, w, tp = pm.shapes, pm.weight_dtype, pm.tp
        h = sh.hidden
        if a.is_mla:
            heads = sh.heads
            attn = (g(m, a.q_lora_rank + a.kv_lora_rank + a.qk_rope_head_dim, h, w)
                    + g(m, heads * (a.qk_nope_head_dim + a.qk_rope_head_dim), a.q_lora_rank or h, w)
                    + g(m, heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank, w)
                    + g(m, h, heads * a.v_head_dim, w))
        else:
            q_dim, kv_dim = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
            attn = g(m, q_dim + 2 * kv_dim, h, w) + g(m, h, q_dim, w)
        ops = layer_memory_ops(sh, w, pm.kv_dtype)
        mem_dense = sum(np.where(m > 0, pm.kernels.memory_op_ms(m * b), 0.0) for b in ops.values())
        comm = 2 * pm.kernels.allreduce_ms(tp, m * h) if tp > 1 else 0.0
        dense_layers = a.num_layers - a.moe_layers
        total = 0.0
        if dense_layers:
            mlp = g(m, 2 * sh.inter, h, w) + g(m, h, sh.inter, w)
            total = dense_layers * (attn + mlp + mem_dense + comm)
        if a.moe_layers:
            inter = a.moe_intermediate_size // tp
            dp = pm.data_parallel_size
            m_moe = m * dp  # the tokens of all data-parallel engines (equally loaded) meet here
            moe = g(m, a.num_experts, h, "bf16")  # router (kept unquantized)
            if a.num_shared_experts:
                shared = a.num_shared_experts * inter
                moe = moe + g(m, 2 * shared, h, w) + g(m, h, shared, w)
            moe = moe + self.experts_layer_ms(m_moe)
            silu = 3 * a.num_experts_per_tok * inter * ACT_BYTES - ops["silu_mul"]
            mem_moe = mem_dense + np.where(m > 0, pm.kernels.memory_op_ms(m * max(silu, 0)), 0.0)
            total = total + a.moe_layers * (attn + moe + mem_moe + comm)
        edges = np.where(m > 0, 2 * pm.kernels.memory_op_ms(m * 2 * h * ACT_BYTES), 0.0)
        return 1e-3 * (total + edges) + m * pm.host_s_per_token
