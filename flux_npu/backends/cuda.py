"""The CUDA backend: NVIDIA GPUs, Triton kernels, SDPA attention, nccl."""

import torch

from .base import Backend, DeviceUtils


def _probe():
    if not torch.cuda.is_available():
        built = torch.version.cuda
        return "torch.cuda.is_available() is False" + ("" if built else " (this torch is a CPU-only build)")
    # transfer_to_npu makes torch.cuda.is_available() True on an Ascend box: a real CUDA device
    # has a compute capability and a CUDA runtime version in this torch build.
    if torch.version.cuda is None:
        return "torch.cuda reports a device but this torch build has no CUDA runtime (is transfer_to_npu active?)"
    return None


def compute_capability():
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


BACKEND = Backend(
    name="cuda",
    device_type="cuda",
    probe=_probe,
    dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64}),
    supports_float64=True,
    dist_backend="nccl",
    autocast_device_type="cuda",
    priority=20,
    utils_factory=lambda: DeviceUtils("cuda"),
    kernel_modules=("flux_npu.kernels.cuda",),
    description="NVIDIA GPUs: Triton fused kernels, PyTorch SDPA (flash / cuDNN / efficient)",
)
