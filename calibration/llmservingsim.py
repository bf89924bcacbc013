"""A step-time model from LLMServingSim's vLLM layer profiles.

LLMServingSim (casys-kaist, MIT) hooks vLLM 0.19's layers and times them on
real GPUs, one transformer layer at a time:

- ``dense.csv``: each non-attention op of a layer (qkv/o/gate-up/down
  projections, activation, layer norm, rotary) and the embedding and final
  norm, by token count (1-2048);
- ``attention.csv``: one layer's attention for a batch of one prefill chunk of
  ``prefill_chunk`` tokens over ``kv_prefill`` cached tokens plus ``n_decode``
  decodes at ``kv_decode`` tokens each (vLLM runs them in one kernel);
- ``per_sequence.csv``: LM head and sampler by number of sequences.

A step is then ``layers x (dense ops(tokens) + attention) + embedding +
final norm + LM head + sampler + overhead``. Qwen3's per-head q/k norm
(``qk_norm``) is a layer op where the profile has it. Under tensor parallelism
the profile times one rank's shard (a shrunk model on one GPU: no collective),
so the step adds what vLLM sends between the GPUs, priced from the card's
interconnect (``roofline.RooflineKernels.allreduce_ms``): two all-reduces a
layer, the embedding's all-reduce and the logits' all-gather
(``layer_terms.embedding_allreduce_ms``, ``logits_allgather_ms``). Batches that the profile's
single-chunk, uniform-decode grid cannot express exactly are reduced to it:
several prefill chunks become one chunk of their total tokens over the context
that gives the same attention work, and decode KV lengths are replaced by
their mean (LLMServingSim's own skew correction, typically 3-7%, is left out).
Interpolation is multilinear in log(time) against log2(1 + size).

A mixture-of-experts profile (``moe.csv``: the MoE layer, router to combine, by tokens and
distinct experts touched, all experts on one GPU) replaces a layer's MLP ops. Under expert
parallelism each of ``R`` GPUs holds ``E / R`` experts: ``T`` tokens meeting there give it
``T k / R`` (token, expert) pairs over its expected distinct experts
``(E / R) (1 - (1 - k / E)^T)``, read from the table at ``T / R`` tokens (the same pairs). With
data parallelism (``data_parallel_size`` engines, their attention apart, their experts shared)
the tokens of every engine meet in each MoE layer: all-gathered with their router logits before
it, the experts' output reduce-scattered after it, over the link (``layer_terms.moe_exchange_ms``);
``step_time`` assumes the other engines loaded as this one, ``experts_time`` prices the tokens that
actually meet.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from calibration.layer_terms import (
    STEP_OVERHEAD_S,
    embedding_allreduce_ms,
    logits_allgather_ms,
    moe_exchange_ms,
)
from calibration.memory import MemoryModel
from calibration.moe import MeetingExperts, expected_experts
from simulator.records.errors import ConfigError
from simulator.records.hardware import Hardware
from simulator.records.model_arch import ModelArchitecture
from simulator.records.performance import MemoryBreakdown, PerformanceModel, StepBatch

DATA_DIR = Path(__file__).resolve().parent / "data" / "llmservingsim" / "perf"
#: simulator hardware names -> LLMServingSim's GPU directory names
GPU_DIRS = {"rtxpro6000": "RTXPRO6000", "rtx4090": "RTX4090", "h100": "H100"}
GPU_DIRS_INV = {v: k for k, v in GPU_DIRS.items()}
LAYER_OPS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "act_fn", "rotary_emb")
#: layer ops some models have and others lack (Qwen3's q/k RMSNorm)
OPTIONAL_LAYER_OPS = ("qk_norm",)
LAYER_NORMS_PER_LAYER = 2
MAX_TOKENS = 16384


@dataclass(frozen=True)
class ProfileKey:
    """One LLMServingSim profile directory: GPU, Hugging Face model, variant and TP."""

    gpu: str
    model: str
    variant: str
    tp: int

    @property
    def path(self) -> Path:
        return DATA_DIR / self.gpu / self.model / self.variant / f"tp{self.tp}"

    def describe(self) -> str:
        return (f"LLMServingSim vLLM 0.19 layer profile {self.gpu}/{self.model}/{self.variant}/tp{self.tp} "
                f"(MIT, casys-kaist/LLMServingSim)")


def available_profiles() -> list[ProfileKey]:
    """Profiles shipped in calibration/data/llmservingsim."""
    out = []
    for tp_dir in sorted(DATA_DIR.glob("*/*/*/*/tp*")):
        if (tp_dir / "attention.csv").exists() and (tp_dir / "dense.csv").exists():
            rel = tp_dir.relative_to(DATA_DIR).parts
            out.append(ProfileKey(rel[0], f"{rel[1]}/{rel[2]}", rel[3], int(rel[4][2:])))
    return out


def find_profile(hardware_name: str, hf_model: str, tp: int, variant: str = "bf16") -> ProfileKey:
    """The profile for (hardware, model, tp), or a ConfigError listing those that exist."""
    from calibration.catalog import base_model_name

    gpu = GPU_DIRS.get(hardware_name, hardware_name)
    found = [key for key in available_profiles() if key.gpu == gpu and key.tp == tp and key.variant == variant]
    for key in found:  # the model's own profile first, then a release of it (same shapes)
        if key.model.lower() == hf_model.lower():
            return key
    for key in found:
        if base_model_name(key.model) == hf_model.lower():
            return key
    have = ", ".join(f"{GPU_DIRS_INV.get(k.gpu, k.gpu)}/{k.model}/tp{k.tp}" for k in available_profiles())
    raise ConfigError("perf.source", f"no LLMServingSim profile for {hardware_name}/{hf_model}/tp{tp}; "
                                     f"allowed: {have}")



def _u(x):
    return np.log2(1.0 + np.asarray(x, dtype=float))


class Lattice:
    """Multilinear interpolation of log(time) on a rectangular lattice in u = log2(1 + x).

    Beyond an axis' last point the value grows linearly in that coordinate.
    """

    def __init__(self, axes: list[np.ndarray], values: np.ndarray):
        if np.isnan(values).any():
            raise ConfigError("llmservingsim", "profile lattice has holes")
        self.axes = [np.asarray(a, dtype=float).tolist() for a in axes]
        self.u = [_u(a).tolist() for a in axes]
        logv = np.log(np.maximum(values, 1e-9))
        self.strides = [s // logv.itemsize for s in logv.strides]
        self.flat = logv.ravel().tolist()
        self.corners = list(itertools.product((0, 1), repeat=len(axes)))

    def __call__(self, *point: float) -> float:
        scale = 1.0
        base = 0
        steps, weights = [], []
        for x, axis, u, stride in zip(point, self.axes, self.u, self.strides, strict=True):
            if x > axis[-1]:
                scale *= x / axis[-1]
                x = axis[-1]
            ux = math.log2(1.0 + max(x, axis[0]))
            i = min(max(bisect.bisect_right(u, ux) - 1, 0), len(u) - 2)
            base += i * stride
            steps.append(stride)
            weights.append((ux - u[i]) / (u[i + 1] - u[i]))
        total = 0.0
        flat = self.flat
        for corner in self.corners:
            w = 1.0
            offset = base
            for c, t, stride in zip(corner, weights, steps, strict=True):
                if c:
                    w *= t
                    offset += stride
                else:
                    w *= 1.0 - t
            total += w * flat[offset]
        return math.exp(total) * scale


class MoETable:
    """A measured MoE layer's time (µs) by tokens and distinct experts touched (``moe.csv``):
    log-log interpolation along experts at each measured token count, then along tokens;
    beyond the largest count, linear in tokens."""

    def __init__(self, tokens: np.ndarray, experts: np.ndarray, time_us: np.ndarray):
        self.counts = np.unique(tokens).astype(float)
        self.rows = []
        for count in self.counts:
            mine = tokens == count
            order = np.argsort(experts[mine])
            self.rows.append((np.log(experts[mine][order].astype(float)), np.log(time_us[mine][order])))

    def _at_count(self, i: int, experts: np.ndarray) -> np.ndarray:
        xs, ys = self.rows[i]
        if len(xs) == 1:
            return np.full_like(experts, math.exp(ys[0]))
        return np.exp(np.interp(np.log(np.clip(experts, math.exp(xs[0]), math.exp(xs[-1]))), xs, ys))

    def __call__(self, tokens: np.ndarray, experts: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=float)
        experts = np.asarray(experts, dtype=float)
        counts = self.counts
        t = np.clip(tokens, counts[0], counts[-1])
        i = np.clip(np.searchsorted(counts, t, side="right") - 1, 0, len(counts) - 2)
        out = np.empty_like(t)
        for j in np.unique(i):
            at = i == j
            lo, hi = self._at_count(j, experts[at]), self._at_count(j + 1, experts[at])
            w = (np.log(t[at]) - math.log(counts[j])) / (math.log(counts[j + 1]) - math.log(counts[j]))
            out[at] = np.exp((1 - w) * np.log(lo) + w * np.log(hi))
        return np.where(tokens > counts[-1], out * tokens / counts[-1], out) * (tokens > 0)


@lru_cache(maxsize=4)
def load_profile(key: ProfileKey) -> dict:
    """Read one profile into arrays (cached)."""
    import pandas as pd

    dense = pd.read_csv(key.path / "dense.csv")
    per_seq = pd.read_csv(key.path / "per_sequence.csv")
    att = pd.read_csv(key.path / "attention.csv")
    for name, frame, cols in (("dense.csv", dense, {"layer", "tokens", "time_us"}),
                              ("per_sequence.csv", per_seq, {"layer", "sequences", "time_us"}),
                              ("attention.csv", att, {"prefill_chunk", "kv_prefill", "n_decode",
                                                      "kv_decode", "time_us"})):
        missing = cols - set(frame.columns)
        if missing:
            raise ConfigError("llmservingsim", f"{key.path / name} lacks columns {sorted(missing)}")
    ops = {}
    for op, part in dense.groupby("layer"):
        part = part.groupby("tokens", as_index=False).time_us.mean().sort_values("tokens")
        ops[str(op)] = (part.tokens.to_numpy(float), part.time_us.to_numpy(float))
    seq = {}
    for op, part in per_seq.groupby("layer"):
        part = part.groupby("sequences", as_index=False).time_us.mean().sort_values("sequences")
        seq[str(op)] = (part.sequences.to_numpy(float), part.time_us.to_numpy(float))
    att = att.groupby(["prefill_chunk", "kv_prefill", "n_decode", "kv_decode"], as_index=False).time_us.mean()
    moe = None
    if (key.path / "moe.csv").exists():
        frame = pd.read_csv(key.path / "moe.csv")
        missing = {"tokens", "activated_experts", "time_us"} - set(frame.columns)
        if missing:
            raise ConfigError("llmservingsim", f"{key.path / 'moe.csv'} lacks columns {sorted(missing)}")
        frame = frame.groupby(["tokens", "activated_experts"], as_index=False).time_us.mean()
        moe = MoETable(frame.tokens.to_numpy(), frame.activated_experts.to_numpy(), frame.time_us.to_numpy(float))
    return {"ops": ops, "per_sequence": seq, "attention": att, "moe": moe}


def _pow2_from(start: int, stop: int) -> list[int]:
    out, v = [], start
    while v <= stop:
        out.append(v)
        v *= 2
    return out


def _attention_lattices(att) -> tuple[Lattice, Lattice]:
    """A (n_decode x kv_decode) lattice for decode-only steps and a 4-D one for the rest."""
    dec = att[(att.prefill_chunk == 0) & (att.n_decode > 0)]
    n_axis = np.sort(dec.n_decode.unique()).astype(float)
    kv_axis = np.sort(dec.kv_decode.unique()).astype(float)
    grid = dec.pivot_table(index="n_decode", columns="kv_decode", values="time_us").reindex(
        index=n_axis, columns=kv_axis).to_numpy()
    decode = Lattice([n_axis, kv_axis], grid)

    pcs = _pow2_from(16, int(att.prefill_chunk.max()))
    kps = [0] + _pow2_from(16, int(att.kv_prefill.max()))
    ns = [0] + _pow2_from(1, int(att[att.prefill_chunk > 0].n_decode.max()))
    kvs = _pow2_from(16, int(att.kv_decode.max()))
    table = {(int(r.prefill_chunk), int(r.kv_prefill), int(r.n_decode), int(r.kv_decode)): float(r.time_us)
             for r in att.itertuples(index=False)}
    cube = np.full((len(pcs), len(kps), len(ns), len(kvs)), np.nan)
    for (a, pc), (b, kp), (c, n), (d, kv) in itertools.product(
            enumerate(pcs), enumerate(kps), enumerate(ns), enumerate(kvs)):
        cube[a, b, c, d] = table.get((pc, kp, n, 0 if n == 0 else kv), np.nan)
    mixed = Lattice([np.array(pcs), np.array(kps), np.array(ns), np.array(kvs)], cube)
    return decode, mixed


class LLMServingSimPerformanceModel(PerformanceModel):
    """Step time from a measured layer profile; memory and KV as vLLM sizes them."""

    def __init__(
        self,
        key: ProfileKey,
        arch: ModelArchitecture,
        hardware: Hardware,
        *,
        kv_dtype: str = "bf16",
        max_num_batched_tokens: int = 8192,
        max_num_seqs: int = 1024,
        overhead_s: float = STEP_OVERHEAD_S,
        via_model: str = "",
        expert_parallel: bool = False,
        data_parallel_size: int = 1,
    ):
        self.key = key
        self.via_model = via_model
        self.arch = arch
        self.hardware = hardware
        self.overhead_s = overhead_s
        self.data_parallel_size = int(data_parallel_size)
        self.expert_parallel = bool(expert_parallel) or self.data_parallel_size > 1
        dp = f":dp{self.data_parallel_size}" if self.data_parallel_size > 1 else ""
        self.name = f"llmservingsim:{key.gpu}:{arch.name}:{key.variant}:tp{key.tp}{dp}"
        self.memory_model = MemoryModel(arch, hardware, key.tp, "bf16", kv_dtype,
                                        max_num_batched_tokens, max_num_seqs,
                                        expert_ranks=key.tp * self.data_parallel_size)
        prof = load_profile(key)
        ops = prof["ops"]
        moe_layers = arch.moe_layers if arch.is_moe else 0
        mlp_ops = ("gate_up_proj", "down_proj", "act_fn")
        need = {"layernorm", "embedding", "final_layernorm"} | (set(LAYER_OPS) if moe_layers < arch.num_layers
                                                                else set(LAYER_OPS) - set(mlp_ops))
        if need - set(ops):
            raise ConfigError("llmservingsim", f"{key.path}/dense.csv lacks ops {sorted(need - set(ops))}")
        if moe_layers and prof["moe"] is None:
            raise ConfigError("llmservingsim", f"{key.path} has no moe.csv for mixture-of-experts model {arch.name}")
        m = np.arange(MAX_TOKENS + 1, dtype=float)

        def curve(xy, x):
            xs, ys = xy
            out = np.interp(np.log(np.clip(x, xs[0], xs[-1])), np.log(xs), ys)
            return np.where(x > xs[-1], ys[-1] * x / xs[-1], out) * (x > 0)

        attention_ops = tuple(op for op in LAYER_OPS if op not in mlp_ops)
        attention_ops += tuple(op for op in OPTIONAL_LAYER_OPS if op in ops)
        layer = sum(curve(ops[op], m) for op in attention_ops) + LAYER_NORMS_PER_LAYER * curve(ops["layernorm"], m)
        mlp = sum(curve(ops[op], m) for op in mlp_ops) if moe_layers < arch.num_layers else 0.0
        rows = np.arange(4097, dtype=float)
        comm_us, gather_us = 0.0, 0.0
        from calibration.roofline import RooflineKernels

        self._allreduce_ms = RooflineKernels(hardware).allreduce_ms
        if key.tp > 1:  # the profile times one shard alone: add the step's collectives
            allreduce = self._allreduce_ms
            layer = layer + 2 * 1e3 * allreduce(key.tp, m * arch.hidden_size)
            comm_us = 1e3 * embedding_allreduce_ms(allreduce, key.tp, m, arch.hidden_size)
            gather_us = 1e3 * logits_allgather_ms(allreduce, key.tp, rows, arch.vocab_size)
        self._moe = prof["moe"]
        experts_us = (moe_layers * self._experts_layer_us(m * self.data_parallel_size) if moe_layers else 0.0)
        dense_us = (arch.num_layers * layer + (arch.num_layers - moe_layers) * mlp + experts_us
                    + curve(ops["embedding"], m) + curve(ops["final_layernorm"], m) + comm_us)
        self._dense = (1e-6 * dense_us).tolist()
        self._experts: MeetingExperts | None = None
        if moe_layers and self.data_parallel_size > 1:
            meeting = np.arange(self.data_parallel_size * MAX_TOKENS + 1, dtype=float)
            self._experts = MeetingExperts(1e-6 * moe_layers * self._experts_layer_us(meeting))
        seq = prof["per_sequence"]
        head_us = sum(curve(seq[op], rows) for op in seq) + gather_us
        self._head = (1e-6 * head_us).tolist()
        self.decode_lattice, self.mixed_lattice = _attention_lattices(prof["attention"])

    def _experts_layer_us(self, tokens: np.ndarray) -> np.ndarray:
        """One MoE layer for ``tokens`` tokens meeting there, on the busiest GPU, with the
        data-parallel exchange (µs; see the module's docstring)."""
        a = self.arch
        ranks = self.key.tp * self.data_parallel_size if self.expert_parallel else 1
        local = expected_experts(tokens, a.num_experts_per_tok, a.num_experts) / ranks
        us = self._moe(tokens / ranks, np.maximum(local, a.num_experts_per_tok / ranks))
        return us + 1e3 * moe_exchange_ms(self._allreduce_ms, self.data_parallel_size, tokens, a.hidden_size,
                                          a.num_experts)

    def experts_time(self, tokens: int) -> float:
        return self._experts(tokens) if self._experts is not None else 0.0

    def _attention_s(self, batch: StepBatch) -> float:
        pt, dc = batch.prefill_tokens, batch.decode_context
        n = len(dc)
        kv = sum(dc) / n if n else 0.0
        if not pt:
            return 1e-6 * self.decode_lattice(n, kv) if n else 0.0
        total = sum(pt)
        work = sum(q * (2 * c + q) for q, c in zip(pt, batch.prefill_context, strict=False))
        context = max(0.0, (work / total - total) / 2)
        return 1e-6 * self.mixed_lattice(total, context, n, kv if n else 16)

    def step_time(self, batch: StepBatch) -> float:
        if batch.is_empty:
            return 0.0
        spec = sum(batch.decode_spec_tokens)
        m = sum(batch.prefill_tokens) + len(batch.decode_context) + spec
        rows = len(batch.prefill_tokens) + len(batch.decode_context) + spec
        dense = self._dense[m] if m <= MAX_TOKENS else self._dense[-1] * m / MAX_TOKENS
        head = self._head[rows] if rows < len(self._head) else self._head[-1] * rows / (len(self._head) - 1)
        attention = self.arch.num_layers * self._attention_s(batch)
        return self.overhead_s + dense + head + attention

    def kv_bytes_per_token(self) -> int:
        return self.memory_model.kv_bytes_per_token()

    def memory(self, gpu_memory_utilization: float) -> MemoryBreakdown:
        return self.memory_model.breakdown(gpu_memory_utilization)

    def describe(self) -> dict:
        out = super().describe()
        out.update({"built_from": self.key.describe(), "hardware": self.hardware.name,
                    "model": self.arch.name, "tp": self.key.tp, "step_overhead_s": self.overhead_s,
                    "via_model": self.via_model})
        if self._moe is not None and self.arch.is_moe:
            out["moe"] = (f"measured MoE layer (moe.csv) by tokens and experts touched; experts over "
                          f"{self.key.tp * self.data_parallel_size if self.expert_parallel else 1} GPU(s)"
                          + (f", {self.data_parallel_size} data-parallel engines' tokens and router logits "
                             f"all-gathered, the experts' output reduce-scattered, over the link (roofline)" if self.data_parallel_size > 1 else ""))
        if self.key.tp > 1:
            out["allreduce"] = (f"roofline from {self.hardware.name}'s interconnect "
                                f"({self.hardware.interconnect_gbps:g} GB/s peak): two all-reduces a layer, the "
                                "embedding's all-reduce and the logits' all-gather; the profile times no collective")
        return out
