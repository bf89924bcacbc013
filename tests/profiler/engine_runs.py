"""Running the real profiler (python -m profiler) in a subprocess, for the engine tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def engine_available() -> bool:
    from profiler.engine_env import engine_python, vllm_importable

    return vllm_importable() or engine_python() is not None


needs_engine = pytest.mark.skipif(not engine_available(),
                                  reason="no vLLM here and no engine env (run ./scripts/setup_vllm_cpu.sh)")


def profiler_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "profiler", *args]


def profiler_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RLLM_SIM_PROFILER_REEXEC", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def run_profiler(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the profiler to completion; stdout and stderr captured as text."""
    return subprocess.run(profiler_command(*args), cwd=REPO, env=profiler_env(), capture_output=True,
                          text=True, timeout=timeout)
