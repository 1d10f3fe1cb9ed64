"""The CUDA backend: NVIDIA GPUs, Triton kernels, SDPA attention, nccl.

The probe asks for a real CUDA device: `torch_npu.contrib.transfer_to_npu` makes
`torch.cuda.is_available()` answer True on an Ascend machine, so a CUDA runtime in this torch
build (`torch.version.cuda`) is required as well. Triton's presence is not part of the probe:
without it the backend still runs (SDPA attention, reference ops) and each Triton kernel's check
says why it declines.
"""

import functools

import torch

from .base import Backend, DeviceUtils

# Triton's floor (its README: compute capability 7.0+); bfloat16 compute needs Ampere (8.0).
MIN_COMPUTE_CAPABILITY = (7, 0)
BF16_COMPUTE_CAPABILITY = (8, 0)


def _probe():
    if not torch.cuda.is_available():
        built = torch.version.cuda
        return "torch.cuda.is_available() is False" + ("" if built else " (this torch is a CPU-only build)")
    # transfer_to_npu makes torch.cuda.is_available() True on an Ascend box: a real CUDA device
    # has a compute capability and a CUDA runtime version in this torch build.
    if torch.version.cuda is None:
        return "torch.cuda reports a device but this torch build has no CUDA runtime (is transfer_to_npu active?)"
    return None


@functools.lru_cache(maxsize=None)
def compute_capability(index: int = None):
    """(major, minor) of CUDA device `index` (default: current), or None without CUDA."""
    if _probe() is not None:
        return None
    return tuple(torch.cuda.get_device_capability(index))


class CUDADeviceUtils(DeviceUtils):
    """torch.cuda events, synchronize and allocator peaks; the name carries the capability."""

    def __init__(self):
        super().__init__("cuda")

    def device_name(self) -> str:
        name = super().device_name()
        try:
            cc = compute_capability()
        except Exception:  # a name query must not crash a report
            cc = None
        return f"{name} (sm_{cc[0]}{cc[1]})" if cc else name


BACKEND = Backend(
    name="cuda",
    device_type="cuda",
    probe=_probe,
    dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64}),
    supports_float64=True,
    dist_backend="nccl",
    autocast_device_type="cuda",
    priority=20,
    utils_factory=CUDADeviceUtils,
    kernel_modules=("flux_npu.kernels.cuda",),
    description="NVIDIA GPUs: Triton fused kernels (RMSNorm, RoPE, QK-norm+RoPE, AdaLN), PyTorch SDPA (flash / cuDNN / efficient)",
    options=(
        ("min_compute_capability", MIN_COMPUTE_CAPABILITY),
        ("bf16_compute_capability", BF16_COMPUTE_CAPABILITY),
    ),
)
