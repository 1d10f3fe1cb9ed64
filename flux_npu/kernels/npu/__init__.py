"""Ascend NPU kernels (torch_npu fused ops). Importing this package registers them."""
