"""Where a run's speculative-decoding rates come from, and a warning when they are placeholders.

Precedence: both rates on the command line; else, under ``perf.source=profile``, the rates
the profiler measured (profile.json ``summary.spec_decode``, vLLM's spec-decode counters);
else the optimization group's (its ``speculative_rates`` label says where they come from).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError

PLACEHOLDER = "placeholder"
RATE_KEYS = ("acceptance_rate", "proposal_rate")
WARNING = (
    "the speculative draft acceptance and proposal rates are placeholders, not measurements "
    "(conf/optimization/{name}.yaml): measure them on your workload with "
    "`python -m profiler optimization={name}` (profile.json summary.spec_decode) and set "
    "optimization.speculative.acceptance_rate=[...] optimization.speculative.proposal_rate=..."
)


def speculative_rates(engine: EngineConfig, optimization: dict[str, Any],
                      overrides: list[str]) -> dict[str, Any] | None:
    """The run's metadata on its draft rates (None without speculative decoding).

    ``source`` is the optimization group's ``speculative_rates`` label
    (``placeholder`` in conf/optimization/spec_ngram.yaml) unless the command line
    sets both rates (``command line``); rates from the engine group are ``engine``.
    A placeholder adds a one-line ``warning`` for the screen."""
    spec = engine.speculative
    if not spec.enabled:
        return None
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    if not optimization.get("speculative"):
        source = "engine"
    elif all(f"optimization.speculative.{k}" in given for k in RATE_KEYS):
        source = "command line"
    else:
        source = str(optimization.get("speculative_rates") or "optimization")
    out: dict[str, Any] = {"source": source, "method": spec.method,
                           "acceptance_rate": list(spec.acceptance_rate), "proposal_rate": spec.proposal_rate}
    if source == PLACEHOLDER:
        out["warning"] = WARNING.format(name=optimization.get("name", "spec_ngram"))
    return out


def profile_rates(perf: dict[str, Any]) -> dict[str, Any] | None:
    """Draft rates from the profiler run behind ``perf.profile`` (None: no speculation profiled).

    ``perf.profile`` is a profile directory, its profile.json, or a fitted model whose
    ``source`` names the profile it was fitted from."""
    from profiler.live.spec_counters import SpecCounters

    meta_path = _profile_meta(Path(str(perf.get("profile") or "")))
    if meta_path is None:
        return None
    spec = (json.loads(meta_path.read_text()).get("summary") or {}).get("spec_decode")
    if not spec:
        return None
    counters_dict = spec.get("vllm_counters") or _counters_from_steps(meta_path.parent, spec)
    counters = SpecCounters(**counters_dict) if counters_dict else None
    # vLLM's counters give accepted-per-position over all drafts, short ones included, which is
    # what the simulator (always k drafts) needs to reproduce the mean accepted per draft
    acceptance = (counters.acceptance_given_previous() if counters
                  else [r or 0.0 for r in spec["acceptance_per_position_given_previous"]])
    return {"num_speculative_tokens": int(spec["num_speculative_tokens"]), "acceptance_rate": acceptance,
            "proposal_rate": float(spec["proposal_rate"]), "source": f"profile {meta_path.parent}",
            "vllm_counters": counters.to_dict() if counters else None}


def _counters_from_steps(folder: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """vLLM's counters recomputed from a profile's steps (profiles written before they were kept)."""
    if not (folder / "steps.parquet").exists():
        return None
    from profiler.summary import spec_summary
    from simulator.records.profile import read_steps

    again = spec_summary(read_steps(folder / "steps.parquet"), int(spec["num_speculative_tokens"]))
    return (again or {}).get("vllm_counters")


def _profile_meta(path: Path) -> Path | None:
    if path.is_dir():
        path = path / "profile.json"
    if not path.is_file():
        return None
    if path.name == "profile.json":
        return path
    try:  # a fitted model: follow its source
        source = json.loads(path.read_text()).get("source")
    except (ValueError, OSError):
        return None
    return _profile_meta(Path(source)) if source and Path(source) != path else None


def with_profile_rates(engine: EngineConfig, optimization: dict[str, Any], perf: dict[str, Any],
                       overrides: list[str]) -> EngineConfig:
    """The engine with the profile's measured draft rates (``perf.source=profile``), unless the
    command line sets both rates; ``optimization["speculative_rates"]`` then names the profile."""
    spec = engine.speculative
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    if (not spec.enabled or perf.get("source") != "profile"
            or all(f"optimization.speculative.{k}" in given for k in RATE_KEYS)):
        return engine
    measured = profile_rates(perf)
    if measured is None:
        return engine
    if measured["num_speculative_tokens"] != spec.num_speculative_tokens:
        raise ConfigError("optimization.speculative.num_speculative_tokens",
                          f"the profile measured {measured['num_speculative_tokens']} draft tokens "
                          f"({measured['source']}), got {spec.num_speculative_tokens}")
    optimization["speculative_rates"] = measured["source"]
    rates = dataclasses.replace(spec, acceptance_rate=tuple(measured["acceptance_rate"]),
                                proposal_rate=measured["proposal_rate"])
    return dataclasses.replace(engine, speculative=rates)
