"""Finding the Python that has vLLM, and preparing the process before vLLM is imported.

`python -m profiler` may be started from any Python. When vLLM is not importable
there, it re-executes itself with the engine env's Python:
``$RLLM_SIM_ENGINE_PYTHON``, else ``<repo>/.venv-engine/bin/python`` (made by
``scripts/setup_vllm_cpu.sh``). On a CPU build it also binds the process to the
cores vLLM's own server worker would use, before torch starts its threads.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

from simulator.records.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINE_PYTHON_ENV = "RLLM_SIM_ENGINE_PYTHON"
REEXEC_MARK = "RLLM_SIM_PROFILER_REEXEC"

#: environment every engine run gets: no traffic off the machine, engine core in this process
ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def default_engine_python() -> Path:
    return REPO_ROOT / ".venv-engine" / "bin" / "python"


def engine_python() -> Path | None:
    """The engine env's Python, if there is one."""
    configured = os.environ.get(ENGINE_PYTHON_ENV)
    candidate = Path(configured) if configured else default_engine_python()
    return candidate if candidate.exists() else None


def ensure_engine_python(argv: list[str]) -> None:
    """Return if vLLM imports here; else exec the profiler in the engine env (or fail clearly)."""
    if vllm_importable():
        return
    python = engine_python()
    if python is None or os.environ.get(REEXEC_MARK) == "1":
        where = os.environ.get(ENGINE_PYTHON_ENV) or default_engine_python()
        raise ConfigError(
            "engine",
            f"vLLM is not installed in {sys.executable} and there is no engine env at {where}; "
            "run ./scripts/setup_vllm_cpu.sh (CPU) or `pip install vllm` (GPU, see docs/gpu-setup.md)",
        )
    env = dict(os.environ, **{REEXEC_MARK: "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    print(f"[profiler] vLLM is not importable here; running in the engine env {python}", file=sys.stderr)
    sys.stderr.flush()
    os.execve(str(python), [str(python), "-m", "profiler", *argv], env)


def is_cpu_build() -> bool:
    """True for the vllm-cpu distribution (or a vllm without CUDA devices)."""
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    return not Path("/dev/nvidiactl").exists()


def physical_core_cpus(cpus: list[int]) -> list[int]:
    """One logical CPU per physical core (the last sibling, as vLLM's auto binding picks)."""
    by_core: dict[tuple[str, str], int] = {}
    for cpu in sorted(cpus):
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            key = ((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip())
        except OSError:
            key = (str(cpu), "")
        by_core[key] = cpu
    return sorted(by_core.values())


def compute_cpus(setting: str | int, cpus: list[int]) -> list[int] | None:
    """The cores the engine computes on, or None to leave threads to vLLM and OpenMP.

    ``auto``: as vLLM's server worker binds itself: one logical CPU per physical
    core, minus the last one (left to the API server/scheduler). An integer N:
    the first N of those. ``nobind``: None.
    """
    if setting == "nobind":
        return None
    cores = physical_core_cpus(cpus)
    if setting == "auto":
        return cores[:-1] if len(cores) > 1 else cores
    try:
        count = int(setting)
    except (TypeError, ValueError):
        raise ConfigError("engine.cpu_threads", f"must be auto, nobind or a number of cores, got {setting!r}") from None
    if not 1 <= count <= len(cores):
        raise ConfigError("engine.cpu_threads", f"must lie in [1, {len(cores)}] here, got {count}")
    return cores[:count]


def prepare_process(cpu_threads: str | int) -> dict:
    """Set the engine environment and (CPU build) thread binding; call before importing vLLM."""
    if "torch" in sys.modules:
        raise RuntimeError("prepare_process must run before torch is imported")
    os.environ.update(ENGINE_ENV)
    cpus = sorted(os.sched_getaffinity(0))
    info: dict = {"cpus": cpus, "compute_cpus": cpus, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if is_cpu_build():
        chosen = compute_cpus(cpu_threads, cpus)
        if chosen is not None:
            os.sched_setaffinity(0, chosen)
            os.environ["OMP_NUM_THREADS"] = str(len(chosen))
            # An OpenMP runtime preloaded (LD_PRELOAD, as vLLM's docs advise and as
            # vLLM itself sets for its workers) read OMP_NUM_THREADS at process start:
            # tell it again, or its extra threads spin on the cores left and every
            # step runs tens of times slower.
            import torch

            torch.set_num_threads(len(chosen))
            info.update(compute_cpus=chosen, omp_num_threads=str(len(chosen)))
    info["cpu_threads"] = str(cpu_threads)
    return info
