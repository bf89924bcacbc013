"""`python -m simulator cluster.replicas=4 cluster.router=least_outstanding ...`: a cluster run.

``simulator.__main__.run`` hands the run here when the ``cluster`` group asks for more than
one plain replica; it writes what a single run writes (tables with a ``replica`` column, the
cluster summary with each replica's) and kv_usage_replicas.png.
"""

from __future__ import annotations

import time
from pathlib import Path

from simulator.cluster.cluster import ClusterSpec, data_parallel_ranks, simulate_cluster
from simulator.configure import CONF_DIR, to_plain
from simulator.records.errors import ConfigError


def cluster_spec(cfg) -> ClusterSpec:
    """The validated ``cluster`` group (the default: one plain replica), with the engine's
    data-parallel ranks as its replicas when ``engine.data_parallel_size`` > 1 (in lock-step for a
    mixture-of-experts model)."""
    spec = ClusterSpec.from_dict(to_plain(cfg.get("cluster")))
    dp = data_parallel_size(cfg)
    return data_parallel_ranks(spec, dp, dp > 1 and is_moe(cfg))


def is_moe(cfg) -> bool:
    """Whether the ``model`` group is a mixture of experts (ModelArchitecture's rule)."""
    from simulator.records.model_arch import ModelArchitecture

    return ModelArchitecture.from_dict(to_plain(cfg.get("model"))).is_moe


def data_parallel_size(cfg) -> int:
    """``engine.data_parallel_size``, checked by EngineConfig's rule."""
    from simulator.records.engine_config import EngineConfig

    value = (to_plain(cfg.get("engine")) or {}).get("data_parallel_size", 1)
    return EngineConfig(data_parallel_size=value).data_parallel_size


def prefill_pool(name: str | None, spec, cfg):
    """(performance model, link GB/s) of the prefill pool: its own hardware if named."""
    if not name:
        return None, spec.hardware.interconnect_gbps
    from calibration.registry import build_performance_model
    from simulator.records.hardware import Hardware

    allowed = sorted(p.stem for p in (CONF_DIR / "hardware").glob("*.yaml"))
    if name not in allowed:
        raise ConfigError("cluster.prefill_hardware", f"unknown choice {name!r}; allowed: {', '.join(allowed)}")
    hardware = Hardware.from_yaml(CONF_DIR / "hardware" / f"{name}.yaml")
    perf = build_performance_model(hardware, spec.model, spec.optimization, spec.tp, to_plain(cfg.get("perf")),
                                   engine=spec.engine)
    return perf, hardware.interconnect_gbps


def replica_lines(summary: dict) -> list[str]:
    """One terminal line per replica."""
    lines = []
    for r in summary.get("replicas", []):
        ttft = r["ttft_s"]["p99"]
        lines.append(f"  {r.get('role', 'replica')} {r.get('replica')}: {r['requests']} requests, "
                     f"p99 TTFT {'-' if ttft is None else f'{ttft:.3f} s'}, KV mean {r['kv_usage']['mean']:.1%} "
                     f"peak {r['kv_usage']['peak']:.1%}, {r['preemptions']} preemptions")
    return lines


def run_cluster(cfg, cluster: ClusterSpec) -> dict:
    """Simulate the cluster, write its results to the run dir and print its summary."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from simulator.configure import build_run, versions
    from simulator.interrupts import deferred_signals, note_interrupt
    from simulator.records import frontend
    from simulator.records.run_result import rejection_reasons, write_workload
    from simulator.terminal import print_summary

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    spec = build_run(cfg)
    front = frontend.resolve(cfg.get("frontend_s", "auto"), spec.perf)
    prefill_perf, link = prefill_pool(cluster.prefill_hardware, spec, cfg)
    started = time.perf_counter()
    out = simulate_cluster(spec.workload, spec.engine, spec.perf, cluster, slo=spec.slo, seed=spec.seed,
                           prefill_perf=prefill_perf, link_gbps=link, progress=bool(cfg.get("progress", True)),
                           stop_on_interrupt=True, compiled=spec.compiled)
    elapsed = time.perf_counter() - started
    result = out.result
    dp = spec.engine.data_parallel_size
    gpus = spec.tp * dp if dp > 1 else spec.tp * cluster.num_replicas
    result.metadata = {
        "seed": spec.seed,
        "versions": versions(),
        "performance_model": spec.perf.describe(),
        "calibrated": spec.perf.calibrated,
        "hardware": spec.hardware.name,
        "prefill_hardware": cluster.prefill_hardware or spec.hardware.name,
        "model": spec.model.name,
        "tp": spec.tp,
        "data_parallel_size": spec.engine.data_parallel_size,
        "gpus": gpus,
        "optimization": spec.optimization.get("name", "none"),
        "simulation_wall_s": elapsed,
        "engine_path": out.engine_path,
        **({"not_compiled": out.not_compiled} if out.not_compiled else {}),
        "workload": {"name": spec.workload.name, "requests": len(spec.workload)},
    }
    result.summary["rejected_by_reason"] = rejection_reasons(result.requests)
    result.summary["client_observed"] = frontend.client_observed(result.requests, front)
    if dp > 1:
        result.summary["layout"] = {"data_parallel_size": dp, "tp": spec.tp, "gpus": gpus,
                                    "expert_parallel": bool(getattr(spec.perf, "expert_parallel", False))}
    if not spec.perf.calibrated:
        result.summary["warning"] = "UNCALIBRATED performance model (roofline): treat latencies as rough"
    with deferred_signals() as deferred:  # (a Ctrl-C while writing waits for every file)
        result.write(out_dir)
        (out_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_workload(spec.workload, out_dir / "workload.parquet")
        if cfg.get("plots", True):
            from simulator.plots import plot_kv_per_replica, plot_latency_cdfs

            title = f"{spec.model.name} on {spec.hardware.name} x{spec.tp}, {spec.workload.name}, {cluster.router}"
            plot_kv_per_replica(result, out_dir / "kv_usage_replicas.png", title)
            plot_latency_cdfs(result, out_dir / "latency_cdf.png", title)
    print_summary(result.summary, out_dir)
    layout = (f"{cluster.prefill_replicas} prefill + {cluster.decode_replicas} decode replicas"
              if cluster.disaggregated else f"{cluster.replicas} replicas")
    if dp > 1:
        layout = f"{dp} data-parallel engine ranks (tp {spec.tp} x dp {dp} = {gpus} GPUs)"
    if cluster.lockstep:
        layout += ", in lock-step"
    print(f"cluster    {layout}, router {cluster.router}")
    print("\n".join(replica_lines(result.summary)))
    if not spec.perf.calibrated:
        print("warning: the performance model is UNCALIBRATED (roofline)")
    note_interrupt(result.summary, out_dir, deferred)
    return result.summary
