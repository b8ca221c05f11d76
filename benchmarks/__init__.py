"""Reproducible benchmarks of edgekit bundles (run from the repository root).

* ``python benchmarks/int8_vs_fp32.py``   — FP32 vs INT8, interleaved, per model and target;
* ``python benchmarks/runtime_overhead.py`` — edgekit runtime vs the bare inference session.

Shared helpers (data, BN re-estimation, building bundles) live in :mod:`benchmarks.common`.
"""
