"""The bottom layer: records that cross a boundary (workload, engine config, hardware, model
architecture, performance-model interface, profile format, metrics, run result) and ConfigError.
Imports nothing else of the project."""
