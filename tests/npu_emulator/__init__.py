"""torch_npu CONTRACT EMULATOR, for tests only.

A stand-in `torch_npu` package (site/torch_npu) that implements, on CPU tensors and in plain
autograd-capable torch, the documented signatures and semantics of the torch_npu ops flux_npu
calls (npu_fusion_attention, npu_fused_infer_attention_score, npu_rotary_mul, npu_rms_norm), the
part of `torch.npu` the backend probe, capability report and checks read (including the compile
mode, `set_compile_mode` / `is_jit_compile_false`), and a `torch_npu.contrib.transfer_to_npu` that only records it
was imported. It is as strict as the real ops about argument names, types, dtypes and shape
limits, records every call (`record.CALLS`) and every float64 tensor that reaches an op
(`record.FLOAT64`). CONTRACT.md lists each rule it enforces with its source.

It proves that the npu backend calls the ops by their contract and that the model maths survives
the translation. It measures nothing about hardware: no result obtained through it is an NPU
result, and flux_npu never imports it (tests install it with `install.emulated_npu_backend()`).
"""

from .record import CALLS, FLOAT64, calls, clear  # noqa: F401
