"""rllm-sim's simulator: a SimPy model of a vLLM V1 replica under reasoning workloads."""

import signal as _signal
import sys as _sys

if _sys.argv[:1] == ["-m"]:  # `python -m simulator...`: Ctrl-C while loading ends in one line, exit 130
    def _interrupted(signum, frame) -> None:
        import os

        print("interrupted: nothing was simulated yet", file=_sys.stderr, flush=True)
        os._exit(130)

    _previous = _signal.signal(_signal.SIGINT, _interrupted)

from simulator.records.errors import ConfigError  # noqa: E402
from simulator.records.performance import KVCapacity, MemoryBreakdown, PerformanceModel, StepBatch  # noqa: E402
from simulator.records.workload import Workload  # noqa: E402

if _sys.argv[:1] == ["-m"] and "simulator" not in _sys.orig_argv[1:3]:
    _signal.signal(_signal.SIGINT, _previous)  # simulator/__main__.py replaces it itself

__all__ = ["ConfigError", "KVCapacity", "MemoryBreakdown", "PerformanceModel", "StepBatch", "Workload"]
