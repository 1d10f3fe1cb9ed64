"""CPU RMSNorm: torch.nn.functional.rms_norm (a fused kernel when x and weight share a dtype)."""

import torch
import torch.nn.functional as F

from ...ops.registry import register_kernel
from .._common import foreign_device


def _check(backend, x, weight, eps, out_dtype):
    return foreign_device(backend, x, weight)


@register_kernel("rms_norm", "cpu", "torch.rms_norm", check=_check)
def rms_norm(backend, x, weight, eps, out_dtype):
    """torch.nn.functional.rms_norm, float32 when x and weight dtypes differ."""
    out = out_dtype or x.dtype
    if weight is not None and weight.dtype != x.dtype:
        # Mixed dtypes defeat the fused path: normalise in float32 and round once, as the reference.
        return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(out)
    y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    return y if y.dtype == out else y.to(out)
