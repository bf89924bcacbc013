"""Workload generation: arrival processes, length laws, traces and the builder from a config."""
