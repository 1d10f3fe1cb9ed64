"""Ascend NPU kernels (torch_npu fused ops). Importing this package registers them.

torch_npu itself is imported only inside the kernels and their checks (through
`flux_npu.backends.npu.torch_npu_or_reason`), so this package imports on any machine and its
checks answer "torch_npu not importable: ..." where it is absent."""

from . import attention, layer_norm, rms_norm, rope  # noqa: F401  (registration side effects)
