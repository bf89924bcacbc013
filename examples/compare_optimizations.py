"""Compare vLLM optimizations for a reasoning workload on one GPU, as the study does.

    python examples/compare_optimizations.py [--hardware h100] [--model r1-distill-qwen-14b] [--rate 2]

Simulates the same Gamma workload (same seed, so the same requests) under each
optimization and prints KV pressure and latency tails side by side.
"""

from __future__ import annotations

import argparse

from hydra import compose, initialize_config_dir

from simulator.configure import CONF_DIR, build_run
from simulator.engine.loop import simulate

OPTIMIZATIONS = ("none", "fp8_kv", "prefix_off", "fp8_weights", "spec_ngram")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hardware", default="h100")
    parser.add_argument("--model", default="r1-distill-qwen-14b")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--rate", type=float, default=2.0)
    parser.add_argument("--cv", type=float, default=2.0)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    print(f"{args.model} on {args.hardware} x{args.tp}: {args.requests} requests, "
          f"Gamma rate {args.rate}/s cv {args.cv}")
    print(f"{'optimization':<13}{'KV blocks':>10}{'KV mean':>9}{'KV peak':>9}{'preempt':>9}"
          f"{'TTFT p99':>10}{'TPOT p50':>10}{'E2E p50':>9}{'E2E p99':>9}{'tok/s':>8}")
    for optimization in OPTIMIZATIONS:
        overrides = [f"hardware={args.hardware}", f"model={args.model}", f"tp={args.tp}",
                     f"optimization={optimization}", "workload=gamma", f"workload.rate={args.rate}",
                     f"workload.cv={args.cv}", f"workload.num_requests={args.requests}"]
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=overrides)
        try:
            spec = build_run(cfg)
        except ValueError as err:  # e.g. fp8 weights without measured tables on this GPU
            print(f"{optimization:<13} not available: {err}")
            continue
        s = simulate(spec.workload, spec.engine, spec.perf, slo=spec.slo, seed=spec.seed).summary
        print(f"{optimization:<13}{s['kv_cache']['num_blocks']:>10}{s['kv_usage']['mean']:>9.1%}"
              f"{s['kv_usage']['peak']:>9.1%}{s['preemptions']:>9}{s['ttft_s']['p99']:>9.2f}s"
              f"{s['tpot_s']['p50'] * 1000:>8.1f}ms{s['e2e_s']['p50']:>8.1f}s{s['e2e_s']['p99']:>8.1f}s"
              f"{s['throughput']['output_tokens_per_s']:>8.0f}")


if __name__ == "__main__":
    main()
