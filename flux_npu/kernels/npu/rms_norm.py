"""NPU RMSNorm: torch_npu.npu_rms_norm(x, gamma, epsilon=eps) -> (y, rstd); we take y.

The shipped docstring (torch_npu 2.14.0) requires gamma in x's dtype, so gamma is cast to it; the
result is then cast to `out_dtype` when asked (the BFL RMSNorm returns promote(x, scale)). One
rounding instead of the BFL code's two: about one bf16 ulp of difference, inside the bf16
tolerance. No weight: a ones gamma. Input 2..8-D.

A float32 weight with a half x (full fine-tuning of Flux's QK norms, whose scales stay float32):
letting autograd differentiate through `weight.to(x.dtype)` would round the weight gradient to
bf16 on its way back. `npu_rms_norm_backward` returns dgamma in float32 (its meta registration,
2.14.0), but autograd casts a gradient to the dtype of the input it belongs to (the bf16 gamma),
and the cast's backward only widens that rounded value again. The references (BFL, diffusers,
ours) form the product in float32 and have no such rounding. So here the op gets a detached bf16
gamma (x's gradient still comes from the op's own backward) and the weight's gradient is formed
from the op's rstd in float32, sum(dy * x * rstd) over the leading dims: one extra reduction in
the backward, no rounding of dgamma.
"""

from __future__ import annotations

import torch

from ...backends.npu import soc_declines
from ...ops.registry import register_kernel
from ._support import TORCH_NPU, torch_npu

CAPS = TORCH_NPU.using(vendor_op="npu_rms_norm")


def _check(backend, x, weight, eps, out_dtype):
    why = CAPS.reason(backend, x, weight)
    if why:
        return why
    if not 2 <= x.dim() <= 8:
        return f"{x.dim()}-D input (npu_rms_norm takes 2..8 dims)"
    return soc_declines(x.dtype)


class _WideGammaGrad(torch.autograd.Function):
    """Identity on y in the forward; in the backward, y's gradient passes through unchanged (to
    the op's own backward, which gives x its gradient) and `weight` (wider than x) gets
    sum(dy * x * rstd) computed in float32 and returned in its own dtype."""

    @staticmethod
    def forward(ctx, y, x, rstd, weight):
        ctx.save_for_backward(x, rstd)
        ctx.weight_dim = weight.dim()
        ctx.weight_dtype = weight.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        x, rstd = ctx.saved_tensors
        g = dy.float() * x.float() * rstd
        dw = g.sum(dim=tuple(range(g.dim() - ctx.weight_dim))) if g.dim() > ctx.weight_dim else g
        return dy, None, None, dw.to(ctx.weight_dtype)


@register_kernel("rms_norm", "npu", "torch_npu.npu_rms_norm", check=_check, caps=CAPS)
def rms_norm(backend, x, weight, eps, out_dtype):
    """torch_npu.npu_rms_norm(x, gamma in x's dtype, epsilon=eps)[0], cast to out_dtype; a
    weight wider than x gets its gradient in float32 (see the module docstring)."""
    op = torch_npu().npu_rms_norm
    out = out_dtype or x.dtype
    if weight is not None and weight.dtype != x.dtype and weight.requires_grad and torch.is_grad_enabled():
        y, rstd = op(x, weight.detach().to(x.dtype), epsilon=float(eps))
        # after the cast to out_dtype, so a float32 output's gradient reaches dgamma unrounded
        return _WideGammaGrad.apply(y if y.dtype == out else y.to(out), x.detach(), rstd.detach(), weight)
    if weight is None:
        gamma = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    else:
        gamma = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    y = op(x, gamma, epsilon=float(eps))[0]
    return y if y.dtype == out else y.to(out)
