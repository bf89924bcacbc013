"""``python -m calibration validate``: profile, fit, simulate, run live, compare, report.

The whole loop on the tiny model and a CPU (about 3 minutes on 2 cores)::

    python -m calibration validate --scenario ci-reasoning --runs 3 --out runs/validate-1

Reuse what exists::

    python -m calibration validate --scenario ci-reasoning --profile calibration/profiles/.../none \\
        --live-runs runs/validate-1/live/run-0 runs/validate-1/live/run-1 runs/validate-1/live/run-2

    # a workload of your own (any workload.parquet) and engine settings (EngineConfig fields)
    python -m calibration validate --workload runs/x/workload.parquet -e block_size=32 \\
        -e num_gpu_blocks_override=64 -e max_model_len=1024 --profile DIR --runs 3 --out DIR

Steps: (1) the profile: ``--profile DIR`` or a fresh one from
``python -m profiler model=<model> optimization=none`` on ``--grid`` (default
``validation``: the smoke grid widened to decode batches up to 16; its serving phase on one
server and without a served load, whose steps give only the profile's own overhead terms, unless
a mode below is ``auto``);
(2) ``calibration.fit.load_fitted_model``; (3) the live runs: ``--live-runs`` (the workload
they replayed, their ``workload.parquet``, is the one simulated) or ``--runs N`` replays on
vLLM servers (a fresh server per run, since step times drift 10-30% between vLLM processes;
``--same-server`` runs them back to back on one), each with machine state recorded;
(4) ``--sim-seeds`` simulations with step-time jitter, using the fitted model plus the server's
overheads: by default those measured on each live run's probes, never on the
workload (per step, per request and per KV token from the decode probes,
``--step-gap``; per prefill token from the prefill probes,
``--prefill-offset``); with ``auto`` the profile's own (its serving phase;
exactly what ``perf=profile`` applies, calibration/serving.py) when it has
them, else (said on stderr) the probes'; and the live server's scheduling mode (vLLM 0.32 on
CPU: synchronous); the per-request time the OpenAI server spends outside
engine steps (isolated probe requests, plus what lone requests during a
decode batch show for a busy server; ``--request-overhead``) is added to
simulated TTFT, TTFVT and E2E; (5) the report (report.md, report.json, PNGs) in ``--out``. Exit code 0 when every metric
with a tolerance passes, 1 when one fails, 2 on bad input, 3 when a live run
failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration import scenario_pace, serving, validate
from calibration.cli_args import (
    OneLineParser,
    arg_type,
    existing_dir_arg,
    existing_file_arg,
    nonnegative_arg,
    number_arg,
    output_dir_arg,
    positive_int_arg,
)
from calibration.live_model import JitteredModel, StepGapModel, add_request_overhead
from calibration.validation_scenarios import CPU_ENGINE, SCENARIOS, get_scenario
from simulator.records.engine_config import EngineConfig, parse_key_values
from simulator.records.errors import ConfigError
from simulator.records.metrics import SLO
from simulator.records.run_result import RunResult
from simulator.records.workload import Workload

REPO_ROOT = Path(__file__).resolve().parents[1]
#: inter-step gap vLLM's iteration log leaves out on our CPUs (../shared/vllm-cpu.md), used
#: when no live iteration log gives a measurement
DEFAULT_STEP_GAP_S = 0.0014
#: ``--grid validation``: the profiler's smoke grid widened to the batch sizes and contexts of
#: the CPU validation scenarios (decode batches up to 16, prefill chunks up to 512): ~15-20 s
VALIDATION_GRID = ["grid=smoke", "grid.repeats=3", "grid.prefill_chunks=[32,128,512]",
                   "grid.prefill_contexts=[0,512]", "grid.decode_batches=[1,4,8,16]",
                   "grid.decode_contexts=[128,512]", "grid.decode_max_batch_tokens=8192"]
TOLERANCE_SETS = {"ci": validate.CI_TOLERANCES, "fidelity": validate.FIDELITY_TARGET, "none": {}}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m calibration validate",
                      description="Validate the simulator against live vLLM runs.")
    p.add_argument("--scenario", default=None, choices=sorted(SCENARIOS), help="default ci-reasoning")
    p.add_argument("--requests", type=arg_type(positive_int_arg, "--requests"), default=None,
                   help="override the scenario's request count")
    p.add_argument("--workload", type=arg_type(existing_file_arg, "--workload"), default=None,
                   help="a workload.parquet instead of a scenario")
    p.add_argument("-e", action="append", default=[], metavar="KEY=VALUE", help="engine setting")
    p.add_argument("--model", default="tiny-llama", help="model for profiling and the live server")
    p.add_argument("--profile", type=arg_type(_profile_arg, "--profile"), default=None,
                   help="existing profile directory (else profile now)")
    p.add_argument("--optimization", default=None,
                   help="profiler optimization when profiling now (default: the scenario's, else none)")
    p.add_argument("--spec-acceptance", default="live", choices=("live", "config"),
                   help="speculative decoding: give the simulator the draft acceptance the live runs "
                        "measured (live), or the engine config's (config)")
    p.add_argument("--grid", default="validation",
                   help="profiler grid when profiling now: validation (smoke widened to the scenarios' "
                        "batch sizes, ~20 s), or a conf/profiler/grid name (smoke, default)")
    p.add_argument("--live-runs", nargs="+", type=arg_type(existing_dir_arg, "--live-runs"), default=None,
                   help="existing live run directories (the simulation replays the workload they replayed, "
                        "their workload.parquet)")
    p.add_argument("--runs", type=arg_type(positive_int_arg, "--runs"), default=3,
                   help="live runs to make (>= 3 recommended)")
    p.add_argument("--fresh-server", action="store_true", default=True,
                   help="a fresh server per live run (default): samples the process-to-process drift")
    p.add_argument("--same-server", dest="fresh_server", action="store_false",
                   help="all live runs back to back on one server (saves a start-up per run)")
    p.add_argument("--kv-cache-space-gib", type=arg_type(positive_int_arg, "--kv-cache-space-gib"), default=1)
    p.add_argument("--timeout", type=arg_type(_seconds_arg, "--timeout"), default=300.0,
                   help="per-request timeout of live runs (s)")
    p.add_argument("--sim-seeds", type=arg_type(positive_int_arg, "--sim-seeds"), default=5,
                   help="simulated runs (seeds)")
    p.add_argument("--step-sigma", type=arg_type(nonnegative_arg, "--step-sigma"), default=0.05,
                   help="per-step lognormal jitter of step times")
    p.add_argument("--run-sigma", type=arg_type(nonnegative_arg, "--run-sigma"), default=0.03,
                   help="per-run lognormal scale of step times")
    p.add_argument("--step-gap", default="probe",
                   help="time added to every simulated step: probe (server minus model on the live runs' "
                        "decode probe; the default: measured on the servers validated), auto (the profile's "
                        "serving overheads, as perf=profile applies them; probe when the profile has none), "
                        "none, gap (the live logs' inter-step gap) or seconds")
    p.add_argument("--prefill-offset", default="probe",
                   help="time added per prefill token: auto (the profile's, else probe), probe (default: server minus "
                        "model on the live runs' isolated prefill probes), none, or seconds per token")
    p.add_argument("--request-overhead", default="measured",
                   help="per-request API-server time added to simulated TTFT/E2E: measured (default: the "
                        "live runs' probes, idle and busy), auto (the profile's idle overhead, as the "
                        "simulator's client-observed figures; else measured), none, or seconds (idle and busy alike)")
    p.add_argument("--tolerances", default="ci", choices=sorted(TOLERANCE_SETS))
    p.add_argument("--out", required=True, type=arg_type(output_dir_arg, "--out"), help="output directory")
    p.add_argument("--no-progress", action="store_true")
    return p


def _seconds_arg(field: str, text: str) -> float:
    return number_arg(field, text, low=0.0, open_low=True)


def _profile_arg(field: str, text: str) -> Path:
    """A profile directory (with profile.json) or a fit.json file."""
    path = Path(text)
    if not ((path / "profile.json").is_file() or (path.is_file() and path.suffix == ".json")):
        raise ConfigError(field, f"a profile directory (with profile.json) or a fit.json, got {text!r}")
    return path


def _parse_engine(items: list[str], base: dict) -> EngineConfig:
    return EngineConfig.from_dict({**base, **parse_key_values(items, "engine")})


def workload_and_engine(args) -> tuple[Workload, EngineConfig, str, str]:
    """The workload, engine settings, name and profiler optimization of a scenario or workload file."""
    if args.workload:
        if args.scenario:
            raise ConfigError("workload", "give a scenario or a workload file, not both")
        return (Workload.load(args.workload), _parse_engine(args.e, CPU_ENGINE), Path(args.workload).stem,
                args.optimization or "none")
    scenario = get_scenario(args.scenario or "ci-reasoning")
    engine = _parse_engine(args.e, {**CPU_ENGINE, **scenario.engine})
    return scenario.workload(args.requests), engine, scenario.name, args.optimization or scenario.optimization


def run_profiler(model: str, grid: str, out_dir: Path, engine: EngineConfig, optimization: str = "none",
                 serving_servers: int | None = None, load_requests: int | None = None) -> Path:
    """Profile ``model`` with the profiler CLI into ``out_dir`` (it finds the engine env itself);
    ``serving_servers``: servers of its serving phase, ``load_requests``: requests of the served
    load on each (None: the profiler's defaults)."""
    grid_args = VALIDATION_GRID if grid == "validation" else [f"grid={grid}"]
    serving = [f"serving.servers={serving_servers}"] if serving_servers else []
    if load_requests is not None:
        serving.append(f"serving.load_requests={load_requests}")
    cmd = [sys.executable, "-m", "profiler", f"model={model}", f"optimization={optimization}", *grid_args,
           f"output_dir={out_dir}", f"engine.block_size={engine.block_size}",
           f"engine.max_num_batched_tokens={engine.max_num_batched_tokens}", "resume=false", *serving]
    print(f"[validate] profiling: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=REPO_ROOT, check=False)
    if done.returncode != 0:
        raise ConfigError("profile", f"the profiler failed with exit code {done.returncode}")
    return out_dir


def profile_overheads(fitted) -> serving.ServingOverheads | None:
    """The serving overheads the profile's serving phase measured, or None."""
    data = getattr(fitted, "serving", None)
    return serving.ServingOverheads.from_dict(data) if data else None


def load_model(profile_dir: Path):
    try:
        from calibration.fit import load_fitted_model
    except ImportError as err:
        raise ConfigError("profile", f"calibration.fit is not available: {err}") from None
    return load_fitted_model(profile_dir)


#: what two replays of one workload share (the token ids sent may differ: a token seed per run)
REPLAYED_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens", "prefix_group", "prefix_tokens")


def replayed_workload(dirs: list[Path], workload: Workload) -> tuple[Workload, str | None]:
    """The workload existing live runs replayed (each run's ``workload.parquet``; they must
    agree), which the simulation must replay too: a scenario is paced to the host it ran on, and
    a workload file may have been cut. Runs without the file (older ones): ``workload``, as given.
    Returns the workload and where it came from (None: as given)."""
    found = [(d, Workload.load(Path(d) / "workload.parquet")) for d in dirs
             if (Path(d) / "workload.parquet").is_file()]
    if not found:
        return workload, None
    (first_dir, first), *rest = found
    for d, other in rest:
        if len(other) != len(first) or not all(
                np.array_equal(getattr(first, c), getattr(other, c)) for c in REPLAYED_COLUMNS):
            raise ConfigError("live_runs", f"{d} replayed another workload than {first_dir} "
                                           "(arrivals or lengths differ): give runs of one workload")
    return first, f"{Path(first_dir) / 'workload.parquet'} (the workload the live runs replayed)"


def live_runs(args, workload: Workload, engine: EngineConfig, out: Path) -> tuple[list[RunResult], list[str]]:
    """Existing live runs, or new ones; returns (results, problems)."""
    if args.live_runs:
        results = [RunResult.read(d) for d in args.live_runs]
        for d, r in zip(args.live_runs, results, strict=True):
            if r.summary.requests != len(workload):
                raise ConfigError("live_runs", f"{d} has {r.summary.requests} requests, "
                                               f"the workload {len(workload)}")
        return results, []
    from profiler.live.runner import LiveRunConfig, run_series, summary_line
    from profiler.live.server import ServerSpec, resolve_model

    spec = ServerSpec(model=resolve_model(args.model), engine=engine,
                      kv_cache_space_gib=args.kv_cache_space_gib)
    outcomes = run_series(workload, out / "live", args.runs, spec, fresh_server=args.fresh_server,
                          config=LiveRunConfig(request_timeout_s=args.timeout), progress=not args.no_progress)
    problems = []
    for o in outcomes:
        print(f"[validate] live {o.out_dir.name}: {summary_line(o.result)}", file=sys.stderr, flush=True)
        if o.exit_code:
            problems.append(f"{o.out_dir.name}: {o.message}")
    return [o.result for o in outcomes], problems


@dataclass(frozen=True)
class StepOffsets:
    """What the server adds to each simulated step beyond the fitted model, and where it came from."""

    per_step: float
    per_request: float
    per_context_token: float
    source: str


def probe_offsets(model, live: list[RunResult]) -> tuple[float, float, float] | None:
    """(per step, per request in the step, per KV token attended) the server spends beyond
    the model, from the live runs' decode probes (``summary.live.decode_probe`` and
    ``decode_probe_after``: known decode batches before and after the workload);
    calibration.serving.decode_terms does the arithmetic, and bounds a per-KV-token term, for
    live runs and profiles alike. None without probes."""
    return _probe_decode_terms(model, live)[0]


def _probe_decode_terms(model, live: list[RunResult]) -> tuple[tuple[float, float, float] | None, str]:
    """``probe_offsets`` and the note on its bound (calibration.serving.decode_terms)."""
    return serving.decode_terms(model, probe_sets(live), [], speculative=False)


def probe_sets(live: list[RunResult]) -> list[dict]:
    """The live runs' probe sets (calibration.serving)."""
    return [r.summary.get("live", {}) for r in live]


def step_gap(arg: str, live: list[RunResult], model=None) -> StepOffsets:
    """What to add to every simulated step, and where it came from.

    ``probe`` (default): the server-minus-model step times on the live runs'
    decode probes (``probe_offsets``), measured on batches of their own, not on
    the workload; nothing when no run has probes. ``none``: nothing; the profiler times a
    whole ``LLMEngine.step()`` (scheduling, forward pass, sampling, output
    processing), as the server's logged elapsed time plus its inter-step gap.
    ``gap``: the median inter-step gap of the live iteration logs (1.4 ms
    without logs), for step models that cover only the forward pass (e.g.
    fitted to the iteration log's elapsed times). A number: that many seconds.
    """
    if arg == "none":
        return StepOffsets(0.0, 0.0, 0.0, "none: the profiler's step times span whole engine steps")
    if arg == "probe":
        terms, note = _probe_decode_terms(model, live) if model is not None else (None, "")
        if terms is None:
            return StepOffsets(0.0, 0.0, 0.0, "probe: no live decode probes, nothing added")
        return StepOffsets(*terms, "probe: server minus model step times on the live runs' decode probes" + note)
    if arg == "gap":
        measured = [r.summary.get("live", {}).get("inter_step_gap_s") for r in live]
        measured = [g for g in measured if g is not None]
        if measured:
            return StepOffsets(float(np.median(measured)), 0.0, 0.0,
                               f"median inter-step gap of {len(measured)} live iteration logs")
        return StepOffsets(DEFAULT_STEP_GAP_S, 0.0, 0.0, "default 1.4 ms (no live iteration log)")
    try:
        gap = float(arg)
    except ValueError:
        raise ConfigError("step_gap", f"must be probe, none, gap or seconds, got {arg!r}") from None
    return StepOffsets(gap, 0.0, 0.0, "given")


def probe_prefill_per_token(model, live: list[RunResult]) -> float | None:
    """What a prefill token costs on the server beyond the model, from the live runs' isolated
    prefill probes (calibration.serving.prefill_term: bounded as a profile's). None without
    probes at two lengths."""
    return _probe_prefill_term(model, live)[0]


def _probe_prefill_term(model, live: list[RunResult]) -> tuple[float | None, str]:
    """``probe_prefill_per_token`` and the note on its bound (calibration.serving.prefill_term)."""
    return serving.prefill_term(model, model, probe_sets(live), [], speculative=False)


def prefill_offset(arg: str, live: list[RunResult], model=None) -> tuple[float, str]:
    """(time added per prefill token in a simulated step, where it came from)."""
    if arg == "none":
        return 0.0, "none"
    if arg == "probe":
        slope, note = _probe_prefill_term(model, live) if model is not None else (None, "")
        if slope is None:
            return 0.0, "probe: no live prefill probes at two lengths, nothing added"
        return slope, "probe: server minus model prefill step times on the live runs' prefill probes" + note
    try:
        return float(arg), "given"
    except ValueError:
        raise ConfigError("prefill_offset", f"must be probe, none or seconds per token, got {arg!r}") from None


def request_overhead(arg: str, live: list[RunResult]) -> tuple[float, str]:
    """Per-request time outside the engine (HTTP, API server) to add to simulated latencies."""
    if arg == "none":
        return 0.0, "none"
    if arg == "measured":
        measured = [r.summary.get("live", {}).get("request_overhead_s") for r in live]
        measured = [m for m in measured if m is not None]
        if measured:
            return max(float(np.median(measured)), 0.0), f"median of {len(measured)} live runs' probes"
        return 0.0, "not measured (no probes matched the iteration log): none added"
    try:
        return float(arg), "given"
    except ValueError:
        raise ConfigError("request_overhead", f"must be measured, none or seconds, got {arg!r}") from None


def busy_overhead(model, live: list[RunResult], engine: EngineConfig, idle_overhead_s: float,
                  async_scheduling: bool) -> tuple[float, str]:
    """Extra per-request time outside the engine when a request arrives at a busy server, from
    the live runs' loaded probes (calibration.serving.busy_overhead)."""
    extra = serving.busy_overhead(model, probe_sets(live), engine, idle_overhead_s, async_scheduling)
    if extra is None:
        return 0.0, "no loaded probes: none added"
    n = sum(len(p["lone"]) for r in live for p in r.summary.get("live", {}).get("loaded_probe") or [])
    return extra, f"median of {n} loaded probes (live TTFT minus simulated)"


def acceptance_given_previous(mean_accepted: float, k: int) -> float:
    """The constant per-position acceptance a with a + a^2 + ... + a^k = mean_accepted."""
    if mean_accepted <= 0:
        return 0.0
    if mean_accepted >= k:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection: the sum rises with a
        mid = (lo + hi) / 2
        if sum(mid ** i for i in range(1, k + 1)) < mean_accepted:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def speculation_for_simulator(source: str, engine: EngineConfig, live: list[RunResult], workload: Workload
                              ) -> tuple[EngineConfig, str]:
    """The engine config the simulator runs, with the draft acceptance to use, and where it came from.

    ``live``: from the live runs' counters (median over runs): drafts proposed per
    decode step of a request (proposal rate), and the acceptance per draft position
    (vLLM's accepted-per-position counters; runs without them: accepted tokens per
    draft turned into a constant per-position acceptance). ``config``: as given.
    Acceptance depends on the model and the text, not on the serving system,
    so validation takes it as an input and checks latency and memory given it.
    """
    spec = engine.speculative
    if source == "config":
        return engine, "engine config"
    from profiler.live.spec_counters import SpecCounters

    k = spec.num_speculative_tokens
    rates, per_position, proposals = [], [], []
    for r in live:
        counters = r.summary.get("spec_decode") or {}
        drafts, accepted = counters.get("drafts"), counters.get("accepted_tokens")
        if not drafts or accepted is None:
            continue
        # each decode step of a request yields 1 token plus its accepted drafts; prefill yields the first
        decode_steps = int(workload.output_tokens.sum()) - len(workload) - int(accepted)
        if decode_steps <= 0:
            continue
        proposals.append(min(drafts / decode_steps, 1.0))
        rates.append(acceptance_given_previous(accepted / drafts, k))
        by_position = counters.get("accepted_per_pos") or []
        if len(by_position) == k:
            per_position.append(SpecCounters(int(drafts), int(counters.get("draft_tokens") or 0), int(accepted),
                                             [int(a) for a in by_position]).acceptance_given_previous())
    if not rates:
        return engine, "engine config (the live runs report no drafts)"
    if len(per_position) == len(rates):  # every run counted its positions
        acceptance = tuple(float(a) for a in np.median(np.array(per_position), axis=0))
        what = "counters, per draft position"
    else:
        acceptance, what = (float(np.median(rates)),), "counters (mean accepted per draft)"
    measured = type(spec)(method=spec.method, num_speculative_tokens=k,
                          acceptance_rate=acceptance, proposal_rate=float(np.median(proposals)))
    return dataclasses.replace(engine, speculative=measured), f"median of {len(rates)} live runs' {what}"


def seeds_draw(step_sigma: float, run_sigma: float, engine: EngineConfig) -> str:
    """What differs between the simulated seeds: the workload is the replayed one in all of them."""
    drawn = [name for name, on in (("per-step jitter (--step-sigma)", step_sigma > 0),
                                   ("per-run scale (--run-sigma)", run_sigma > 0),
                                   ("draft acceptance", engine.speculative.enabled)) if on]
    if not drawn:
        return "nothing is drawn at random (no jitter, no speculation): every seed gives the same run"
    return "the same replayed workload in every seed; each seed draws " + ", ".join(drawn)


def simulate_runs(workload: Workload, engine: EngineConfig, model, seeds: int, step_sigma: float,
                  run_sigma: float, async_scheduling: bool, out: Path, overhead_s: float = 0.0,
                  busy_extra_s: float = 0.0) -> list[RunResult]:
    from simulator.engine.loop import simulate

    results = []
    for seed in range(seeds):
        perf = JitteredModel(model, seed=seed, step_sigma=step_sigma, run_sigma=run_sigma)
        result = simulate(workload, engine, perf, slo=SLO(), seed=seed, async_scheduling=async_scheduling)
        if overhead_s or busy_extra_s:
            result = add_request_overhead(result, overhead_s, busy_extra_s=busy_extra_s)
        result.metadata = {"kind": "simulated", "seed": seed, "performance_model": perf.describe(),
                           "engine": engine.to_dict(), "request_overhead_s": overhead_s,
                           "busy_overhead_s": busy_extra_s}
        result.write(out / "sim" / f"seed-{seed}")
        results.append(result)
    return results


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    # refuse bad input now, before the profile and the live runs it would follow
    if args.step_gap != "auto":
        step_gap(args.step_gap, [])
    if args.prefill_offset != "auto":
        prefill_offset(args.prefill_offset, [])
    if args.request_overhead != "auto":
        request_overhead(args.request_overhead, [])
    started = time.time()
    workload, engine, name, optimization = workload_and_engine(args)
    workload_source = None
    if args.live_runs:  # simulate what they replayed (a paced scenario's arrivals, say), not the scenario anew
        workload, workload_source = replayed_workload(args.live_runs, workload)
        if workload_source:
            print(f"[validate] simulating {workload_source}", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the validated servers' own probes price the steps unless a mode asks for the profile's serving terms:
    # then one server's serving phase, without a served load (whose steps give only those terms), is
    # enough (its shape probes), else the profiler's defaults
    uses_profile = "auto" in (args.step_gap, args.prefill_offset, args.request_overhead)
    profile_dir = Path(args.profile) if args.profile else run_profiler(
        args.model, args.grid, out / "profile", engine, optimization, serving_servers=None if uses_profile else 1,
        load_requests=None if uses_profile else 0)
    fitted = load_model(profile_dir)
    pace = None
    if not args.workload and not args.live_runs:  # a scenario replayed now: its load relative to this host
        pace = scenario_pace.pace_of_profile(profile_dir, fitted, load_model)
        workload = scenario_pace.paced(workload, pace)
        if pace.factor != 1.0:
            print(f"[validate] this host's server runs a decode step {pace.slowdown:.1f}x as long as the profile the "
                  f"scenario's rates were set on: its arrivals spread by that factor (calibration/scenario_pace.py)",
                  file=sys.stderr, flush=True)
    workload.save(out / "workload.parquet")
    live, problems = live_runs(args, workload, engine, out)
    if not live:
        print("error: live: no live run finished", file=sys.stderr)
        return 3
    profiled = profile_overheads(fitted)
    if "auto" in (args.step_gap, args.prefill_offset, args.request_overhead):
        print("[validate] overheads: " + (f"the profile's ({profiled.source})" if profiled else
              "the profile has none (no serving phase): measuring them on the live runs' probes"),
              file=sys.stderr, flush=True)
    gap_mode = ("profile" if profiled else "probe") if args.step_gap == "auto" else args.step_gap
    prefill_mode = ("profile" if profiled else "probe") if args.prefill_offset == "auto" else args.prefill_offset
    request_mode = ("profile" if profiled else "measured") if args.request_overhead == "auto" \
        else args.request_overhead
    if gap_mode == "profile":
        offsets = StepOffsets(profiled.per_step_s, profiled.per_request_s, profiled.per_context_token_s,
                              "profile: " + profiled.source)
    elif gap_mode == "probe" and engine.speculative.enabled:
        # a probe step's drafts are not in the iteration log, so server minus model cannot be
        # taken on them; the live runs' inter-step gap is what the server adds to a whole step
        offsets = step_gap("gap", live, fitted)
        offsets = dataclasses.replace(offsets, source="gap (probes skipped: speculative steps' drafts "
                                                      "are not logged): " + offsets.source)
    else:
        offsets = step_gap(gap_mode, live, fitted)
    async_flags = {r.summary.get("async_scheduling") for r in live} - {None}
    async_scheduling = async_flags.pop() if len(async_flags) == 1 else False
    if request_mode == "profile":
        overhead, overhead_source = profiled.request_overhead_s, "profile (idle; as the simulator's front end)"
    else:
        overhead, overhead_source = request_overhead(request_mode, live)
    if prefill_mode == "profile":
        per_prefill_token, prefill_source = profiled.per_prefill_token_s, "profile: " + profiled.source
    else:
        per_prefill_token, prefill_source = prefill_offset(prefill_mode, live, fitted)
    if gap_mode == prefill_mode == "profile":
        model = serving.ServedModel(fitted, profiled)  # exactly what perf=profile simulates
    else:
        model = StepGapModel(fitted, offsets.per_step, offsets.per_request, per_prefill_token,
                             offsets.per_context_token)
    sim_engine, spec_source = engine, None
    if engine.speculative.enabled:
        sim_engine, spec_source = speculation_for_simulator(args.spec_acceptance, engine, live, workload)
    busy_extra, busy_source = 0.0, "not used"
    if request_mode == "measured":
        busy_extra, busy_source = busy_overhead(model, live, sim_engine, overhead, async_scheduling)
    seeds_note = seeds_draw(args.step_sigma, args.run_sigma, sim_engine)
    if seeds_note.startswith("nothing"):
        print(f"[validate] note: --sim-seeds {args.sim_seeds}: {seeds_note}", file=sys.stderr, flush=True)
    sim = simulate_runs(workload, sim_engine, model, args.sim_seeds, args.step_sigma, args.run_sigma,
                        async_scheduling, out, overhead, busy_extra)
    machines = [r.metadata.get("machine", {}) for r in live]
    context = {
        "scenario": name,
        "pace": pace.to_dict() if pace is not None else None,
        "workload": {"requests": len(workload), "duration_s": workload.duration_s,
                     "output_tokens": int(workload.output_tokens.sum()),
                     **({"source": workload_source} if workload_source else {})},
        "engine": engine.to_dict(),
        "live_runs": len(live),
        "sim_runs": len(sim),
        "profile": str(profile_dir),
        "performance_model": model.describe(),
        "step_gap_s": offsets.per_step,
        "step_gap_per_request_s": offsets.per_request,
        "step_gap_per_context_token_s": offsets.per_context_token,
        "step_gap_source": offsets.source,
        "prefill_offset_per_token_s": per_prefill_token,
        "prefill_offset_source": prefill_source,
        "request_overhead_s": overhead,
        "request_overhead_source": overhead_source,
        "busy_overhead_s": busy_extra,
        "busy_overhead_source": busy_source,
        "jitter": {"step_sigma": args.step_sigma, "run_sigma": args.run_sigma},
        "sim_seeds_draw": seeds_note,
        "async_scheduling": async_scheduling,
        "speculation": ({**dataclasses.asdict(sim_engine.speculative), "source": spec_source}
                        if spec_source else None),
        "machine": [{"load_avg": m.get("before", {}).get("load_avg"),
                     "others_cpu_during": m.get("during", {}).get("others_cpu_mean",
                                                                  m.get("before", {}).get("others_cpu")),
                     "steal_cpu_during": m.get("during", {}).get("steal_cpu_mean"),
                     "quiet": m.get("during", m.get("before", {})).get("quiet")} for m in machines],
        "tolerances": args.tolerances,
        "live_problems": problems,
        "wall_s": round(time.time() - started, 1),
    }
    if any(m.get("quiet") is False for m in context["machine"]):
        context["notes"] = "other processes were busy during some live runs: live timings are noisy"
    report = validate.build_report(live, sim, TOLERANCE_SETS[args.tolerances], context)
    paths = validate.write_report(report, live, sim, out, title=f"Validation: {name}")
    print(validate.metrics_markdown(report.rows))
    print(f"\nreport: {paths['markdown']}")
    (out / "validation.json").write_text(json.dumps(
        {"argv": argv, "passed": report.passed, "pid": os.getpid()}, indent=2))
    if problems:
        print("error: live: " + "; ".join(problems), file=sys.stderr)
        return 3
    if args.tolerances != "none" and not report.passed:
        failed = ", ".join(f"{r.label} ({validate._fmt_error(r)})" for r in report.failures())
        print(f"error: validation failed: {failed}", file=sys.stderr)
        return 1
    return 0
