"""Planner scale: a 1,000-layout sweep on Ray with its speed-up from one to two
workers, the capacity search of 1,000 layouts, and a day-of-traffic plan for one layout family.
A benchmark, not a test.

Layouts: DeepSeek-R1-Distill-Qwen-7B on H100, H200, A100, L40S or B200 x TP 1, 2 x no/FP8 KV cache
x max_num_seqs 32-512 x 1-10 replicas (1,000), against 1,000 requests (Gamma arrivals, cv 2,
4 req/s, reasoning lengths, seed 0).

1. Speed-up: the first 100 layouts simulated at the workload's rate (``plan=default``), with one
   Ray task at a time, then two, on one local Ray of two CPUs.
2. Sweep: all 1,000 layouts at the workload's rate, two workers. Target (1 + 2): <= 10 minutes
   on 2 cores.
3. Capacity: the highest rate each layout sustains (``plan=capacity``: families' one-replica
   layouts searched, the rest from their estimates unless pruned), for 120 layouts (max_num_seqs
   128, 256 x 1, 2, 4 replicas); --capacity-all: all 1,000 (long: probes of many replicas
   simulate many requests); --no-capacity skips it.
4. Day: ServeGen's 24 hours (144 windows, all clients) for H100 TP 1. Target: <= 5 minutes.

    python benchmarks/bench_planner.py                 # full
    python benchmarks/bench_planner.py --quick         # 300 requests, 40 layouts, 3 hours of the day
    python benchmarks/bench_planner.py --no-capacity   # items 1, 2 and 4 only
    python benchmarks/bench_planner.py --capacity-all  # the capacity search over all 1,000 layouts

Prints the times, the counts (ran, searched, pruned, cannot run), the simulations and the plans'
answers; the run folders stay under --out (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simulator.configure import CONF_DIR, to_plain  # noqa: E402
from simulator.huge_pages import avoid_huge_pages  # noqa: E402

SPACE = ["plan.hardware=[h100,h200,a100,l40s,b200]", "plan.tp=[1,2]", "plan.optimization=[none,fp8_kv]",
         "plan.engine.max_num_seqs=[32,64,128,256,512]", "plan.replicas=[1,2,3,4,5,6,7,8,9,10]"]
FULL = {
    "requests": 1000,
    "speedup": ["plan.hardware=[h100]", "plan.tp=[1,2]", "plan.optimization=[none]",
                "plan.engine.max_num_seqs=[32,64,128,256,512]", "plan.replicas=[1,2,3,4,5,6,7,8,9,10]"],
    "sweep": SPACE,
    "capacity": ["plan.hardware=[h100,h200,a100,l40s,b200]", "plan.tp=[1,2]", "plan.optimization=[none,fp8_kv]",
                 "plan.engine.max_num_seqs=[128,256]", "plan.replicas=[1,2,4]"],
    "day": ["plan.day.duration_s=null"],
}
QUICK = {
    "requests": 300,
    "speedup": ["plan.hardware=[h100]", "plan.tp=[1]", "plan.optimization=[none]",
                "plan.engine.max_num_seqs=[128,256]", "plan.replicas=[1,2,3,4,5]"],
    "sweep": ["plan.hardware=[h100,a100]", "plan.tp=[1,2]", "plan.optimization=[none]",
              "plan.engine.max_num_seqs=[128,256]", "plan.replicas=[1,2,3,4,6]"],
    "capacity": ["plan.hardware=[h100,a100]", "plan.tp=[1,2]", "plan.optimization=[none]",
                 "plan.engine.max_num_seqs=[128,256]", "plan.replicas=[1,2,3,4,6]"],
    "day": ["plan.day.duration_s=10800", "plan.day.window_s=30"],
}


def config(*overrides: str) -> dict:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return to_plain(compose("planner", overrides=list(overrides)))


def timed_plan(cfg: dict, out: Path, workers: int):
    from simulator.planning.dispatch import run_plan

    started = time.perf_counter()
    outcome = run_plan(cfg, out, progress=False, max_in_flight=workers)
    return outcome, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller sweep and a shorter day (smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="keep the plans' folders here")
    parser.add_argument("--no-capacity", action="store_true", help="skip the capacity search")
    parser.add_argument("--capacity-all", action="store_true", help="search the capacity of all 1,000 layouts")
    args = parser.parse_args()
    avoid_huge_pages()
    setup = QUICK if args.quick else FULL
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_planner-"))
    common = [f"workload.num_requests={setup['requests']}", "workload.rate=4", "workload.cv=2",
              "progress=false", "plots=true"]
    import ray

    from simulator.planning.runner import choose_local_auth

    choose_local_auth()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    print(f"Ray {ray.__version__}, 2 workers on {os.cpu_count()} cores; folders in {out}")

    speed = config(*common, *setup["speedup"])
    _, one = timed_plan(speed, out / "speedup-1", 1)
    _, two = timed_plan(speed, out / "speedup-2", 2)
    n = json.loads((out / "speedup-2" / "plan.json").read_text())["points"]["total"]
    print(f"speed-up   {n} layouts at the workload's rate: {one:.1f} s with 1 worker, {two:.1f} s with 2: "
          f"x{one / two:.2f}")

    outcome, wall = timed_plan(config(*common, *setup["sweep"]), out / "sweep", 2)
    counts = json.loads((out / "sweep" / "plan.json").read_text())["points"]
    print(f"sweep      {counts['total']} layouts x {setup['requests']} requests in {wall:.1f} s "
          f"({wall / 60:.1f} min): {counts['ran']} ran, {counts['infeasible']} cannot run, "
          f"{counts['failed']} failed")
    print(f"           {outcome.verdict}")
    print(f"sweep + speed-up: {(wall + one + two) / 60:.1f} min (target <= 10 on 2 cores)")

    if not args.no_capacity:
        space = SPACE if args.capacity_all and not args.quick else setup["capacity"]
        outcome, wall = timed_plan(config("plan=capacity", *common, *space), out / "capacity", 2)
        counts = json.loads((out / "capacity" / "plan.json").read_text())["points"]
        print(f"capacity   {counts['total']} layouts in {wall:.1f} s ({wall / 60:.1f} min): "
              f"{counts['searched']} searched, {counts['pruned']} pruned, {counts['infeasible']} cannot "
              f"run, {counts['failed']} failed; {counts['simulations']} simulations")
        print(f"           {outcome.verdict}")

    day = config("plan=day", "progress=false", *setup["day"])
    outcome, wall = timed_plan(day, out / "day", 2)
    summary = json.loads((out / "day" / "plan.json").read_text())
    print(f"day        {summary['windows']} windows of ServeGen in {wall:.1f} s ({wall / 60:.1f} min, "
          f"target <= 5): {outcome.verdict}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
