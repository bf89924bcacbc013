"""Finding the engine env and binding threads (no engine started)."""

from __future__ import annotations

import os

import pytest

from profiler import engine_env
from simulator.records.errors import ConfigError


def test_auto_binding_leaves_one_core_like_vllms_server(monkeypatch):
    monkeypatch.setattr(engine_env, "physical_core_cpus", lambda cpus: sorted(cpus))
    assert engine_env.compute_cpus("auto", [0, 1]) == [0]
    assert engine_env.compute_cpus("auto", [0, 1, 2, 3]) == [0, 1, 2]
    assert engine_env.compute_cpus("auto", [3]) == [3]
    assert engine_env.compute_cpus(2, [0, 1, 2, 3]) == [0, 1]
    assert engine_env.compute_cpus("nobind", [0, 1]) is None


@pytest.mark.parametrize("setting", ["lots", 0, 99])
def test_bad_thread_settings(setting):
    with pytest.raises(ConfigError, match="engine.cpu_threads"):
        engine_env.compute_cpus(setting, sorted(os.sched_getaffinity(0)))


def test_physical_cores_of_this_machine():
    cpus = sorted(os.sched_getaffinity(0))
    cores = engine_env.physical_core_cpus(cpus)
    assert 1 <= len(cores) <= len(cpus) and set(cores) <= set(cpus)


def test_missing_engine_env_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(engine_env, "vllm_importable", lambda: False)
    monkeypatch.setenv(engine_env.ENGINE_PYTHON_ENV, str(tmp_path / "no-python"))
    with pytest.raises(ConfigError) as err:
        engine_env.ensure_engine_python([])
    message = str(err.value)
    assert message.startswith("engine: vLLM is not installed") and "scripts/setup_vllm_cpu.sh" in message
    assert "\n" not in message


def test_engine_python_override(monkeypatch, tmp_path):
    python = tmp_path / "python"
    python.write_text("")
    monkeypatch.setenv(engine_env.ENGINE_PYTHON_ENV, str(python))
    assert engine_env.engine_python() == python
