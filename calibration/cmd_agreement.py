"""``python -m calibration agreement``: how often the native scheduler decides as vLLM's own does.

Runs a workload through the native scheduler and vLLM's real V1 scheduler in
lockstep (simulator/engine/scheduler_diff.py) and prints the share of engine steps on
which both made the same decision (requests scheduled, in order, with their
token counts, and the preemptions), then the first divergent steps with both
batches. Needs vLLM installed (the engine env: scripts/setup_vllm_cpu.sh, then
``.venv-engine/bin/python -m calibration agreement ...``).

Where the workload and settings come from::

    # simulator config overrides, exactly as for `python -m simulator`
    python -m calibration agreement workload=gamma workload.rate=4 workload.num_requests=300 \\
        engine.num_gpu_blocks_override=3000

    # the live CPU validation workloads (calibration/validation_scenarios.py), or all of them
    python -m calibration agreement --scenario ci-reasoning
    python -m calibration agreement --scenario all

    # any workload.parquet (a simulator run writes one), with engine settings on top
    python -m calibration agreement --workload outputs/2026-11-24/10-00-00/workload.parquet \\
        -e num_gpu_blocks_override=2000 -e max_num_seqs=64

The overrides also choose the step-time model (hardware=, model=, perf=...);
it only paces the steps, the same for both schedulers. ``--scheduling`` picks
sync, async or both (default); ``--free-running`` adds the comparison of two
independent simulations by step index. Exit code 0, or 1 when ``--min-rate``
is given and a lockstep agreement falls below it, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from calibration.cli_args import (
    OneLineParser,
    arg_type,
    existing_file_arg,
    hydra_error,
    int_arg,
    number_arg,
    output_file_arg,
    positive_int_arg,
    seed_arg,
)
from simulator.records.engine_config import EngineConfig, parse_key_values
from simulator.records.errors import ConfigError
from simulator.records.workload import Workload


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m calibration agreement",
        description="Step-by-step agreement of the native scheduler with vLLM's own scheduler.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", help="simulator config overrides (workload=..., engine.X=...)")
    p.add_argument("--scenario", action="append", default=[],
                   help="a live CPU validation scenario, or 'all' (repeatable)")
    p.add_argument("--workload", type=arg_type(existing_file_arg, "--workload"), default=None,
                   help="a workload.parquet to use instead")
    p.add_argument("-e", "--engine", action="append", default=[], metavar="KEY=VALUE",
                   help="engine setting (EngineConfig field) applied on top (repeatable)")
    p.add_argument("--requests", type=arg_type(positive_int_arg, "--requests"), default=None,
                   help="only the first N requests")
    p.add_argument("--scheduling", choices=("sync", "async", "both"), default="both")
    p.add_argument("--free-running", action="store_true",
                   help="also compare two independent simulations by step index")
    p.add_argument("--show", type=arg_type(_count_arg, "--show"), default=3,
                   help="divergent steps to print per case")
    p.add_argument("--seed", type=arg_type(seed_arg, "--seed"), default=None,
                   help="seed (default: the workload's)")
    p.add_argument("--min-rate", type=arg_type(_rate_arg, "--min-rate"), default=None,
                   help="exit 1 if a lockstep agreement is below this (e.g. 0.99)")
    p.add_argument("--json", type=arg_type(output_file_arg, "--json"), default=None,
                   help="also write the results as JSON")
    return p


def _count_arg(field: str, text: str) -> int:
    return int_arg(field, text, minimum=0)


def _rate_arg(field: str, text: str) -> float:
    return number_arg(field, text, 0.0, 1.0)


def _engine_with(engine: EngineConfig, items: list[str], base: dict | None = None) -> EngineConfig:
    """``engine`` (or ``base`` settings) with KEY=VALUE settings on top."""
    data = dict(base) if base is not None else engine.to_dict()
    return EngineConfig.from_dict({**data, **parse_key_values(items, "engine")})


def _base_run(overrides: list[str]):
    """The simulator's RunSpec for these Hydra overrides (defaults from conf/)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from simulator.configure import CONF_DIR, build_run, check_group_choices

    check_group_choices(overrides)
    try:
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=list(overrides))
    except HydraException as err:
        raise hydra_error(err, list(overrides)) from None
    return build_run(cfg)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from simulator.engine import scheduler_diff
    from simulator.engine.vllm_oracle import require_vllm, vllm_version

    spec = _base_run(args.overrides)  # the configuration first: its errors need no vLLM
    require_vllm()  # fail early, in one line, without vLLM
    todo = _cases(args, spec)
    modes = {"sync": [False], "async": [True], "both": [False, True]}[args.scheduling]
    print(f"vLLM: {vllm_version()}; step times: {spec.perf.name}")
    results = []
    worst = 1.0
    for name, workload, engine in todo:
        seed = spec.seed if args.seed is None else args.seed
        for async_scheduling in modes:
            if async_scheduling and engine.speculative.enabled and engine.speculative.method == "ngram":
                continue  # vLLM runs n-gram speculation synchronously
            label = f"{name} ({len(workload)} requests), {'async' if async_scheduling else 'sync'}"
            started = time.perf_counter()
            reports = scheduler_diff.compare(workload, engine, spec.perf, seed=seed,
                                             async_scheduling=async_scheduling, keep=args.show,
                                             free=args.free_running, progress=True)
            print(f"\n== {label}  [{time.perf_counter() - started:.1f} s]")
            for report in reports:
                print(report.format(args.show))
            worst = min(worst, reports[0].rate)
            results.append({
                "case": name, "requests": len(workload), "seed": seed,
                "scheduling": "async" if async_scheduling else "sync",
                "engine": engine.to_dict(),
                **{r.mode: {"steps": r.steps, "agreeing": r.agreeing, "rate": r.rate,
                            "preemptions": {"native": r.native_preemptions, "vllm": r.vllm_preemptions}}
                   for r in reports},
            })
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"vllm": vllm_version(), "perf": spec.perf.name,
                                         "overrides": args.overrides, "results": results},
                                        indent=2))
    if args.min_rate is not None and worst < args.min_rate:
        print(f"\nlockstep agreement {worst:.2%} is below --min-rate {args.min_rate:.2%}",
              file=sys.stderr)
        return 1
    return 0


def _cases(args, spec) -> list[tuple[str, Workload, EngineConfig]]:
    """(name, workload, engine settings) for each workload to compare."""
    if args.scenario and args.workload:
        raise ConfigError("workload", "give --scenario or --workload, not both")
    if args.scenario:
        from calibration.validation_scenarios import CPU_ENGINE, SCENARIOS, get_scenario

        names = list(SCENARIOS) if "all" in args.scenario else args.scenario
        out = []
        for name in names:
            scenario = get_scenario(name)
            engine = _engine_with(spec.engine, args.engine, {**CPU_ENGINE, **scenario.engine})
            out.append((name, scenario.workload(args.requests), engine))
        return out
    workload = Workload.load(args.workload) if args.workload else spec.workload
    if args.requests:
        workload = workload.head(args.requests)
    return [(workload.name, workload, _engine_with(spec.engine, args.engine))]
