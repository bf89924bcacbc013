"""An optimization's effect on how long the model writes: ``output_length_scale``.

Some optimizations change what the model generates, not only how fast: the study behind
rllm-sim saw quantized small reasoning models think longer (conf/optimization/*.yaml quote
what it observed beside each scale). An optimization group may set
``output_length_scale`` (default 1.0): every request's output tokens, and its reasoning part
with them, are multiplied by it and rounded, at least 1 token and never past
``max_model_len`` (vLLM stops a request there).
"""

from __future__ import annotations

import numbers
from dataclasses import replace
from typing import Any

import numpy as np

from simulator.records.errors import ConfigError
from simulator.records.workload import Workload

FIELD = "optimization.output_length_scale"


def output_length_scale(optimization: dict[str, Any]) -> float:
    """The group's scale (1.0 when it sets none); ConfigError unless a number > 0."""
    value = optimization.get("output_length_scale", 1.0)
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ConfigError(FIELD, f"must be a number > 0 (1.0: lengths unchanged), got {value!r}")
    return float(value)


def scale_outputs(workload: Workload, scale: float, max_model_len: int | None = None) -> Workload:
    """The workload with output (and reasoning) lengths times ``scale``."""
    if scale == 1.0:
        return workload
    output = np.maximum(np.rint(workload.output_tokens * scale), 1).astype(np.int64)
    if max_model_len is not None:
        room = max_model_len - workload.prompt_tokens  # a request that fitted still fits
        output = np.where(workload.output_tokens <= room, np.minimum(output, room), output)
    reasoning = np.minimum(np.rint(workload.reasoning_tokens * scale).astype(np.int64), output)
    return replace(workload, output_tokens=output, reasoning_tokens=reasoning)  # every other field kept
