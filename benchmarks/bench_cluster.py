"""Cluster benchmark (not a test): a cluster's CPU time against its replicas' single-replica times.

    python benchmarks/bench_cluster.py                          # 4 replicas, 4,000 gamma requests
    python benchmarks/bench_cluster.py --replicas 8 --requests 8000 --routers least_outstanding
    python benchmarks/bench_cluster.py --routers least_kv --repeats 9   # medians of nine alternated rounds

For each router, the cluster is simulated (simulator.cluster; its default path, which the ``path``
column names: the compiled cluster, or the Python one on one SimPy clock); then each replica's
requests (as that router sent them) are simulated alone with ``simulator.engine.loop.simulate``. It
prints the cluster's CPU time, the sum of the single-replica CPU times and their ratio (the
target: at most 2x), and the runs of steps the fast path applied in each (counts the load does
not move), and a sha256 of the merged tables (equal: bit-identical). CPU time (this process's), not wall
time: the 2-core machine is shared; medians of `--repeats` rounds (default 3), the routers interleaved.
``--python-too`` also times each cluster on the Python path (``compiled=False``) in the same
rounds, with its ratio, and says how its tables agree with the default path's (``agreement``).
The first cluster of the process also loads the compiled engine from numba's cache (~0.6 s; the
medians leave that round out in effect). ``--disaggregated`` adds colocated replicas against every prefill/decode split of them (TTFT,
TPOT, E2E, SLO attainment). Overrides (``--set workload.rate=40``) go to the simulator's config.
``--instructions`` adds each router's ratio in instructions executed (valgrind's cachegrind, no
cache simulation; ~3 minutes a router): deterministic where CPU time on a shared VM is not, so it
ranks changes of a few percent, though it runs below the CPU-time ratio (the cluster's code runs
at fewer instructions per cycle).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--routers", nargs="+", default=["round_robin", "least_outstanding", "prefix_affinity"])
    parser.add_argument("--disaggregated", action="store_true",
                        help="also compare colocated replicas with prefill/decode splits of them")
    parser.add_argument("--staleness", type=float, default=0.0, help="cluster.staleness_s")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds per router (CPU times vary by 20%% on a shared 2-core VM): medians")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. workload.rate=40")
    parser.add_argument("--python-too", action="store_true",
                        help="also time each cluster on the Python path (compiled=false): its CPU time, its ratio "
                             "and whether its tables equal the default path's")
    parser.add_argument("--instructions", action="store_true",
                        help="also the ratio in instructions executed, under valgrind (deterministic)")
    parser.add_argument("--phase", choices=["startup", "cluster", "alone"], help=argparse.SUPPRESS)
    parser.add_argument("--router", help=argparse.SUPPRESS)
    parser.add_argument("--assignment", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.exit(2, f"error: --repeats: must be an integer >= 1, got {args.repeats}\n")
    if args.instructions and shutil.which("valgrind") is None:
        parser.exit(2, "error: --instructions: needs valgrind on the PATH (apt install valgrind)\n")

    from hydra import compose, initialize_config_dir

    from simulator.cluster import ClusterSpec, simulate_cluster
    from simulator.configure import CONF_DIR, build_run
    from simulator.engine.loop import simulate
    from simulator.huge_pages import avoid_huge_pages

    avoid_huge_pages()  # as `python -m simulator` does (simulator/huge_pages.py)

    overrides = [f"workload.num_requests={args.requests}", *args.set]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    spec = build_run(cfg, overrides)
    if args.phase is not None:  # one side alone, for --instructions (run under valgrind)
        return run_phase(args, spec)
    print(f"{len(spec.workload)} requests of {spec.workload.name}, {args.replicas} replicas, staleness {args.staleness} s, "
          f"{spec.model.name} on {spec.hardware.name}")
    from simulator.engine import fast_forward

    runs = [0]  # runs of steps applied (a count independent of the machine's load)
    apply_run = fast_forward.apply_run

    def counting(*a, **k):
        runs[0] += 1
        return apply_run(*a, **k)

    fast_forward.apply_run = counting
    print(f"{'router':<20}{'path':>9}{'cluster CPU s':>14}{'sum single CPU s':>18}{'ratio':>7}{'p99 TTFT s':>12}"
          f"{'runs':>7}{'alone':>7}  tables sha256" + (f"{'python CPU s':>14}{'ratio':>7}  same" if args.python_too
                                                       else ""))
    rounds: dict[str, list[tuple[float, float]]] = {router: [] for router in args.routers}
    python: dict[str, list[float]] = {router: [] for router in args.routers}
    same: dict[str, bool] = {}
    last: dict[str, tuple] = {}  # router -> (its last cluster result, its runs, its replicas' runs)
    for _ in range(args.repeats):  # the routers interleaved, so that a slow spell falls on all of them
        for router in args.routers:
            runs[0] = 0
            started = time.process_time()
            out = simulate_cluster(spec.workload, spec.engine, spec.perf,
                                   ClusterSpec(replicas=args.replicas, router=router, staleness_s=args.staleness),
                                   slo=spec.slo, seed=spec.seed)
            cluster_s = time.process_time() - started
            cluster_runs, runs[0] = runs[0], 0
            single_s = 0.0
            replica = out.result.requests["replica"]
            for index in range(args.replicas):
                ids = out.result.requests["request_id"][replica == index]
                started = time.process_time()
                simulate(spec.workload.select(ids), spec.engine, spec.perf, slo=spec.slo, seed=spec.seed + index)
                single_s += time.process_time() - started
            rounds[router].append((cluster_s, single_s))
            last[router] = (out, cluster_runs, runs[0])
            if args.python_too:
                started = time.process_time()
                slow = simulate_cluster(spec.workload, spec.engine, spec.perf,
                                        ClusterSpec(replicas=args.replicas, router=router, staleness_s=args.staleness),
                                        slo=spec.slo, seed=spec.seed, compiled=False)
                python[router].append(time.process_time() - started)
                same[router] = agreement(slow.result, out.result)
    for router in args.routers:
        out, cluster_runs, alone_runs = last[router]
        cluster_s, single_s = (float(np.median(x)) for x in zip(*rounds[router], strict=True))
        ratio = float(np.median([c / s for c, s in rounds[router]]))
        ttft = out.result.summary["ttft_s"]["p99"]
        line = (f"{router:<20}{out.engine_path:>9}{cluster_s:>14.2f}{single_s:>18.2f}{ratio:>7.2f}{ttft:>12.3f}"
                f"{cluster_runs:>7}{alone_runs:>7}  {tables_digest(out.result)}")
        if args.python_too:
            py_ratio = float(np.median([p / s for p, (_, s) in zip(python[router], rounds[router], strict=True)]))
            line += f"{float(np.median(python[router])):>14.2f}{py_ratio:>7.2f}  {same[router]}"
        print(line)
    if args.repeats > 1:
        print(f"(medians of {args.repeats} rounds, the routers interleaved, each the cluster then its replicas "
              "alone; ratio: the median of the rounds' ratios)")
    if args.instructions:
        print(f"\n{'router':<20}{'cluster instr.':>16}{'sum single instr.':>19}{'ratio':>7}")
        for router in args.routers:
            assignment = last[router][0].result.requests
            cluster, alone = instructions(args, router, assignment["request_id"], assignment["replica"])
            print(f"{router:<20}{cluster / 1e9:>15.2f}G{alone / 1e9:>18.2f}G{cluster / alone:>7.2f}")
        print("(instructions executed, valgrind --tool=cachegrind --cache-sim=no, interpreter start-up subtracted)")
    if args.disaggregated:
        disaggregation(spec, args.replicas)


def instructions(args, router: str, request_id: np.ndarray, replica: np.ndarray) -> tuple[int, int]:
    """Instructions the cluster and its replicas alone execute (each a process under valgrind,
    less one that only starts up), the replicas given the requests the cluster sent them."""
    with tempfile.TemporaryDirectory() as tmp:
        assignment = Path(tmp) / "assignment.npz"
        np.savez(assignment, request_id=request_id, replica=replica)
        common = [sys.executable, str(Path(__file__).resolve()), "--replicas", str(args.replicas),
                  "--requests", str(args.requests), "--staleness", str(args.staleness), "--router", router,
                  "--assignment", str(assignment), "--set", *args.set]
        counts = {}
        for phase in ("startup", "cluster", "alone"):
            proc = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                                   *common, "--phase", phase], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONHASHSEED": "0"})
            found = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
            if proc.returncode != 0 or found is None:
                sys.exit(f"error: --instructions: the {phase} run under valgrind failed: {proc.stderr[-500:]}")
            counts[phase] = int(found.group(1).replace(",", ""))
    return counts["cluster"] - counts["startup"], counts["alone"] - counts["startup"]


def run_phase(args, spec) -> None:
    """One side of the comparison, for ``instructions``: nothing (start-up), the cluster, or its
    replicas alone (their requests from ``--assignment``)."""
    from simulator.cluster import ClusterSpec, simulate_cluster
    from simulator.engine.loop import simulate

    if args.phase == "cluster":
        simulate_cluster(spec.workload, spec.engine, spec.perf,
                         ClusterSpec(replicas=args.replicas, router=args.router, staleness_s=args.staleness),
                         slo=spec.slo, seed=spec.seed)
    elif args.phase == "alone":
        assignment = np.load(args.assignment)
        for index in range(args.replicas):
            ids = assignment["request_id"][assignment["replica"] == index]
            simulate(spec.workload.select(ids), spec.engine, spec.perf, slo=spec.slo, seed=spec.seed + index)


def agreement(a, b) -> str:
    """How two runs' tables agree: "bit for bit", "1e-9" (every float within a relative 1e-9 and
    every other column equal: the Python cluster's fast path against the step-by-step path, which
    the compiled cluster equals bit for bit) or "NO"."""
    if tables_digest(a) == tables_digest(b):
        return "bit for bit"
    for table in ("requests", "timeline"):
        x, y = getattr(a, table), getattr(b, table)
        if list(x) != list(y):
            return "NO"
        for name in x:
            u, v = np.asarray(x[name]), np.asarray(y[name])
            if u.shape != v.shape:
                return "NO"
            if u.dtype.kind == "f":
                if not np.allclose(u, v, rtol=1e-9, atol=1e-9, equal_nan=True):
                    return "NO"
            elif not np.array_equal(u, v):
                return "NO"
    return "1e-9"


def tables_digest(result) -> str:
    """The first 16 hex digits of a sha256 over every column of the merged requests and timeline
    tables (names, dtypes, bytes): equal digests, bit-identical tables."""
    digest = hashlib.sha256()
    for table in (result.requests, result.timeline):
        for name in sorted(table):
            values = np.asarray(table[name])
            digest.update(name.encode() + str(values.dtype).encode())
            digest.update(repr(values.tolist()).encode() if values.dtype.kind == "O"
                          else np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()[:16]


def disaggregation(spec, replicas: int) -> None:
    """Colocated replicas against prefill/decode splits of the same GPUs (least outstanding)."""
    from simulator.cluster import ClusterSpec, simulate_cluster

    print(f"\n{'layout':<16}{'TTFT p50':>9}{'p99':>8}{'TPOT p50 ms':>12}{'p99':>7}{'E2E p99':>9}{'SLO met':>8}{'CPU s':>7}")
    layouts = [ClusterSpec(replicas=replicas, router="least_outstanding")]
    layouts += [ClusterSpec(prefill_replicas=p, decode_replicas=replicas - p, router="least_outstanding")
                for p in range(1, replicas)]
    for layout in layouts:
        started = time.process_time()
        s = simulate_cluster(spec.workload, spec.engine, spec.perf, layout, slo=spec.slo, seed=spec.seed,
                             link_gbps=spec.hardware.interconnect_gbps).result.summary
        name = (f"{layout.prefill_replicas}P+{layout.decode_replicas}D" if layout.disaggregated
                else f"{layout.replicas} colocated")
        print(f"{name:<16}{s['ttft_s']['p50']:>9.3f}{s['ttft_s']['p99']:>8.3f}{s['tpot_s']['p50'] * 1e3:>12.1f}"
              f"{s['tpot_s']['p99'] * 1e3:>7.1f}{s['e2e_s']['p99']:>9.1f}{s['goodput']['attainment']:>8.1%}"
              f"{time.process_time() - started:>7.1f}")


if __name__ == "__main__":
    main()
