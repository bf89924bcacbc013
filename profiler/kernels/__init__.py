"""The kernel profiler: measure, with PyTorch only, the kernels a model's step is made of.

``python -m profiler.kernels model=<conf model> hardware=<conf hardware> [tp=..] [dtype=..]``
times the model's GEMMs, prefill and decode attention, element-wise kernels, sampler and
(TP > 1) all-reduces at the model's per-GPU shapes, and writes tables in the format of
aiconfigurator's (``calibration/data/aiconfigurator``) plus ``elementwise_perf.csv`` and a
``kernels.json`` provenance record: the composed performance model reads the folder with
``perf=kernels perf.tables=<folder>``. See docs/kernel-profiler.md.
"""
