"""Where a run's speculative-decoding rates come from, and a warning when they are placeholders."""

from __future__ import annotations

from typing import Any

from simulator.records.engine_config import EngineConfig

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
