"""Time to profile the tiny model per optimization, and how well repeated profiles agree.

Runs the real profiler (`python -m profiler model=tiny-llama optimization=<opt>`) once per
optimization, timing the whole command (interpreter start, vLLM import, engine start-up,
warm-up and grid) against the goal of 3 minutes each on 2 cores. With --repeat N it
profiles `none` N more times and reports how much the runs differ per grid point and in
the fitted model's predictions. Run it on a quiet machine: other processes on the
engine's core slow steps down (the profiles' `disturbed_share` says how much).

    python benchmarks/bench_profiler.py                       # all five, into a temp dir
    python benchmarks/bench_profiler.py --ship                # into calibration/profiles/ (the shipped ones)
    python benchmarks/bench_profiler.py --optimizations none --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OPTIMIZATIONS = ("none", "fp8_kv", "prefix_cache", "spec_ngram", "int8_weights")
GOAL_S = 180.0


def profile(optimization: str, out: Path | None, grid: str, extra: list[str]) -> tuple[float, Path]:
    """Run the profiler to completion (from scratch); return (seconds, profile directory)."""
    args = [sys.executable, "-m", "profiler", "model=tiny-llama", f"optimization={optimization}",
            f"grid={grid}", "resume=false", "progress=false", *extra]
    if out is not None:
        args.append(f"output_dir={out}")
    start = time.perf_counter()
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"profiler failed for {optimization}:\n{result.stderr[-3000:]}")
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("[profiler] wrote "))
    return seconds, Path(line.split("[profiler] wrote ", 1)[1].split(":", 1)[0])


def point_medians(folder: Path) -> dict[str, float]:
    from simulator.records.profile import Profile

    steps = Profile.load(folder).steps
    steps = steps[steps["phase"].isin(["prefill", "decode", "spec"]) & (steps["rep"] >= 0) & ~steps["disturbed"]]
    return steps.groupby("point_id")["wall_s"].median().to_dict()


def agreement(folders: list[Path]) -> dict:
    """Run-to-run differences: per grid point (median step time) and per fitted prediction."""
    from calibration.fit import fit_profile
    from simulator.records.profile import Profile

    medians = [point_medians(f) for f in folders]
    common = sorted(set.intersection(*(set(m) for m in medians)))
    diffs = []
    for point in common:
        values = np.array([m[point] for m in medians])
        diffs.append((values.max() - values.min()) / np.median(values))
    models = [fit_profile(Profile.load(f)) for f in folders]
    batches = Profile.load(folders[0]).batches()
    preds = np.array([[m.step_time(b) for b in batches] for m in models])
    model_diff = (preds.max(axis=0) - preds.min(axis=0)) / np.median(preds, axis=0)
    arr = np.array(diffs)
    return {
        "runs": len(folders),
        "grid_points": len(common),
        "point_median_spread_median": float(np.median(arr)),
        "point_median_spread_p90": float(np.quantile(arr, 0.9)),
        "fitted_prediction_spread_median": float(np.median(model_diff)),
        "fitted_prediction_spread_p90": float(np.quantile(model_diff, 0.9)),
        "disturbed_share": [Profile.load(f).meta["summary"]["disturbed_share"] for f in folders],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizations", default=",".join(OPTIMIZATIONS))
    parser.add_argument("--grid", default="default")
    parser.add_argument("--ship", action="store_true", help="write to calibration/profiles/ (default paths)")
    parser.add_argument("--repeat", type=int, default=0, help="extra runs of `none` for the agreement check")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-profiler-"))
    results: dict = {"grid": args.grid, "goal_s": GOAL_S, "cores": len(os.sched_getaffinity(0)), "runs": []}
    folders: dict[str, Path] = {}
    print(f"{'optimization':<14} {'seconds':>8}  {'goal':>5}  steps  disturbed  held-out median APE")
    for opt in args.optimizations.split(","):
        seconds, folder = profile(opt, None if args.ship else scratch / opt, args.grid, [])
        folders[opt] = folder
        from calibration.fit import fit_profile
        from simulator.records.profile import Profile

        prof = Profile.load(folder)
        held = fit_profile(prof).report["held_out"]["median_ape"]
        row = {"optimization": opt, "seconds": round(seconds, 1), "within_goal": seconds <= GOAL_S,
               "steps": len(prof.steps), "disturbed_share": prof.meta["summary"]["disturbed_share"],
               "held_out_median_ape": held, "profile": str(folder)}
        results["runs"].append(row)
        print(f"{opt:<14} {seconds:>8.1f}  {'ok' if seconds <= GOAL_S else 'SLOW':>5}  {row['steps']:>5}"
              f"  {100 * row['disturbed_share']:>8.0f}%  {100 * held:.1f}%")
    if args.repeat:
        base = folders.get("none") or profile("none", scratch / "none", args.grid, [])[1]
        extra = [profile("none", scratch / f"none-repeat{i}", args.grid, [])[1] for i in range(args.repeat)]
        results["agreement"] = agreement([base, *extra])
        a = results["agreement"]
        print(f"agreement over {a['runs']} runs of none: per-point median step time differs by "
              f"{100 * a['point_median_spread_median']:.1f}% (median), {100 * a['point_median_spread_p90']:.1f}% (p90); "
              f"fitted predictions by {100 * a['fitted_prediction_spread_median']:.1f}% / "
              f"{100 * a['fitted_prediction_spread_p90']:.1f}%")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
