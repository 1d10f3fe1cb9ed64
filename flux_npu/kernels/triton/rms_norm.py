"""RMSNorm in Triton: y = x * rsqrt(mean(x^2) + eps) * weight over the last dim.

One program normalises BLOCK_M rows of BLOCK_N (>= row length) columns held in registers, in
float32, and rounds once to the output dtype. The backward recomputes the row's rstd from x (one
extra reduction over data already loaded) instead of saving it, and reduces the weight gradient
in two steps: a float32 partial sum per program, then one torch sum over programs, which is
deterministic (no atomics) and accurate (float32 throughout).

Maths of the backward, with xhat = x * rstd and g = dy * w:
    dx = rstd * (g - xhat * mean(g * xhat)),   dw = sum_rows(dy * xhat).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._rows import row_offsets, row_tile


@triton.jit
def _rms_norm_fwd(
    X, W, Y, n_rows, n_cols, n1, n2, xs0, xs1, xs2, eps,
    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, cols, cmask, mask = row_tile(pid, n_rows, n_cols, BLOCK_M, BLOCK_N)
    xoff = row_offsets(rows, n1, n2, xs0, xs1, xs2)
    x = tl.load(X + xoff[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    tl.store(Y + rows[:, None] * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(
    X, W, DY, DX, DW, n_rows, n_cols, n1, n2, xs0, xs1, xs2, eps,
    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, cols, cmask, mask = row_tile(pid, n_rows, n_cols, BLOCK_M, BLOCK_N)
    xoff = row_offsets(rows, n1, n2, xs0, xs1, xs2)
    x = tl.load(X + xoff[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dense = rows[:, None] * n_cols + cols[None, :]
    dy = tl.load(DY + dense, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    xhat = x * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        g = dy * w[None, :]
        tl.store(DW + pid * n_cols + cols, tl.sum(dy * xhat, axis=0), mask=cmask)
    else:
        g = dy
    c = tl.sum(g * xhat, axis=1) / n_cols
    dx = rstd[:, None] * (g - xhat * c[:, None])
    tl.store(DX + dense, dx.to(DX.dtype.element_ty), mask=mask)


def _launch_fwd(x4, weight, eps, out_dtype):
    n_cols = x4.shape[-1]
    n_rows = x4.numel() // n_cols
    y = _utils.empty(x4.shape, out_dtype, x4.device)
    bm, bn = _utils.block_sizes(n_cols, n_rows)
    grid = (triton.cdiv(n_rows, bm),)
    _rms_norm_fwd[grid](
        x4, weight if weight is not None else x4, y, n_rows, n_cols, x4.shape[1], x4.shape[2],
        *_utils.row_args(x4), eps,
        HAS_W=weight is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=_utils.num_warps_for(bm * bn),
    )
    return y


def _launch_bwd(x4, weight, dy, eps, need_dw):
    n_cols = x4.shape[-1]
    n_rows = x4.numel() // n_cols
    bm, bn = _utils.block_sizes(n_cols, n_rows)
    grid = (triton.cdiv(n_rows, bm),)
    dx = _utils.empty(x4.shape, x4.dtype, x4.device)
    has_w = weight is not None
    dw_part = _utils.empty((grid[0], n_cols), torch.float32, x4.device) if has_w else dx
    _rms_norm_bwd[grid](
        x4, weight if has_w else x4, dy.contiguous(), dx, dw_part, n_rows, n_cols, x4.shape[1], x4.shape[2],
        *_utils.row_args(x4), eps,
        HAS_W=has_w, BLOCK_M=bm, BLOCK_N=bn, num_warps=_utils.num_warps_for(bm * bn),
    )
    dw = dw_part.sum(0).to(weight.dtype) if has_w and need_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        x4 = _utils.last_dim_unit(_utils.as_4d(x))
        y = _launch_fwd(x4, weight, eps, out_dtype or x.dtype)
        ctx.save_for_backward(x4, weight)
        ctx.eps, ctx.shape = eps, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x4, weight = ctx.saved_tensors
        dx, dw = _launch_bwd(x4, weight, dy.reshape(x4.shape), ctx.eps, ctx.needs_input_grad[1])
        return dx.view(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight=None, eps: float = 1e-6, out_dtype=None) -> torch.Tensor:
    """RMSNorm over the last dim (float32 maths, one rounding to `out_dtype` or x.dtype).
    weight: (N,) or None. Differentiable in x and weight."""
    return RMSNormFunction.apply(x, weight, float(eps), out_dtype)
