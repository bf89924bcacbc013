"""rllm-sim's simulator: a SimPy model of a vLLM V1 replica under reasoning workloads."""

from simulator.errors import ConfigError
from simulator.performance import KVCapacity, MemoryBreakdown, PerformanceModel, StepBatch
from simulator.workload import Workload

__all__ = ["ConfigError", "KVCapacity", "MemoryBreakdown", "PerformanceModel", "StepBatch", "Workload"]
