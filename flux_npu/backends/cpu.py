"""The CPU backend: the embedded default. Always available; float64 supported; gloo."""

import torch

from .base import Backend, CPUDeviceUtils

BACKEND = Backend(
    name="cpu",
    device_type="cpu",
    probe=lambda: None,
    dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64}),
    supports_float64=True,
    dist_backend="gloo",
    autocast_device_type="cpu",
    priority=30,
    utils_factory=CPUDeviceUtils,
    kernel_modules=("flux_npu.kernels.cpu",),
    description="plain torch on the host CPU (native SDPA, fused rms_norm/layer_norm)",
)
