"""`python -m simulator workload=gamma ...`: simulate one vLLM replica and write its results."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from simulator.interrupts import deferred_signals, note_interrupt
from simulator.records.errors import ConfigError
from simulator.records.summary import Summary
from simulator.terminal import print_summary


def run(cfg) -> Summary:
    """Build the run from the config, simulate it and write everything to the run dir."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from simulator.cluster_run import cluster_spec, run_cluster
    from simulator.configure import build_run, command_line_overrides, versions
    from simulator.engine.loop import simulate
    from simulator.records import frontend
    from simulator.records.run_result import rejection_reasons, write_workload
    from simulator.speculation import speculative_rates
    from simulator.workload.output_scale import output_length_scale

    cluster = cluster_spec(cfg)  # (checked first: a bad router name fails before anything runs)
    if not cluster.single:
        return run_cluster(cfg, cluster)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    plots = None
    if cfg.get("plots", True):
        from simulator.plots import BackgroundPlots

        plots = BackgroundPlots()  # loads matplotlib on another core while the run computes
    try:
        spec = build_run(cfg)
        front = frontend.resolve(cfg.get("frontend_s", "auto"), spec.perf)
        started = time.perf_counter()
        result = simulate(spec.workload, spec.engine, spec.perf, slo=spec.slo, seed=spec.seed,
                          progress=bool(cfg.get("progress", True)), stop_on_interrupt=True,
                          compiled=spec.compiled)
        elapsed = time.perf_counter() - started
    except BaseException:
        if plots is not None:
            plots.cancel()
        raise
    result.metadata = {
        "seed": spec.seed,
        "versions": versions(),
        "performance_model": spec.perf.describe(),
        "calibrated": spec.perf.calibrated,
        "hardware": spec.perf.hardware_label or spec.hardware.name,
        **({"notes": spec.notes} if spec.notes else {}),
        "model": spec.model.name,
        "tp": spec.tp,
        "optimization": spec.optimization.get("name", "none"),
        "simulation_wall_s": elapsed,
        "engine_path": result.engine_path,
        **({"not_compiled": result.not_compiled} if result.not_compiled else {}),
        "workload": {"name": spec.workload.name, "requests": len(spec.workload)},
        "speculative_rates": speculative_rates(spec.engine, spec.optimization, command_line_overrides()),
        "output_length_scale": output_length_scale(spec.optimization),
    }
    result.summary["rejected_by_reason"] = rejection_reasons(result.requests)
    result.summary["client_observed"] = frontend.client_observed(result.requests, front)
    if not spec.perf.calibrated:
        result.summary.sections["warning"] = "UNCALIBRATED performance model (roofline): treat latencies as rough"
    if plots is not None:
        plots.submit(result, out_dir, f"{spec.model.name} on {spec.hardware.name} x{spec.tp}, "
                                      f"{spec.workload.name}")
    # the tables are encoded on another thread (pyarrow releases the GIL) while this one
    # writes the rest and the plots are drawn
    with deferred_signals() as deferred, ThreadPoolExecutor(max_workers=1) as pool:
        tables = pool.submit(result.write, out_dir)
        (out_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_workload(spec.workload, out_dir / "workload.parquet")
        if plots is not None:
            plots.wait()
        tables.result()
    print_summary(result.summary, out_dir)
    for key in ("engine", "serving", "seed"):  # what differs from the profile, a bare engine, a seed that changes nothing
        if key in spec.notes and (key != "engine" or "except" in spec.notes[key]):
            print(f"note: {spec.notes[key]}", file=sys.stderr)
    if not spec.perf.calibrated:
        print("warning: the performance model is UNCALIBRATED (roofline)")
    rates = result.metadata["speculative_rates"]
    if rates and rates.get("warning"):
        print(f"warning: {rates['warning']}", file=sys.stderr)
    note_interrupt(result.summary, out_dir, deferred)
    return result.summary


def interrupted_early(cfg, out_dir: Path) -> None:
    """Ctrl-C before the simulation: write the config, say so in one line, exit 130."""
    from omegaconf import OmegaConf

    with deferred_signals():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    print(f"interrupted: nothing was simulated yet; the config is in {out_dir}", file=sys.stderr)
    sys.exit(130)


def main() -> int:
    import hydra

    from simulator.cli_errors import start_command_line
    from simulator.configure import CONF_DIR

    if not start_command_line(sys.argv[1:], "config"):
        return 2

    import signal

    early: list[int] = []  # Ctrl-C while Hydra composes is held to here (it would corrupt omegaconf)
    signal.signal(signal.SIGINT, lambda signum, frame: early.append(signum))

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def _task(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if early:
                raise KeyboardInterrupt
            summary = run(cfg)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:  # before anything was simulated (run() keeps later ones)
            interrupted_early(cfg, Path(HydraConfig.get().runtime.output_dir))
        if summary.sections.get("partial"):
            sys.exit(130)
        return json.loads(json.dumps(summary.goodput))

    _task()
    return 0


def exit_now(code: int) -> None:
    """End the process without Python's teardown (freeing every module and object, and
    pyarrow's thread pools: ~0.1 s of a 1.3 s light run). Everything has been written and
    closed by then; the output streams and logs are flushed here."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_status() -> int:
    """Run ``main()``; its exit status, Hydra's and ours (2: bad input, 130: interrupted)."""
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted: nothing was simulated yet", file=sys.stderr)
        return 130
    except SystemExit as stop:
        if isinstance(stop.code, int):
            return stop.code
        if stop.code is not None:
            print(stop.code, file=sys.stderr)
            return 1
        return 0


if __name__ == "__main__":
    exit_now(exit_status())
