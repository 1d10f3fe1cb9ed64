"""AdaLN modulation in Triton: y = LayerNorm(x) * (1 + scale) + shift, LayerNorm without affine.

Flux's AdaLayerNormZero / Single / Continuous compute this on (B, S, D) activations with shift and
scale of shape (B, 1, D) (chunks of one projection, so strided views). Unfused it is four passes
over x (layer_norm, mul, add, add) plus temporaries; here it is one read of x and one write of y.

Broadcast handled: x seen as (G, L, D) where shift/scale are constant along L, i.e. shift/scale
leading dims equal x's for a prefix (G = their product) and are 1 after it: (B, 1, D), (D,),
(1, 1, D) and the full (B, S, D) are all of this form. Any other broadcast is declined by the
registration (`group_split` returns None) and served by the reference.

Backward, with xhat = (x - mean) * rstd and dxh = dy * (1 + scale):
    dx = rstd * (dxh - mean(dxh) - xhat * mean(dxh * xhat)),
    dshift = sum_L(dy),  dscale = sum_L(dy * xhat).
The L reductions are float32 partial sums per program (grid axis 1), summed by torch afterwards:
deterministic, no atomics.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..cuda._checks import group_split
from . import _utils
from ._rows import row_tile


@triton.jit
def _ln_mod_fwd(
    X, SH, SC, Y, L, n_cols, xsg, xsl, shg, scg, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    rows, cols, cmask, mask = row_tile(pid, L, n_cols, BLOCK_M, BLOCK_N)
    x = tl.load(X + g * xsg + rows[:, None] * xsl + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    xhat = xc * rstd[:, None]
    sh = tl.load(SH + g * shg + cols, mask=cmask, other=0.0).to(tl.float32)
    sc = tl.load(SC + g * scg + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xhat * (1.0 + sc[None, :]) + sh[None, :]
    tl.store(Y + (g * L + rows[:, None]) * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _ln_mod_bwd(
    X, SC, DY, DX, DSH, DSC, L, n_cols, n_blocks, xsg, xsl, scg, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    rows, cols, cmask, mask = row_tile(pid, L, n_cols, BLOCK_M, BLOCK_N)
    x = tl.load(X + g * xsg + rows[:, None] * xsl + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dense = (g * L + rows[:, None]) * n_cols + cols[None, :]
    dy = tl.load(DY + dense, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    xhat = xc * rstd[:, None]
    part = (g * n_blocks + pid) * n_cols + cols
    tl.store(DSH + part, tl.sum(dy, axis=0), mask=cmask)
    tl.store(DSC + part, tl.sum(dy * xhat, axis=0), mask=cmask)
    sc = tl.load(SC + g * scg + cols, mask=cmask, other=0.0).to(tl.float32)
    dxh = dy * (1.0 + sc[None, :])
    c1 = tl.sum(dxh, axis=1) / n_cols
    c2 = tl.sum(dxh * xhat, axis=1) / n_cols
    dx = rstd[:, None] * (dxh - c1[:, None] - xhat * c2[:, None])
    tl.store(DX + dense, dx.to(DX.dtype.element_ty), mask=mask)


def _blocks(n_cols, L):
    bm, bn = _utils.block_sizes(n_cols, L)
    return bm, bn, triton.cdiv(L, bm)


class LayerNormModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x3, shift2, scale2, eps):
        G, L, N = x3.shape
        bm, bn, nb = _blocks(N, L)
        y = _utils.empty((G, L, N), x3.dtype, x3.device)
        _ln_mod_fwd[(G, nb)](
            x3, shift2, scale2, y, L, N, x3.stride(0), x3.stride(1), shift2.stride(0), scale2.stride(0), eps,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=_utils.num_warps_for(bm * bn),
        )
        ctx.save_for_backward(x3, scale2)
        ctx.eps, ctx.dtypes = eps, (shift2.dtype, scale2.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x3, scale2 = ctx.saved_tensors
        G, L, N = x3.shape
        bm, bn, nb = _blocks(N, L)
        dx = _utils.empty((G, L, N), x3.dtype, x3.device)
        dsh = _utils.empty((G, nb, N), torch.float32, x3.device)
        dsc = _utils.empty((G, nb, N), torch.float32, x3.device)
        _ln_mod_bwd[(G, nb)](
            x3, scale2, dy.contiguous(), dx, dsh, dsc, L, N, nb, x3.stride(0), x3.stride(1), scale2.stride(0), ctx.eps,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=_utils.num_warps_for(bm * bn),
        )
        sh_dt, sc_dt = ctx.dtypes
        return dx, dsh.sum(1).to(sh_dt), dsc.sum(1).to(sc_dt), None


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(1 + scale) * LayerNorm(x) + shift over the last dim (float32 maths, output x.dtype).
    shift/scale: (G..., 1..., D) against x (G..., L..., D), e.g. (B, 1, D) for (B, S, D).
    Differentiable in x, shift and scale."""
    k_sh, k_sc = group_split(x.shape, shift.shape), group_split(x.shape, scale.shape)
    if k_sh is None or k_sh != k_sc:
        raise ValueError(
            f"triton layer_norm_modulate: shift {tuple(shift.shape)} / scale {tuple(scale.shape)} must vary "
            f"along the same leading dims of x {tuple(x.shape)} and be constant after them"
        )
    N = x.shape[-1]
    G = math.prod(x.shape[:k_sh])
    L = math.prod(x.shape[k_sh:-1])
    x3 = _utils.last_dim_unit(x.reshape(G, L, N))
    sh2 = _utils.last_dim_unit(shift.reshape(G, N))
    sc2 = _utils.last_dim_unit(scale.reshape(G, N))
    y = LayerNormModulateFunction.apply(x3, sh2, sc2, float(eps))
    return y.view(x.shape)
