"""A validation scenario's load kept relative to the host's engine speed.

The scenarios' arrival rates (calibration/validation_scenarios.py) were set on the
CPU host of the shipped tiny-llama profile (AVX-512, bf16). vLLM's CPU engine runs
several times slower on some CPUs (AVX2 without AVX-512: the tiny model in float32
there, 2.6x; in bf16 vLLM falls back to torch's linear, 4-5x): there the same rates
overload the server, and a scenario built to show moderate KV pressure turns into a
saturation run that takes minutes more.

Where the freshly profiled server's decode step of ``PACE_BATCH`` requests (the
median of its serving phase's decode probes; without them, the fitted engine's
step) is more than ``PACE_THRESHOLD`` times as long as the reference profile's, the
scenario's arrival times are spread by that factor, so that the host serves the
same load relative to its speed. Within the threshold (hosts of the reference's
kind, whose servers differ by 10-30% from one process to the next) nothing changes.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from simulator.records.performance import PerformanceModel, StepBatch
from simulator.records.workload import Workload

#: the profile the scenarios' rates were set against (the reference CPU host's engine)
REFERENCE_PROFILE = Path(__file__).resolve().parent / "profiles" / "cpu-amd-2c" / "tiny-llama" / "none"
#: the decode step that measures an engine's speed: this many requests at this context each
PACE_BATCH, PACE_CONTEXT = 8, 256
#: a slowdown up to this factor is left alone (fresh servers of one host differ by 10-30%)
PACE_THRESHOLD = 1.5


@dataclass(frozen=True)
class Pace:
    """How much slower the host's engine is than the reference, and the factor applied."""

    slowdown: float
    factor: float  # 1.0: the scenario as it is
    measured: str  # what was compared

    def to_dict(self) -> dict[str, float | str]:
        return {"slowdown": round(self.slowdown, 3), "factor": round(self.factor, 3), "measured": self.measured,
                "reference": str(REFERENCE_PROFILE.relative_to(REFERENCE_PROFILE.parents[4])),
                "rule": f"arrivals spread by the slowdown where it exceeds {PACE_THRESHOLD}"}


def decode_step_s(model: PerformanceModel) -> float:
    """The model's decode step of ``PACE_BATCH`` requests at ``PACE_CONTEXT`` tokens each."""
    return model.step_time(StepBatch(decode_context=[PACE_CONTEXT] * PACE_BATCH, decode_spec_tokens=[0] * PACE_BATCH))


def server_decode_step_s(profile_dir: Path) -> float | None:
    """The median wall time per step of the profile's serving-phase decode probes of ``PACE_BATCH``
    requests (None: no serving phase, or no such probe)."""
    serving = _meta(profile_dir).get("serving") or {}
    walls = [probe["wall_per_step_s"] for probes in serving.get("probes", [])
             for probe in probes.get("decode_probe", []) if probe.get("batch") == PACE_BATCH]
    return statistics.median(walls) if walls else None


def pace_for(model: PerformanceModel, reference: PerformanceModel) -> Pace:
    """The pace for a host whose engine ``model`` describes (``reference``: the reference profile's)."""
    return _pace(decode_step_s(model) / decode_step_s(reference), "the fitted engines' decode step")


def pace_of_profile(profile_dir: Path, model: PerformanceModel, load: Callable[[Path], PerformanceModel]) -> Pace:
    """The pace for the host ``profile_dir`` was taken on (``model``: its fit; ``load``: loads a
    profile's fit): from the two profiles' servers where both have decode probes, else the fits.
    A profile of another optimization than the reference's (none) is not paced: its steps differ
    by the optimization, not by the host alone."""
    optimization = (_meta(profile_dir).get("optimization") or {}).get("name", "none")
    if optimization != "none":
        return Pace(1.0, 1.0, f"not measured: a profile of {optimization!r}, the reference's is 'none'")
    mine, theirs = server_decode_step_s(profile_dir), server_decode_step_s(REFERENCE_PROFILE)
    if mine is not None and theirs is not None:
        return _pace(mine / theirs, f"the servers' decode probes of {PACE_BATCH} requests (medians)")
    return pace_for(model, load(REFERENCE_PROFILE))


def _meta(profile_dir: Path) -> dict:
    return json.loads((Path(profile_dir) / "profile.json").read_text())


def _pace(slowdown: float, measured: str) -> Pace:
    return Pace(slowdown, slowdown if slowdown > PACE_THRESHOLD else 1.0, measured)


def paced(workload: Workload, pace: Pace) -> Workload:
    """``workload`` with its arrival times spread by ``pace.factor`` (itself where it is 1)."""
    if pace.factor == 1.0:
        return workload
    return replace(workload, arrival_s=workload.arrival_s * pace.factor)
