"""``python -m profiler.live``: replay a workload on a real vLLM server, or import bench results.

Run (starts a vLLM server on 127.0.0.1 from the engine env, replays, stops it)::

    python -m profiler.live run --workload outputs/.../workload.parquet --model tiny-llama \\
        -e block_size=32 -e num_gpu_blocks_override=64 -e max_model_len=1024 --out runs/live-1

    python -m profiler.live run --workload gamma -w rate=4 -w cv=2 -w num_requests=60 ...
    python -m profiler.live run ... --runs 3            # 3 runs back to back on one server
    python -m profiler.live run ... --runs 3 --fresh-server
    python -m profiler.live run ... --url http://127.0.0.1:8000 --server-log server.log

Import the results of ``vllm bench serve --save-result --save-detailed``::

    python -m profiler.live import-bench result.json --out runs/bench-1

``--workload`` takes a Parquet file written by Workload.save (every simulator
run dir has ``workload.parquet``) or the name of a workload config in
conf/workload/ with ``-w key=value`` overrides. The engine settings
(``--engine`` NAME in conf/engine/ or a YAML file, plus ``-e key=value``) are
EngineConfig fields, turned into vLLM flags so that the simulator can be run
with the very same config. Without ``--engine`` it uses vLLM 0.32's CPU
server defaults (block 128, 128 sequences, 2048 batched tokens). Exit codes:
0 ok, 1 some requests failed, 2 bad input, 3 the server died, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from profiler.field_types import check_values
from profiler.live.loopback import check_loopback_url
from profiler.live.server import ServerError
from profiler.location import writable_directory
from simulator.cli_errors import OneLineParser
from simulator.records.engine_config import EngineConfig, parse_key_values
from simulator.records.errors import ConfigError
from simulator.records.workload import Workload

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"

#: vLLM 0.32's defaults for the OpenAI server on CPU (vllm/engine/arg_utils.py, platforms/cpu.py)
CPU_SERVER_ENGINE = {"block_size": 128, "max_num_seqs": 128, "max_num_batched_tokens": 2048,
                     "max_model_len": 4096}


def load_engine(name: str | None, overrides: list[str]) -> EngineConfig:
    """EngineConfig from conf/engine/NAME.yaml or a YAML file (else CPU server defaults) + overrides."""
    data: dict = {}
    if name:
        path = Path(name)
        if not path.exists():
            path = CONF_DIR / "engine" / f"{name}.yaml"
        if not path.exists():
            options = sorted(p.stem for p in (CONF_DIR / "engine").glob("*.yaml"))
            raise ConfigError("engine", f"unknown engine {name!r}; allowed: {', '.join(options)} "
                                        "or a YAML file")
        data = yaml.safe_load(path.read_text()) or {}
    else:
        data = dict(CPU_SERVER_ENGINE)
    data.update(parse_key_values(overrides, "engine"))
    check_values(EngineConfig, data, "engine.")
    return EngineConfig.from_dict(data)


def load_workload(name: str, overrides: list[str]) -> Workload:
    """A Workload from a Parquet file, or from conf/workload/NAME.yaml via the workload builder."""
    path = Path(name)
    if path.suffix == ".parquet" or path.exists():
        if overrides:
            raise ConfigError("workload", "-w overrides apply to workload configs, not to files")
        return Workload.load(path)
    config_path = CONF_DIR / "workload" / f"{name}.yaml"
    if not config_path.exists():
        options = sorted(p.stem for p in (CONF_DIR / "workload").glob("*.yaml"))
        raise ConfigError("workload", f"{name!r} is neither a file nor a workload config; "
                                      f"allowed: {', '.join(options)}")
    from simulator.workload.builder import build_workload

    cfg = yaml.safe_load(config_path.read_text()) or {}
    cfg.update(parse_key_values(overrides, "workload"))
    return build_workload(cfg)


def _run(args) -> int:
    from profiler.live.runner import LiveRunConfig, run_live, run_series, summary_line
    from profiler.live.server import ServerSpec, resolve_model
    from simulator.records.metrics import SLO

    if args.url:
        check_loopback_url(args.url)
    workload = load_workload(args.workload, args.w)
    engine = load_engine(args.engine, args.e)
    config = LiveRunConfig(request_timeout_s=args.timeout, scrape_interval_s=args.scrape_interval,
                           token_seed=args.token_seed, warmup_requests=args.warmup,
                           overhead_probes=args.probes,
                           slo=SLO.from_dict(parse_key_values(args.slo, "slo")))
    out = writable_directory(Path(args.out), "--out")
    progress = not args.no_progress
    if args.url:
        if args.runs != 1:
            raise ConfigError("runs", "with --url, run once per call")
        outcomes = [run_live(workload, out, url=args.url, server_log=args.server_log, engine=engine,
                             config=config, progress=progress)]
    else:
        spec = ServerSpec(model=resolve_model(args.model), engine=engine, port=args.port,
                          kv_cache_space_gib=args.kv_cache_space_gib,
                          enforce_eager=not args.compile, seed=args.seed)
        if args.runs == 1:
            outcomes = [run_live(workload, out, spec=spec, config=config, progress=progress)]
        else:
            outcomes = run_series(workload, out, args.runs, spec, fresh_server=args.fresh_server,
                                  config=config, progress=progress)
    worst = 0
    for outcome in outcomes:
        print(f"{outcome.out_dir}: {summary_line(outcome.result)}")
        if outcome.exit_code:
            print(f"error: {outcome.message}", file=sys.stderr)
        worst = max(worst, outcome.exit_code)
    return worst


def _import_bench(args) -> int:
    from profiler.live.bench_import import read_bench_result
    from profiler.live.runner import summary_line
    from simulator.records.metrics import SLO

    result, workload = read_bench_result(args.result, slo=SLO.from_dict(parse_key_values(args.slo, "slo")))
    out = writable_directory(Path(args.out), "--out")
    result.write(out)
    workload.save(out / "workload.parquet")
    print(f"{out}: {summary_line(result)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m profiler.live", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="replay a workload on a live vLLM server")
    run.add_argument("--workload", required=True, help="workload.parquet or a conf/workload name")
    run.add_argument("-w", action="append", default=[], metavar="KEY=VALUE", help="workload override")
    run.add_argument("--engine", help="conf/engine name or YAML file (default: vLLM CPU server defaults)")
    run.add_argument("-e", action="append", default=[], metavar="KEY=VALUE", help="engine override")
    run.add_argument("--model", default="tiny-llama", help="local model folder or tiny-llama")
    run.add_argument("--url", help="attach to a running server on 127.0.0.1 instead of starting one")
    run.add_argument("--server-log", help="with --url: the server's log file, to follow its iteration log")
    run.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    run.add_argument("--kv-cache-space-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    run.add_argument("--compile", action="store_true", help="let vLLM compile (default: --enforce-eager)")
    run.add_argument("--seed", type=int, default=0, help="server seed")
    run.add_argument("--token-seed", type=int, default=0, help="seed of the prompt token ids")
    run.add_argument("--runs", type=int, default=1, help="replay this many times")
    run.add_argument("--fresh-server", action="store_true", help="a new server for every run")
    run.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    run.add_argument("--scrape-interval", type=float, default=0.5, help="/metrics period (s)")
    run.add_argument("--warmup", type=int, default=2, help="warm-up requests before the run")
    run.add_argument("--probes", type=int, default=5,
                     help="isolated probe requests measuring the per-request server overhead")
    run.add_argument("--slo", action="append", default=[], metavar="KEY=VALUE", help="SLO limit")
    run.add_argument("--out", required=True, help="run directory")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=_run)
    bench = sub.add_parser("import-bench", help="read `vllm bench serve --save-detailed` JSON")
    bench.add_argument("result", help="the JSON file vllm bench serve saved")
    bench.add_argument("--slo", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument("--out", required=True, help="run directory to write")
    bench.set_defaults(func=_import_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "runs", 1) < 1:
        print("error: runs: must be >= 1", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ServerError as err:
        print(f"error: server: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("error: interrupted before the run started; nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
