"""The Ascend NPU backend: torch_npu fused ops, hccl, autocast 'npu', no float64.

torch_npu is imported only by the probe and by the kernels, never at flux_npu import time.
"""

import importlib

import torch

from .base import Backend, DeviceUtils


def _import_torch_npu():
    """Import torch_npu; return (module, None) or (None, reason)."""
    try:
        return importlib.import_module("torch_npu"), None
    except BaseException as exc:  # CANN missing surfaces as ImportError, OSError or RuntimeError
        return None, f"torch_npu not importable: {type(exc).__name__}: {exc}"


def _probe():
    mod, reason = _import_torch_npu()
    if mod is None:
        return reason
    npu = getattr(torch, "npu", None)
    if npu is None:
        return "torch_npu imported but torch.npu is missing"
    if not npu.is_available():
        return "torch_npu imported but torch.npu.is_available() is False (no NPU device visible)"
    return None


BACKEND = Backend(
    name="npu",
    device_type="npu",
    probe=_probe,
    dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
    supports_float64=False,
    dist_backend="hccl",
    autocast_device_type="npu",
    priority=10,
    utils_factory=lambda: DeviceUtils("npu"),
    kernel_modules=("flux_npu.kernels.npu",),
    description="Ascend NPUs through torch_npu (npu_fusion_attention, npu_rotary_mul, npu_rms_norm)",
)
