"""NPU RMSNorm: torch_npu.npu_rms_norm(x, gamma, epsilon=eps) -> (y, rstd); we take y.

The shipped docstring requires gamma in x's dtype, so gamma is cast to it (a differentiable cast:
the weight still gets its gradient); the result is then cast to `out_dtype` when asked (the BFL
RMSNorm returns promote(x, scale)). One rounding instead of the BFL code's two: about one bf16
ulp of difference, inside the bf16 tolerance. No weight: a ones gamma. Input 2..8-D.
"""

from __future__ import annotations

import torch

from ...backends.npu import soc_declines
from ...ops.registry import register_kernel
from ._support import dtype_declines, prelude, torch_npu


def _check(backend, x, weight, eps, out_dtype):
    why = prelude(backend, "npu_rms_norm", x, weight)
    if why:
        return why
    why = dtype_declines(x, weight)
    if why:
        return why
    if not 2 <= x.dim() <= 8:
        return f"{x.dim()}-D input (npu_rms_norm takes 2..8 dims)"
    return soc_declines(x.dtype)


@register_kernel("rms_norm", "npu", "torch_npu.npu_rms_norm", check=_check)
def rms_norm(backend, x, weight, eps, out_dtype):
    """torch_npu.npu_rms_norm(x, gamma in x's dtype, epsilon=eps)[0], cast to out_dtype."""
    if weight is None:
        gamma = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    else:
        gamma = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    y = torch_npu().npu_rms_norm(x, gamma, epsilon=float(eps))[0]
    out = out_dtype or x.dtype
    return y if y.dtype == out else y.to(out)
