"""Speed of PerformanceModel.step_time, the simulator's per-step hot path.

Prints microseconds per call of the shipped composed model (precomputed
lookup grids) against a naive baseline that evaluates the same composition
from the kernel tables on every call, for a few batch shapes, in one run.

    python benchmarks/bench_perf_model.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import time

import numpy as np

from calibration.registry import build_performance_model
from simulator.records.performance import StepBatch


def naive_step_time(pm, batch: StepBatch) -> float:
    """The composed model's formula, evaluated from the tables at call time (no grids)."""
    k, sh, arch = pm.kernels, pm.shapes, pm.arch
    spec = sum(batch.decode_spec_tokens)
    m = np.array([sum(batch.prefill_tokens) + len(batch.decode_context) + spec])
    rows = np.array([len(batch.prefill_tokens) + len(batch.decode_context) + spec])
    t = pm.overhead_s + float(pm._dense_seconds(m)[0]) + float(pm._head_seconds(rows)[0])
    if batch.prefill_tokens:
        n = len(batch.prefill_tokens)
        work = sum(q * (2 * c + q) for q, c in zip(batch.prefill_tokens, batch.prefill_context, strict=False))
        ms = k.context_attention_ms(sh.heads, sh.kv_heads, sh.head_dim, pm.kv_dtype, np.array([n]),
                                    np.array([math.sqrt(work / n)]))[0]
        kv_tokens = sum(batch.prefill_tokens) + sum(batch.prefill_context)
        t += max(arch.num_layers * 1e-3 * ms, kv_tokens * pm.kv_read_s_per_token)
    if batch.decode_context:
        n = len(batch.decode_context)
        ms = k.generation_attention_ms(sh.heads, sh.kv_heads, sh.head_dim, pm.kv_dtype, np.array([n]),
                                       np.array([sum(batch.decode_context) / n]))[0]
        t += arch.num_layers * 1e-3 * ms
    return t


def per_call_us(fn, batch, calls: int) -> float:
    fn(batch)
    start = time.perf_counter()
    for _ in range(calls):
        fn(batch)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    rng = random.Random(0)
    pm = build_performance_model("h100", "r1-distill-qwen-7b", "none", 1, {"source": "auto"})
    llmss = build_performance_model("rtxpro6000", "llama-3.1-8b", "none", 1, {"source": "llmservingsim"})
    batches = {
        "decode x1": StepBatch(decode_context=[2000]),
        "decode x64": StepBatch(decode_context=[rng.randint(100, 16000) for _ in range(64)]),
        "decode x256": StepBatch(decode_context=[rng.randint(100, 16000) for _ in range(256)]),
        "prefill 8192": StepBatch(prefill_tokens=[8192], prefill_context=[0]),
        "mixed 2 chunks + 128": StepBatch(prefill_tokens=[1500, 600], prefill_context=[0, 4000],
                                          decode_context=[rng.randint(100, 16000) for _ in range(128)]),
    }
    print(f"python {platform.python_version()} on {platform.machine()}; {args.calls} calls per cell; "
          f"model {pm.name}")
    print(f"{'batch':24s} {'grids us':>10s} {'naive us':>10s} {'speed-up':>9s} {'llmservingsim us':>17s}  agree")
    for name, batch in batches.items():
        fast = per_call_us(pm.step_time, batch, args.calls)
        slow = per_call_us(lambda b: naive_step_time(pm, b), batch, max(args.calls // 50, 100))
        other = per_call_us(llmss.step_time, batch, max(args.calls // 10, 100))
        agree = pm.step_time(batch) / naive_step_time(pm, batch) - 1
        print(f"{name:24s} {fast:10.2f} {slow:10.1f} {slow / fast:8.0f}x {other:17.1f}  {agree:+.2%}")


if __name__ == "__main__":
    main()
