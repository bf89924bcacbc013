"""Which PerformanceModel a (hardware, model, optimization, tp, perf) selection gets.

``perf.source`` picks where the step-time model comes from:

- ``aiconfigurator``: composed from the measured H100/H200/A100 kernel tables;
- ``llmservingsim``: LLMServingSim's vLLM layer profiles (RTX PRO 6000: Llama-3.1-8B, Qwen3-32B, Qwen3-30B-A3B);
- ``blis``: BLIS's fitted linear coefficients (H100/A100; a reference, never chosen by auto);
- ``roofline``: peak-FLOPs/bandwidth roofline, for any hardware, labelled uncalibrated;
- ``profile``: fitted from a profiler run (``perf.profile``), by ``calibration.fit``;
- ``kernels``: composed from tables the kernel profiler measured (``perf.tables``:
  the folder ``python -m profiler.kernels`` wrote), on the hardware they record;
- ``auto``: the best calibrated source there is for the hardware, in the order
  aiconfigurator, llmservingsim, then roofline (uncalibrated).

Layer profiles and BLIS rows were measured on specific checkpoints; a model
with the very same shapes (for example R1-Distill-Llama-8B and Llama-3.1-8B)
uses them too, and describe() says through which.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from calibration import blis, catalog, kernel_tables, llmservingsim
from calibration.memory import MemoryModel
from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError
from simulator.records.hardware import GIB, Hardware
from simulator.records.model_arch import ModelArchitecture, check_tp, dtype_bytes
from simulator.records.performance import MemoryBreakdown, PerformanceModel

#: sources whose models price a data-parallel mixture of experts' shared layers
DATA_PARALLEL_SOURCES = ("aiconfigurator", "kernels", "roofline", "llmservingsim")
SOURCES = ("auto", "aiconfigurator", "llmservingsim", "blis", "roofline", "profile", "kernels")
#: sources that need a file of the user's (perf.profile, perf.tables): not listed by ``calibration list``
USER_SOURCES = ("profile", "kernels")
TP_CHOICES = (1, 2, 4, 8)


@dataclass(frozen=True)
class SourceChoice:
    """What a selection resolves to, before anything is built."""

    source: str
    calibrated: bool
    built_from: str
    weight_dtype: str
    kv_dtype: str
    via_model: str = ""  # the shipped model whose measurements stand in for this one


def shape_key(arch: ModelArchitecture) -> tuple:
    """The numbers that set a model's cost: equal keys mean interchangeable measurements."""
    return (arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.num_key_value_heads,
            arch.head_dim, arch.intermediate_size, arch.vocab_size,
            # experts, latent attention, sliding windows (all 0 for a dense model)
            arch.num_experts, arch.num_experts_per_tok, arch.num_shared_experts, arch.moe_intermediate_size,
            arch.first_k_dense_replace, arch.kv_lora_rank, arch.sliding_window, arch.sliding_window_layers)


def equivalent_models(arch: ModelArchitecture) -> list[ModelArchitecture]:
    """Shipped models with the same shapes (the model itself first when it is shipped)."""
    key = shape_key(arch)
    out = [arch]
    for name in catalog.names("model"):
        other = catalog.load_model(name)
        if other.name != arch.name and shape_key(other) == key:
            out.append(other)
    return out


def _dtypes(arch: ModelArchitecture, optimization: Mapping, engine: Any) -> tuple[str, str]:
    weight = str(optimization.get("weight_dtype") or "auto")
    weight = (arch.weight_dtype or arch.dtype) if weight == "auto" else \
        {"bfloat16": "bf16", "float16": "fp16"}.get(weight, weight)
    if arch.weight_dtype and dtype_bytes(weight, "optimization.weight_dtype") > dtype_bytes(arch.weight_dtype):
        # a checkpoint shipped quantized (DeepSeek-R1: FP8) loads as shipped; bf16 is then vLLM's
        # --dtype, the activations' type
        weight = arch.weight_dtype
    kv = "auto"
    if engine is not None and getattr(engine, "kv_cache_dtype", "auto") not in (None, "auto"):
        kv = engine.kv_cache_dtype
    elif optimization.get("kv_cache_dtype") not in (None, "auto"):
        kv = str(optimization["kv_cache_dtype"])
    kv = arch.dtype if kv == "auto" else {"bfloat16": "bf16", "float16": "fp16"}.get(kv, kv)
    dtype_bytes(weight, "optimization.weight_dtype")
    dtype_bytes(kv, "optimization.kv_cache_dtype")
    return weight, kv


def _table_system(hardware: Hardware) -> str | None:
    system = hardware.kernel_tables
    return system if system and system in kernel_tables.available_systems() else None


def _llmservingsim_key(hardware: Hardware, arch: ModelArchitecture, tp: int):
    for candidate in equivalent_models(arch):
        hf = candidate.hf_name or candidate.name
        try:
            return llmservingsim.find_profile(hardware.name, hf, tp), candidate
        except ConfigError:
            continue
    return None, None


def _blis_row(hardware: Hardware, arch: ModelArchitecture, tp: int):
    for candidate in equivalent_models(arch):
        try:
            return blis.find_coefficients(hardware.name, candidate.name, tp), candidate
        except ConfigError:
            continue
    return None, None


def resolve_source(
    hardware: Hardware,
    arch: ModelArchitecture,
    optimization: Mapping,
    tp: int,
    perf: Mapping | None = None,
    engine: Any = None,
) -> SourceChoice:
    """Decide the source for a selection, or raise ConfigError saying why none fits."""
    perf = dict(perf or {})
    source = str(perf.get("source") or "auto")
    if source not in SOURCES:
        raise ConfigError("perf.source", f"unknown source {source!r}; allowed: {', '.join(SOURCES)}")
    check_tp(arch, tp)
    if tp > hardware.max_gpus_per_node:
        raise ConfigError("tp", f"tp={tp} exceeds the {hardware.max_gpus_per_node} GPUs of one {hardware.name} node")
    weight, kv = _dtypes(arch, optimization, engine)
    bf16_only = weight in ("bf16", "fp16")

    if source == "profile":
        return SourceChoice("profile", True, f"fitted profile {perf.get('profile')}", weight, kv)
    if source == "roofline":
        return SourceChoice("roofline", False, f"roofline from {hardware.name} specs (uncalibrated)", weight, kv)
    if source == "kernels":
        tables = _profiled_tables(perf, hardware)
        if ("bf16" if weight == "fp16" else weight) not in tables.gemm:
            raise ConfigError("optimization.weight_dtype", f"{weight} weights: the tables in {perf.get('tables')} "
                                                           f"measure {', '.join(tables.gemm_dtypes)} GEMMs only")
        return SourceChoice("kernels", True, tables.describe(), weight, kv)

    system = _table_system(hardware)
    if source in ("auto", "aiconfigurator") and system:
        tables = kernel_tables.load_tables(system)
        table_weight = "bf16" if weight == "fp16" else weight
        from calibration.weight_only import derivation

        derived = derivation(tables, hardware, table_weight)  # int4; fp8 where not measured
        if derived:
            return SourceChoice("aiconfigurator", True, f"{tables.describe()}; {derived}", weight, kv)
        if table_weight not in tables.gemm and table_weight == arch.weight_dtype:
            # the checkpoint ships in that dtype: its GEMMs are roofline (calibration.sparse), labelled
            return SourceChoice("aiconfigurator", True, f"{tables.describe()}; {weight} GEMMs roofline "
                                                        f"(not measured)", weight, kv)
        if table_weight not in tables.gemm:
            raise ConfigError(
                "optimization.weight_dtype",
                f"{weight} weights: {system} tables (vLLM {tables.version}) measure only "
                f"{', '.join(tables.gemm_dtypes)} GEMMs; use perf.source=roofline for an uncalibrated estimate",
            )
        return SourceChoice("aiconfigurator", True, tables.describe(), weight, kv)
    if source == "aiconfigurator":
        have = ", ".join(n for n in catalog.names("hardware") if _table_system(catalog.load_hardware(n)))
        raise ConfigError("perf.source", f"no aiconfigurator kernel tables for {hardware.name}; allowed hardware: {have}")

    if source in ("auto", "llmservingsim"):
        key, via = _llmservingsim_key(hardware, arch, tp)
        if key is not None and bf16_only:
            return SourceChoice("llmservingsim", True, key.describe(), weight, kv,
                                via_model="" if via.name == arch.name else via.name)
        if source == "llmservingsim":
            if key is not None:
                raise ConfigError("optimization.weight_dtype", f"LLMServingSim profiles are bf16; got {weight}")
            llmservingsim.find_profile(hardware.name, arch.hf_name or arch.name, tp)  # raises with the list

    if source == "blis":
        row, via = _blis_row(hardware, arch, tp)
        if row is None:
            blis.find_coefficients(hardware.name, arch.name, tp)  # raises with the list
        if not bf16_only:
            raise ConfigError("optimization.weight_dtype", f"BLIS rows used here are bf16 checkpoints; got {weight}")
        return SourceChoice("blis", True, f"BLIS coefficients {row.model} {row.gpu} tp{row.tp} vLLM "
                                          f"{row.vllm_version}", weight, kv,
                            via_model="" if via.name == arch.name else via.name)

    return SourceChoice("roofline", False, f"roofline from {hardware.name} specs (uncalibrated: no measured "
                                           f"tables for this hardware)", weight, kv)


def _profiled_tables(perf: Mapping, hardware: Hardware) -> kernel_tables.KernelTables:
    """The kernel profiler's tables named by ``perf.tables``, measured on ``hardware``."""
    folder = perf.get("tables")
    if not folder:
        raise ConfigError("perf.tables", "source=kernels needs perf.tables=<folder written by python -m "
                                         "profiler.kernels>")
    tables = kernel_tables.load_table_dir(str(folder))
    measured_on = tables.origin.get("hardware")
    if measured_on != hardware.name:
        raise ConfigError("hardware", f"{measured_on} (the tables in {folder} were measured on it), "
                                      f"got {hardware.name}")
    return tables


def _prefix_caching_cost(engine: Any) -> dict[str, Any]:
    """Host cost of prefix caching per scheduled token and per scheduled request under the
    engine's settings (vLLM's defaults, caching on with 16-token blocks, when none is given)."""
    from calibration.prefix_caching_cost import cache_s_per_request, hash_s_per_token

    if engine is None:
        return {"host_s_per_token": hash_s_per_token(16), "host_s_per_row": cache_s_per_request()}
    get = engine.get if isinstance(engine, Mapping) else lambda k, d=None: getattr(engine, k, d)
    on = bool(get("enable_prefix_caching", True))
    return {"host_s_per_token": hash_s_per_token(int(get("block_size", 16)), on),
            "host_s_per_row": cache_s_per_request(on)}


def _engine_limits(engine: EngineConfig | None) -> tuple[int, int, float, int | None, int | None]:
    """The engine settings memory depends on, from the typed EngineConfig (vLLM's defaults for None)."""
    if engine is None:  # no engine: its defaults, and no request length to check
        e = EngineConfig()
        return e.max_num_batched_tokens, e.max_num_seqs, e.gpu_memory_utilization, None, None
    return (engine.max_num_batched_tokens, engine.max_num_seqs, engine.gpu_memory_utilization,
            engine.max_model_len, engine.num_gpu_blocks_override)


def parallel_settings(arch: ModelArchitecture, engine: Any) -> dict[str, Any]:
    """A composed model's parallel layout from the engine's settings (vLLM's names).

    A mixture-of-experts model gets ``expert_parallel`` (--enable-expert-parallel) and
    ``data_parallel_size`` (--data-parallel-size: that many ranks run attention apart, weights
    replicated, and their MoE layers together, experts over dp x tp GPUs). A dense model gets
    nothing: its dp ranks are plain replicas, each GPU holding what one at dp 1 holds.
    """
    if not arch.is_moe or engine is None:
        return {}
    get = engine.get if isinstance(engine, Mapping) else lambda k, d=None: getattr(engine, k, d)
    return {"expert_parallel": bool(get("enable_expert_parallel", False)),
            "data_parallel_size": int(get("data_parallel_size", 1) or 1)}


def check_fits(mem: MemoryBreakdown, kv_bytes_per_token: int, hardware: Hardware, arch: ModelArchitecture,
               tp: int, util: float, max_model_len: int | None = None,
               override_blocks: int | None = None) -> None:
    """Raise ConfigError when the model, or one max_model_len request, does not fit (vLLM refuses both)."""
    if mem.kv_cache <= 0:
        ok = [t for t in TP_CHOICES if tp < t <= hardware.max_gpus_per_node
              and arch.num_attention_heads % t == 0 and arch.weight_bytes(None, t) < mem.usable * 0.9]
        fits = f"; try tp in {ok}" if ok else ""
        raise ConfigError(
            "tp",
            f"{arch.name} does not fit on {hardware.name} at tp={tp}: weights {mem.weights / GIB:.1f} GiB + "
            f"activations {mem.activation_peak / GIB:.1f} GiB + other {mem.other / GIB:.1f} GiB > "
            f"{mem.usable / GIB:.1f} GiB usable ({util} x {hardware.memory_gib} GiB){fits}",
        )
    if max_model_len:
        max_model_len = min(int(max_model_len), arch.max_position_embeddings)
    if max_model_len and not override_blocks:
        tokens = mem.kv_cache // kv_bytes_per_token
        if tokens < max_model_len:
            raise ConfigError(
                "engine.max_model_len",
                f"{arch.name} on {hardware.name} tp={tp} has KV room for {tokens} tokens, less than "
                f"max_model_len={max_model_len} (vLLM refuses to start); lower max_model_len or raise tp",
            )


def check_selection(
    hardware: Hardware,
    arch: ModelArchitecture,
    optimization: Mapping,
    tp: int,
    perf: Mapping | None = None,
    engine: Any = None,
) -> tuple[SourceChoice, MemoryBreakdown, int]:
    """Resolve and check a selection without building its step model (cheap: for listings).

    Returns the source choice, the memory split at the engine's utilization and the KV bytes per token.
    """
    choice = resolve_source(hardware, arch, optimization, tp, perf, engine)
    tokens, seqs, util, max_model_len, override = _engine_limits(engine)
    dp = parallel_settings(arch, engine).get("data_parallel_size", 1)
    memory = MemoryModel(arch, hardware, tp, choice.weight_dtype, choice.kv_dtype, tokens, seqs,
                         expert_ranks=tp * dp)
    mem = memory.breakdown(util)
    if choice.source != "profile":
        check_fits(mem, memory.kv_bytes_per_token(), hardware, arch, tp, util, max_model_len, override)
    return choice, mem, memory.kv_bytes_per_token()


def build_performance_model(
    hardware: Hardware | str,
    model: ModelArchitecture | str,
    optimization: Mapping | str | None,
    tp: int,
    perf: Mapping | None = None,
    *,
    engine: Any = None,
) -> PerformanceModel:
    """Build the PerformanceModel for a selection (names are looked up in conf/).

    ``engine`` (an EngineConfig or mapping) supplies max_num_batched_tokens and
    max_num_seqs for the activation estimate and max_model_len for the fit check.
    """
    hardware = catalog.load_hardware(hardware) if isinstance(hardware, str) else hardware
    arch = catalog.load_model(model) if isinstance(model, str) else model
    if optimization is None:
        optimization = {}
    elif isinstance(optimization, str):
        optimization = catalog.load_optimization(optimization)
    tp = int(tp)
    choice = resolve_source(hardware, arch, optimization, tp, perf, engine)
    tokens, seqs, util, max_model_len, override = _engine_limits(engine)
    common = {"max_num_batched_tokens": tokens, "max_num_seqs": seqs}
    hashing = _prefix_caching_cost(engine)  # composed models only
    parallel = parallel_settings(arch, engine)  # MoE: expert and data parallelism
    hashing.update(parallel)
    if parallel.get("data_parallel_size", 1) > 1 and choice.source not in DATA_PARALLEL_SOURCES:
        raise ConfigError("engine.data_parallel_size", f"> 1 with a mixture-of-experts model needs a perf.source "
                                                       f"that prices shared experts "
                                                       f"({', '.join(DATA_PARALLEL_SOURCES)}), got {choice.source}")

    if choice.source == "profile":
        pm = _fitted(dict(perf or {}))
    elif choice.source == "aiconfigurator":
        from calibration.composed import ComposedPerformanceModel, TableKernels

        tables = kernel_tables.load_tables(hardware.kernel_tables)
        kernels = TableKernels(tables, hardware)
        from calibration.weight_only import derived_kernels

        kernels = derived_kernels(kernels, tables, hardware, "bf16" if choice.weight_dtype == "fp16"
                                  else choice.weight_dtype)
        pm = ComposedPerformanceModel(
            arch, hardware, kernels, tp=tp,
            weight_dtype="bf16" if choice.weight_dtype == "fp16" else choice.weight_dtype,
            kv_dtype=choice.kv_dtype,
            name=f"aiconfigurator:{tables.system}:{arch.name}:{choice.weight_dtype}:kv-{choice.kv_dtype}:tp{tp}",
            **common, **hashing)
    elif choice.source == "kernels":
        from calibration.composed import ComposedPerformanceModel, TableKernels

        tables = _profiled_tables(dict(perf or {}), hardware)
        pm = ComposedPerformanceModel(
            arch, hardware, TableKernels(tables, hardware), tp=tp,
            weight_dtype="bf16" if choice.weight_dtype == "fp16" else choice.weight_dtype,
            kv_dtype=choice.kv_dtype,
            name=f"kernels:{tables.origin.get('folder')}:{arch.name}:{choice.weight_dtype}:kv-{choice.kv_dtype}:tp{tp}",
            **common, **hashing)
    elif choice.source == "llmservingsim":
        via = catalog.load_model(choice.via_model) if choice.via_model else arch
        key = llmservingsim.find_profile(hardware.name, via.hf_name or via.name, tp)
        pm = llmservingsim.LLMServingSimPerformanceModel(key, arch, hardware, kv_dtype=choice.kv_dtype,
                                                         via_model=choice.via_model, **common, **parallel)
    elif choice.source == "blis":
        via = choice.via_model or arch.name
        row = blis.find_coefficients(hardware.name, via, tp)
        pm = blis.BlisPerformanceModel(row, arch, hardware, kv_dtype=choice.kv_dtype,
                                       via_model=choice.via_model, **common)
    else:
        from calibration.composed import roofline_model

        pm = roofline_model(arch, hardware, tp=tp, weight_dtype=choice.weight_dtype, kv_dtype=choice.kv_dtype,
                            **common, **hashing)
    if choice.source != "profile":
        check_fits(pm.memory(util), pm.kv_bytes_per_token(), hardware, arch, tp, util, max_model_len, override)
    return pm


def _fitted(perf: dict) -> PerformanceModel:
    path = perf.get("profile")
    if not path:
        raise ConfigError("perf.profile", "source=profile needs perf.profile=<fitted model or profile directory>")
    try:
        from calibration.fit import load_fitted_model
    except ImportError:
        raise ConfigError("perf.source", "source=profile needs calibration.fit, which this build lacks") from None
    model = load_fitted_model(path)
    serving = perf.get("serving", True)
    if not isinstance(serving, bool):
        raise ConfigError("perf.serving", f"must be true or false, got {serving!r}")
    if not serving:
        return model
    from calibration.serving import as_served

    return as_served(model)
