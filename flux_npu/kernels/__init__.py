"""Kernels, one package per backend, one file per op. Importing a backend's package registers its
kernels in the op table (`flux_npu.ops.registry`); the backend's `kernel_modules` name it, and
dispatch imports it on first use, so Triton and torch_npu load only when their backend runs."""
