"""The profiler's serving phase: what `vllm serve` adds to the profiled engine steps.

After the grid, the in-process engine is closed and the same model is served by
``vllm serve`` (``python -m vllm.entrypoints.openai.api_server``) on loopback
with the profiled engine's settings. The live runner's probes then run
``repeats`` times on each of ``servers`` fresh servers: isolated short and long
requests (per-request time outside the steps, and per prefill token), new
prompt lengths sent twice (the per-token-count kernel set-up: cold minus warm), known
decode batches before and after (per step, per request, per KV token) and lone
requests during a decode batch (a busy server). Then a served load: bursty
arrivals of requests of mixed lengths (``served_load``), replayed by the live
runner, whose requests' times set the step scale. The raw rounds and loads go into
``profile.json["serving"]``; ``calibration.serving`` turns them into overhead
terms against the fit, so ``perf=profile`` simulates a server, not a bare engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from profiler.settings import ServingSettings
from simulator.records.engine_config import SPECULATIVE_METHODS, EngineConfig, SpeculativeConfig

#: environment the in-process profiler sets that a server must not inherit
PROFILER_ONLY_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS")
GIB = 1024**3


def server_engine(resolved: dict[str, Any], kv: dict[str, Any]) -> EngineConfig:
    """The simulator-side EngineConfig of the profiled engine (the server gets the same flags)."""
    return EngineConfig(
        block_size=int(kv["block_size"]),
        max_num_seqs=int(resolved["max_num_seqs"]),
        max_num_batched_tokens=int(resolved["max_num_batched_tokens"]),
        max_model_len=int(resolved["max_model_len"]),
        enable_prefix_caching=bool(resolved.get("enable_prefix_caching", True)),
        enable_chunked_prefill=bool(resolved.get("enable_chunked_prefill", True)),
        long_prefill_token_threshold=int(resolved.get("long_prefill_token_threshold") or 0),
        gpu_memory_utilization=float(resolved.get("gpu_memory_utilization") or 0.9),
        num_gpu_blocks_override=resolved.get("num_gpu_blocks_override"),
        kv_cache_dtype=str(resolved.get("kv_cache_dtype") or "auto"),
    )


def served_speculation(engine_args: dict[str, Any]) -> SpeculativeConfig | None:
    """The drafting the server runs (an optimization's ``speculative_config``) as the simulator
    models it, so that its served loads read the spec-decode counters (``load_speculation``);
    its acceptance is left at 0 until they measure it. None without drafting, or for a drafter
    the simulator does not model (SPECULATIVE_METHODS)."""
    config = engine_args.get("speculative_config")
    if not isinstance(config, dict) or config.get("method") not in SPECULATIVE_METHODS \
            or not int(config.get("num_speculative_tokens") or 0):
        return None
    return SpeculativeConfig(method=str(config["method"]), num_speculative_tokens=int(config["num_speculative_tokens"]),
                             acceptance_rate=(0.0,))


def cli_flags(engine_args: dict[str, Any]) -> tuple[str, ...]:
    """vllm.LLM keyword arguments (an optimization's) as `vllm serve` flags."""
    import json

    flags: list[str] = []
    for key, value in engine_args.items():
        if key in ("kv_cache_dtype",):
            continue  # EngineConfig carries it (server.engine_flags)
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        elif value is not None:
            flags += [flag, str(value)]
    return tuple(flags)


@contextlib.contextmanager
def server_environment(cpus: list[int]) -> Iterator[None]:
    """While serving: every CPU the profiler was given and none of its in-process settings
    (the server runs its engine core and worker in processes of their own, as deployed)."""
    saved = {k: os.environ.get(k) for k in PROFILER_ONLY_ENV}
    affinity = os.sched_getaffinity(0)
    for key in PROFILER_ONLY_ENV:
        os.environ.pop(key, None)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, affinity)
        for key, value in saved.items():
            if value is not None:
                os.environ[key] = value


async def _rounds(url: str, repeats: int, budget: int, shape_probes: bool = True) -> list[dict[str, Any]]:
    """Warm up (short requests and one round of decode batches: a fresh server's first steps are
    slow), then ``repeats`` rounds of the live runner's probes (the shape probes where
    ``shape_probes``): their raw windows."""
    from profiler.live import client as live_client
    from profiler.live import runner

    out = []
    async with live_client.http_client(120.0) as client:
        model = await live_client.served_model(client, url)
        await runner._warm_up(client, url, model, 2)
        await runner._wait_idle(client, url, 60.0)
        lengths = [runner.PROBE_PROMPT_TOKENS] * 5 + [runner.PREFILL_PROBE_TOKENS] * 3
        kv_tokens = await runner._kv_capacity_tokens(client, url)
        await runner._probe_decode_steps(client, url, model, kv_tokens)  # warm-up round, not kept
        await runner._wait_idle(client, url, 60.0)
        for round_no in range(repeats):
            isolated = await runner._probe_isolated_requests(client, url, model, lengths)
            shapes = []
            if shape_probes:
                shapes = await runner._probe_isolated_requests(client, url, model,
                                                               runner.shape_probe_lengths(round_no, budget))
            kv_tokens = await runner._kv_capacity_tokens(client, url)
            decode = await runner._probe_decode_steps(client, url, model, kv_tokens)
            loaded = await runner._probe_loaded_ttft(client, url, model, kv_tokens)
            await runner._wait_idle(client, url, 60.0)
            decode_after = await runner._probe_decode_steps(client, url, model, kv_tokens)
            await runner._wait_idle(client, url, 60.0)
            out.append({"isolated": isolated, "shapes": shapes, "decode": decode, "loaded": loaded,
                        "decode_after": decode_after})
    return out


def probe_set(raw: dict[str, Any], collector) -> dict[str, Any]:
    """One round's raw windows matched with the iteration log: a probe set (calibration.serving)."""
    from profiler.live import runner
    from profiler.live.iteration_log import inter_step_gap, steps_table

    start = min([p["send"] for p in raw["isolated"]] or [0.0])
    gap = inter_step_gap(steps_table(collector.between(start, time.monotonic()), start)) or 0.0
    return {
        "request_overhead_s": runner.request_overhead(raw["isolated"], collector, gap),
        "prefill_probe": runner.prefill_probe_result(raw["isolated"], collector),
        "shape_probe": runner.shape_probe_result(raw.get("shapes") or [], collector),
        "decode_probe": runner.decode_probe_result(raw["decode"], collector),
        "decode_probe_after": runner.decode_probe_result(raw["decode_after"], collector),
        "loaded_probe": [raw["loaded"]] if raw["loaded"] else [],
        "inter_step_gap_s": gap,
    }


#: the served load: requests running at once it aims at (from the decode probes' step time), the
#: arrivals' coefficient of variation (bursty, as deployed traffic), its prompt and output lengths
LOAD_CONCURRENCY = 8
LOAD_CV = 2.0
LOAD_PROMPTS = (32, 768)
LOAD_MEAN_OUTPUT = 192
#: the iteration-log columns a served load keeps per step
LOAD_STEP_COLUMNS = ("ctx_requests", "ctx_tokens", "gen_requests", "gen_tokens", "elapsed_s", "kv_usage")


def load_step_s(probe_sets: list[dict[str, Any]]) -> float | None:
    """The server's decode step (wall, per step) at the probed batch nearest LOAD_CONCURRENCY
    (median over the probe sets), or None without decode probes."""
    walls: dict[int, list[float]] = {}
    for probes in probe_sets:
        for probe in (probes.get("decode_probe") or []) + (probes.get("decode_probe_after") or []):
            walls.setdefault(int(probe["batch"]), []).append(float(probe["wall_per_step_s"]))
    if not walls:
        return None
    batch = min(walls, key=lambda b: (abs(b - LOAD_CONCURRENCY), b))
    return float(sorted(walls[batch])[len(walls[batch]) // 2])


def served_load(requests: int, step_s: float, engine: EngineConfig, seed: int):
    """A bursty load for one server: Gamma arrivals (CV LOAD_CV) at the rate that keeps about
    LOAD_CONCURRENCY requests decoding with steps of ``step_s``, prompts uniform in
    LOAD_PROMPTS, outputs log-normal around LOAD_MEAN_OUTPUT, all within max_model_len."""
    import numpy as np

    from simulator.records.workload import Workload
    from simulator.workload.arrivals import gamma_arrivals

    rng = np.random.default_rng([seed, 21])
    high = min(LOAD_PROMPTS[1], engine.max_num_batched_tokens, engine.max_model_len // 2)
    prompts = rng.integers(min(LOAD_PROMPTS[0], high), high + 1, size=requests)
    outputs = np.rint(rng.lognormal(math.log(LOAD_MEAN_OUTPUT) - 0.32, 0.8, size=requests)).astype(np.int64)
    outputs = np.clip(outputs, 16, np.maximum(engine.max_model_len - prompts - 1, 16))
    rate = LOAD_CONCURRENCY / (float(outputs.mean()) * step_s)
    arrivals = gamma_arrivals(rng, rate, LOAD_CV, requests)
    return Workload(arrival_s=arrivals, prompt_tokens=prompts, output_tokens=outputs,
                    reasoning_tokens=np.zeros(requests, np.int64), domain=np.full(requests, "load", object),
                    name="serving-load", seed=seed), rate


def run_served_load(server, collector, requests: int, probe_sets: list[dict[str, Any]], engine: EngineConfig,
                    out: Path, seed: int, speculative: SpeculativeConfig | None = None) -> dict[str, Any] | None:
    """Replay ``served_load`` on a running server (the live runner, no probes of its own): its
    requests as the calibration needs them, or None without decode probes to set its rate.
    ``speculative``: the server drafts; the load keeps the acceptance its counters measured."""
    import pandas as pd

    from profiler.live.runner import LiveRunConfig, run_live

    step_s = load_step_s(probe_sets)
    if step_s is None or requests == 0:
        return None
    workload, rate = served_load(requests, step_s, engine, seed)
    print(f"[profiler] serving phase: a served load of {requests} requests at {rate:.2f}/s", file=sys.stderr,
          flush=True)
    config = LiveRunConfig(overhead_probes=0, warmup_requests=0, token_seed=seed, lead_s=0.5, settle_s=0.5)
    counted = dataclasses.replace(engine, speculative=speculative) if speculative else engine
    outcome = run_live(workload, out, server=server, collector=collector, config=config, progress=False,
                       engine=counted)
    record = load_record(workload.arrival_s, workload.prompt_tokens, workload.output_tokens,
                         outcome.result.requests["status"], pd.read_parquet(out / "steps.parquet"),
                         outcome.result.summary)
    live = outcome.result.requests
    return {**record, "ttft_s": [float(x) for x in live["ttft_s"]], "e2e_s": [float(x) for x in live["e2e_s"]],
            "rate": rate, "cv": LOAD_CV, "seed": seed, "decode_step_s": step_s, "exit_code": outcome.exit_code,
            "speculative": load_speculation(outcome.result.summary, workload, speculative)}


def load_speculation(summary: dict[str, Any], workload, speculative: SpeculativeConfig | None
                     ) -> dict[str, Any] | None:
    """The drafting a load met, from its run's spec-decode counters (``summary.spec_decode``) as
    the simulator's ``engine.speculative``: acceptance per draft position given the earlier ones
    and the share of decode steps that drafted. None without drafting or counters per position."""
    from profiler.live.spec_counters import SpecCounters

    counters = summary.get("spec_decode") or {}
    drafts, accepted = counters.get("drafts"), counters.get("accepted_tokens")
    per_position = counters.get("accepted_per_pos") or []
    if speculative is None or not drafts or accepted is None \
            or len(per_position) != speculative.num_speculative_tokens:
        return None
    measured = SpecCounters(int(drafts), int(counters.get("draft_tokens") or 0), int(accepted),
                            [int(a) for a in per_position])
    return {"method": speculative.method, "num_speculative_tokens": speculative.num_speculative_tokens,
            "acceptance_rate": [round(a, 6) for a in measured.acceptance_given_previous()],
            "proposal_rate": round(measured.proposal_rate(int(workload.output_tokens.sum()), len(workload)), 6)}


def load_record(arrival_s, prompt_tokens, output_tokens, status, steps, summary: dict[str, Any]) -> dict[str, Any]:
    """A served load as the calibration reads it (``calibration.load_steps``): its requests in
    arrival order (``status``: each one's live status), the server's own log of every step
    (``steps``: a live run's steps table, LOAD_STEP_COLUMNS kept) and, from the run's summary,
    the gap between steps and the KV cache's size."""
    kv = summary.get("kv_cache") or {}
    return {
        "arrival_s": [float(x) for x in arrival_s],
        "prompt_tokens": [int(x) for x in prompt_tokens],
        "output_tokens": [int(x) for x in output_tokens],
        "completed": [bool(x == "completed") for x in status],
        "steps": {c: [round(float(x), 7) if c in ("elapsed_s", "kv_usage") else int(x) for x in steps[c]]
                  for c in LOAD_STEP_COLUMNS},
        "inter_step_gap_s": (summary.get("live") or {}).get("inter_step_gap_s"),
        "num_blocks": kv.get("num_blocks"), "block_size": kv.get("block_size"),
    }


def load_of_run(run: Path) -> dict[str, Any]:
    """A live run's directory (``profiler.live``: requests, steps and summary) as a served load."""
    import json

    import pandas as pd

    requests = pd.read_parquet(run / "requests.parquet")
    return load_record(requests["scheduled_arrival_s"], requests["prompt_tokens"], requests["output_tokens"],
                       requests["status"], pd.read_parquet(run / "steps.parquet"),
                       json.loads((run / "summary.json").read_text()))


def measure_serving(model: str, engine: EngineConfig, kv_bytes: int, settings: ServingSettings, cpus: list[int],
                    log_dir: Path, seed: int = 0, extra_args: tuple[str, ...] = (),
                    speculative: SpeculativeConfig | None = None, shape_probes: bool = True) -> dict[str, Any]:
    """Probe ``settings.servers`` fresh servers ``settings.repeats`` times each; the serving section.
    ``speculative``: the drafting ``extra_args`` give the server (``served_speculation``);
    ``shape_probes`` False: no shape probes (an engine without per-shape set-up: the profile's
    ``engine.linear_dispatch``)."""
    from profiler.live.machine import CpuWatch
    from profiler.live.runner import IterationCollector, async_scheduling_of, vllm_version_of
    from profiler.live.server import ServerSpec, VllmServer, descendants

    spec = ServerSpec(model=str(model), engine=engine, kv_cache_space_gib=max(1, math.ceil(kv_bytes / GIB)),
                      seed=seed, extra_args=extra_args, pin_frontend=settings.pin_frontend)
    probes: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    async_flags: set[bool] = set()
    command: list[str] = []
    version = None
    machine: list[dict[str, Any]] = []  # other processes' CPU while each server was probed
    started = time.time()
    with server_environment(cpus):
        for i in range(settings.servers):
            collector = IterationCollector()
            server = VllmServer(spec, log_dir / f"server-{i}.log", on_line=collector.feed)
            print(f"[profiler] serving phase: starting vllm serve {i + 1}/{settings.servers} on loopback",
                  file=sys.stderr, flush=True)
            with server:
                watch = CpuWatch()
                rounds = asyncio.run(_rounds(server.url, settings.repeats, engine.max_num_batched_tokens,
                                             shape_probes))
                pids = {server.process.pid} | {p for p, _ in descendants(server.process.pid)}
                machine.append(watch.stop(exclude=pids))
                time.sleep(0.3)  # the last iteration-log lines
                sets = [probe_set(raw, collector) for raw in rounds]
                probes += sets
                load = run_served_load(server, collector, settings.load_requests, sets, engine,
                                       log_dir / f"load-{i}", seed + 1000 + i, speculative)
                if load is not None:
                    loads.append(load)
                log_text = server.log_path.read_text(errors="replace")
                async_flags.add(async_scheduling_of(log_text, server.command))
                command, version = server.command, vllm_version_of(log_text)
    busy = [m for m in machine if not m.get("quiet", True)]
    if busy:
        print(f"[profiler] warning: other processes used {max(m['others_cpu_mean'] for m in busy):.1f} cores "
              "while the server was probed: its overheads are noisy (profile on a quiet machine)",
              file=sys.stderr)
    return {
        "probes": probes,
        "loads": loads,
        "machine": machine,
        "servers": settings.servers,
        "repeats": settings.repeats,
        "shape_probes": shape_probes,
        "async_scheduling": async_flags.pop() if len(async_flags) == 1 else None,
        "engine": engine.to_dict(),
        "kv_cache_space_gib": spec.kv_cache_space_gib,
        "pin_frontend": spec.pin_frontend,
        "server_command": ["<model>" if c == str(model) else c for c in command[2:]],
        "vllm_version": version,
        "duration_s": round(time.time() - started, 1),
        "source": "profiler serving phase: probes on `vllm serve` over loopback (profiler/serving.py)",
    }
