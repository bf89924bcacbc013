"""Simulator speed: the fast path against the step-by-step path, in one run.

Workload: the first N rows of data/bench/reasoning_lengths_20k.csv (math reasoning
requests: prompts ~140 tokens, outputs ~5,200 on average, up to 32k; see
data/bench/PROVENANCE.md), Gamma arrivals with cv 2 at
0.08 req/s (light) and 1 req/s (the KV cache fills), DeepSeek-R1-Distill-Qwen-7B
on one H100 with vLLM's defaults: the simulator's default calibration.

Prints, per case: simulation wall time (workload generation to final metrics,
after an untimed run of the same case has paid the imports, built the
performance model, loaded the compiled engine and touched the memory such a run
needs, as Vidur's loop time leaves out its warm start; medians of 3-5 runs) of
the default path (which path it took: the compiled engine where it pays, else
the Python fast path), of the fast path, of the compiled engine and of the
step-by-step path they are checked against, the speed-up of the default path, the ratio against Vidur's
loop time measured by others on the same machine size (77 s for 1,000 requests
of an earlier length list with outputs ~5,800 on average), whether both paths agree, and the whole-process time (median
of 5, cold: a new process each) and peak RSS of the equivalent
`python -m simulator` command. Then how the fast path's time grows with the
request count.

    python benchmarks/bench_simulator.py            # full (a few minutes)
    python benchmarks/bench_simulator.py --quick    # 200 requests instead of 1,000
    python benchmarks/bench_simulator.py --large    # growth up to 100k requests (slow)
    python benchmarks/bench_simulator.py --servegen # also ServeGen's peak hour of R1 traffic (~2 min more)
    python benchmarks/bench_simulator.py --load     # only the overloaded case (~5 min; --quick: 2,000 requests)

The overloaded case (``--load``): 10,000 requests of the same list, Gamma rate 4/s, cv 2,
Llama-3.1-8B on one H100, max_num_seqs 256, 8,192 batched tokens: ten times what the replica
serves, so it is all queueing and preemption. BLIS (the Go simulator) took 36.4 s on the same
requests on a 2-core machine (measured by others). Per path: simulation time, steps per second,
the ratio to the step-by-step path and whether the results equal its results (bit for bit, or to
1e-9 as the fast path's do); then the whole process of the equivalent ``python -m simulator``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simulator.configure import CONF_DIR, build_run  # noqa: E402
from simulator.engine.loop import simulate  # noqa: E402
from simulator.huge_pages import avoid_huge_pages  # noqa: E402

VIDUR_LOOP_S = 77.0  # Vidur on a 2-core machine, 1,000 requests at 0.08 req/s
BLIS_LOAD_S = 36.4  # BLIS on a 2-core machine, the overloaded case's 10,000 requests
LOAD = ["model=llama-3.1-8b", "engine.max_num_seqs=256"]  # with rate 4, cv 2
LENGTHS = "data/bench/reasoning_lengths_20k.csv"


def spec_for(rate: float, n: int, lengths_file: str | None = LENGTHS, extra: tuple[str, ...] | list[str] = ()):
    from hydra import compose, initialize_config_dir

    overrides = ["workload=gamma", f"workload.rate={rate}", "workload.cv=2", f"workload.num_requests={n}", *extra]
    if lengths_file:
        overrides.append(f"workload.lengths_file={lengths_file}")
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
    return cfg


def servegen_spec(duration_s: int):
    """ServeGen's busiest hour of DeepSeek-R1 traffic (conf/workload/servegen.yaml), or its first
    ``duration_s`` seconds."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("config", overrides=["workload=servegen", f"workload.duration_s={duration_s}"])


#: the engine's paths (``simulate``'s fast and compiled arguments): the default (compiled where it
#: pays), the Python fast path, the compiled engine, and the step-by-step path all are checked against
PATHS = {"default": (True, "auto"), "fast": (True, False), "compiled": (True, True), "step": (False, False)}


def timed_simulation(cfg, path: str = "default", repeats: int = 1):
    """(median wall time over ``repeats`` runs, the result) on one of PATHS: one 2-core VM's
    timings vary by ~30%."""
    fast, compiled = PATHS[path]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        spec = build_run(cfg)
        result = simulate(spec.workload, spec.engine, spec.perf, slo=spec.slo, seed=spec.seed, fast=fast,
                          compiled=compiled)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), result


def identical(a, b) -> bool:
    """Both runs' tables equal bit for bit (NaN where NaN)."""
    for table in ("requests", "timeline"):
        x, y = getattr(a, table), getattr(b, table)
        for key in x:
            u, v = np.asarray(x[key]), np.asarray(y[key])
            if u.shape != v.shape or u.dtype != v.dtype:
                return False
            if not (np.array_equal(u, v, equal_nan=True) if u.dtype.kind == "f" else np.array_equal(u, v)):
                return False
    return True


def agree(a, b) -> bool:
    for table in ("requests", "timeline"):
        x, y = getattr(a, table), getattr(b, table)
        for key in x:
            u, v = x[key], y[key]
            if len(u) != len(v):
                return False
            if u.dtype.kind == "f":
                if not np.allclose(u, v, rtol=1e-9, atol=1e-9, equal_nan=True):
                    return False
            elif not np.array_equal(u, v):
                return False
    return True


# A child's ru_maxrss also counts its parent's memory (Linux keeps the high-water mark across
# fork and exec), so the simulator process reports its own peak (VmHWM), just before it ends
# as `python -m simulator` ends.
RUN_AND_REPORT_PEAK = """
import sys
import simulator.__main__ as cli
sys.argv[0] = "simulator"
status = cli.exit_status()
print("VmHWM", open("/proc/self/status").read().split("VmHWM:")[1].split()[0], file=sys.stderr)
cli.exit_now(status)
"""


def whole_process(rate: float, n: int, repeats: int = 5, extra: tuple[str, ...] | list[str] = ()
                  ) -> tuple[float, float]:
    """Median wall time and peak RSS (MB) of `python -m simulator ...` for the case, plots
    included, over ``repeats`` runs (one process start varies by ~0.2 s on 2 cores)."""
    cmd = [sys.executable, "-c", RUN_AND_REPORT_PEAK, "workload=gamma", f"workload.rate={rate}",
           "workload.cv=2", f"workload.num_requests={n}", f"workload.lengths_file={LENGTHS}", *extra,
           "progress=false", "hydra.run.dir=outputs/bench/${now:%H-%M-%S-%f}"]
    walls, peaks = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        peaks.append(int(done.stderr.rsplit("VmHWM", 1)[1].split()[0]) / 1024)
    return float(np.median(walls)), max(peaks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, faster")
    parser.add_argument("--large", action="store_true", help="also 100k requests (slow)")
    parser.add_argument("--load", action="store_true",
                        help="only the overloaded case (10,000 requests, ten times the replica's capacity)")
    parser.add_argument("--servegen", action="store_true",
                        help="also ServeGen's peak hour (~133k requests, ~37 req/s; fast path only, "
                             "with the step-by-step ratio on its first five minutes)")
    args = parser.parse_args()
    avoid_huge_pages()  # as `python -m simulator` does (simulator/huge_pages.py)
    if args.load:
        return overloaded(2000 if args.quick else 10000)
    n = 200 if args.quick else 1000
    timed_simulation(spec_for(1.0, 10), "fast")  # warm-up: imports, performance model
    timed_simulation(spec_for(1.0, 10), "compiled")  # ... and the compiled engine loaded
    print(f"# simulator speed, {n} requests of {LENGTHS}, Gamma cv 2, H100 + R1-Distill-Qwen-7B")
    print("| rate | steps | preemptions | path taken | default (s) | fast path (s) | compiled (s) | step-by-step (s) "
          "| speed-up | vs Vidur loop | same results | whole process (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rate in (0.08, 1.0):
        cfg = spec_for(rate, n)
        timed_simulation(cfg)  # warm-up (the whole process below is cold)
        t_default, default = timed_simulation(cfg, repeats=5)
        t_fast, fast = timed_simulation(cfg, "fast", repeats=3)
        t_compiled, compiled = timed_simulation(cfg, "compiled", repeats=3)
        t_slow, slow = timed_simulation(cfg, "step")
        same = agree(fast, slow) and identical(compiled, slow)
        wall, rss = whole_process(rate, n)
        vidur = f"{VIDUR_LOOP_S / t_default:.0f}x" if n == 1000 else "-"
        print(f"| {rate} | {default.summary.steps} | {default.summary.preemptions} | "
              f"{default.engine_path} | {t_default:.2f} | {t_fast:.2f} | {t_compiled:.2f} | {t_slow:.2f} | "
              f"{t_slow / t_default:.1f}x | {vidur} | {same} | {wall:.2f} | {rss:.0f} |")
    print()
    print("# growth with request count (default path, lengths from the default reasoning laws, 4 req/s, cv 2)")
    print("| requests | simulation (s) | steps | path taken |")
    print("|---|---|---|---|")
    counts = (1000,) if args.quick else ((1000, 10000, 100000) if args.large else (1000, 10000))
    for count in counts:
        t, r = timed_simulation(spec_for(4.0, count, lengths_file=None))
        print(f"| {count} | {t:.2f} | {r.summary.steps} | {r.engine_path} |")
    if args.servegen:
        print()
        print("# ServeGen peak hour of DeepSeek-R1 traffic, H100 + R1-Distill-Qwen-7B (target: <= 60 s)")
        print("| traffic | requests | steps | preemptions | path taken | default (s) | fast path (s) | step-by-step (s) "
              "| speed-up | same results |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        cfg = servegen_spec(300)  # the KV cache fills and preemptions begin
        t_default, default = timed_simulation(cfg)
        t_fast, fast = timed_simulation(cfg, "fast")
        t_slow, slow = timed_simulation(cfg, "step")
        same = agree(fast, slow) and (identical(default, slow) if default.engine_path == "compiled"
                                      else agree(default, slow))
        print(f"| first five minutes | {len(default.requests['arrival_s'])} | {default.summary.steps} | "
              f"{default.summary.preemptions} | {default.engine_path} | {t_default:.1f} | {t_fast:.1f} "
              f"| {t_slow:.1f} | {t_slow / t_default:.1f}x | {same} |")
        cfg = servegen_spec(3600)
        t_default, default = timed_simulation(cfg)
        t_fast, _ = timed_simulation(cfg, "fast")
        print(f"| hour | {len(default.requests['arrival_s'])} | {default.summary.steps} | "
              f"{default.summary.preemptions} | {default.engine_path} | {t_default:.0f} | {t_fast:.0f} "
              "| - | - | - |")
    return 0


def overloaded(n: int) -> int:
    """The overloaded case on each path (the default, which compiles it; the Python fast path; the
    step-by-step path they are checked against), steps per second and ratios, in one run."""
    cfg = spec_for(4.0, n, extra=LOAD)
    timed_simulation(spec_for(4.0, 50, extra=LOAD), "fast")  # warm-up: imports, performance model
    timed_simulation(spec_for(4.0, 50, extra=LOAD), "compiled")  # ... and the compiled engine loaded
    t_default, default = timed_simulation(cfg, repeats=3)
    t_fast, fast = timed_simulation(cfg, "fast", repeats=3)
    t_slow, slow = timed_simulation(cfg, "step")
    wall, rss = whole_process(4.0, n, repeats=3, extra=LOAD)
    steps = slow.summary.steps
    print(f"# overloaded case: {n} requests of {LENGTHS}, Gamma rate 4/s cv 2, H100 + Llama-3.1-8B, "
          f"max_num_seqs 256, 8,192 batched tokens; {steps:,} steps, {slow.summary.preemptions:,} preemptions")
    print("| path | simulation (s) | steps/s | vs step-by-step | same results as step-by-step |")
    print("|---|---|---|---|---|")
    rows = ((f"default ({default.engine_path})", t_default, default), ("fast path", t_fast, fast),
            ("step-by-step", t_slow, slow))
    for name, t, result in rows:
        same = "bit for bit" if identical(result, slow) else ("to 1e-9" if agree(result, slow) else "NO")
        print(f"| {name} | {t:.2f} | {steps / t:,.0f} | {t_slow / t:.1f}x | {same} |")
    blis = f"{BLIS_LOAD_S / wall:.1f}x faster than BLIS's {BLIS_LOAD_S} s" if n == 10000 else ""
    print(f"\nwhole process (`python -m simulator`, the default path, median of 3): {wall:.2f} s {blis}; "
          f"peak RSS {rss:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
