"""Benchmark runners: per-op (`ops.py`) and whole-model (`model.py`), behind `flux-npu bench`."""
