"""CPU RMSNorm.

Inference (no autograd graph): one float32 copy of x (none for float32 input), its row norms by
`torch.linalg.vector_norm` (a vectorised reduction, no x**2 temporary), then the scaling by rstd
and by the weight in place on that copy and one rounding to the output dtype: four passes over
the data against six or seven for `F.rms_norm` / the BFL expression on CPU, and faster than both
at Flux shapes (docs/PERFORMANCE.md, "Per-op").

Training (a graph is recorded): `F.rms_norm`, as before. vector_norm's backward gave wrong
gradients inside a T5 encoder here (torch 2.13 CPU; right on the same inputs in isolation,
tests/test_patch_models.py::test_t5_encoder caught it), so it is kept off the autograd path.

Small inputs (under SMALL_NUMEL elements) take `F.rms_norm` too: one ATen call costs less host
time than the four passes' seven calls when the data is a few kilobytes.

Numerics are the reference's either way: float32 maths (float64 for float64), one rounding.
"""

import torch
import torch.nn.functional as F

from ...ops.precision import compute_dtype
from ...ops.registry import register_kernel
from .._common import foreign_device

SMALL_NUMEL = 1 << 16


def _check(backend, x, weight, eps, out_dtype):
    return foreign_device(backend, x, weight)


def _rms_norm_autograd(x, weight, eps, out):
    if weight is not None and weight.dtype != x.dtype:
        # Mixed dtypes defeat the fused path: normalise in float32 (float64 if either is) and round
        # once, as the reference.
        cd = compute_dtype(torch.promote_types(x.dtype, weight.dtype))
        return F.rms_norm(x.to(cd), (x.shape[-1],), weight.to(cd), eps).to(out)
    y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    return y if y.dtype == out else y.to(out)


@register_kernel("rms_norm", "cpu", "torch.rms_norm", check=_check)
def rms_norm(backend, x, weight, eps, out_dtype):
    """Inference: vector_norm (float32 accumulation), x * rstd * weight, one rounding.
    Training: torch.nn.functional.rms_norm."""
    out = out_dtype or x.dtype
    if x.numel() < SMALL_NUMEL or (
        torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    ):
        return _rms_norm_autograd(x, weight, eps, out)
    xf = x.to(compute_dtype(x.dtype))
    ss = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    rstd = ss.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    y = xf.mul_(rstd) if xf is not x else xf * rstd  # the upcast copy is ours to overwrite
    if weight is not None:
        y.mul_(weight)
    return y if y.dtype == out else y.to(out)
