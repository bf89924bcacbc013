"""Profiler: measure a real vLLM engine step by step."""
