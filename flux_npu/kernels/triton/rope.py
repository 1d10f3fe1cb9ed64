"""RoPE in Triton, Flux's adjacent-pair convention, with an optional fused RMSNorm prologue.

x's last dim holds D/2 pairs (x[2i], x[2i+1]); each pair is multiplied by a 2x2 matrix M:
    out0 = M00 x0 + M01 x1,   out1 = M10 x0 + M11 x1,
with M taken from either frequency form Flux code hands over:
  - BFL: rotation matrices (..., S, D/2, 2, 2) broadcast against x's leading dims; all four
    entries are read (no assumption that M is a rotation, exactly as the reference);
  - diffusers: (cos, sin), each (S, D) with values repeated per pair, x's sequence axis
    `sequence_dim`; M = [[c, -s], [s, c]] with c, s read at the pair's even column.
The frequencies are never copied or expanded in memory: broadcast dims get stride 0.

The backward is the same kernel shape with M transposed (dx = M^T dout); frequencies are
positions-derived constants and get no gradient (the registration declines freqs that require
grad, so the reference serves that rare case).

With NORM the row is first RMS-normalised (weight optional), rounded to x's dtype as unfused Flux
code does between its QK norm and RoPE, then rotated: `qk_norm_rope` reads q/k once and writes
them once instead of twice each. Its backward rotates the incoming gradient back and applies the
RMSNorm backward in the same program (see rms_norm.py for the maths).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._rows import row_offsets, row_tile


@triton.jit
def _rotation(F0, F1, foff, pairs, mask, fsp, fe0, fe1, COS_SIN: tl.constexpr):
    base = foff[:, None] + pairs[None, :] * fsp
    if COS_SIN:
        c = tl.load(F0 + base, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(F1 + base, mask=mask, other=0.0).to(tl.float32)
        return c, -s, s, c
    else:
        m00 = tl.load(F0 + base, mask=mask, other=0.0).to(tl.float32)
        m01 = tl.load(F0 + base + fe1, mask=mask, other=0.0).to(tl.float32)
        m10 = tl.load(F0 + base + fe0, mask=mask, other=0.0).to(tl.float32)
        m11 = tl.load(F0 + base + fe0 + fe1, mask=mask, other=0.0).to(tl.float32)
        return m00, m01, m10, m11


@triton.jit
def _rope_fwd(
    X, W, F0, F1, Y, n_rows, n_pairs, n1, n2, xs0, xs1, xs2, fs0, fs1, fs2, fsp, fe0, fe1, eps,
    COS_SIN: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, pairs, pmask, mask = row_tile(pid, n_rows, n_pairs, BLOCK_M, BLOCK_P)
    xptr = X + row_offsets(rows, n1, n2, xs0, xs1, xs2)[:, None] + 2 * pairs[None, :]
    x0 = tl.load(xptr, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(xptr + 1, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(x0 * x0, axis=1) + tl.sum(x1 * x1, axis=1)) / (2 * n_pairs) + eps)
        x0 = x0 * rstd[:, None]
        x1 = x1 * rstd[:, None]
        if HAS_W:
            x0 = x0 * tl.load(W + 2 * pairs, mask=pmask, other=0.0).to(tl.float32)[None, :]
            x1 = x1 * tl.load(W + 2 * pairs + 1, mask=pmask, other=0.0).to(tl.float32)[None, :]
        # unfused Flux rounds the normalised q/k to their dtype before RoPE: do the same
        x0 = x0.to(X.dtype.element_ty).to(tl.float32)
        x1 = x1.to(X.dtype.element_ty).to(tl.float32)
    foff = row_offsets(rows, n1, n2, fs0, fs1, fs2)
    m00, m01, m10, m11 = _rotation(F0, F1, foff, pairs, mask, fsp, fe0, fe1, COS_SIN)
    yptr = Y + rows[:, None] * (2 * n_pairs) + 2 * pairs[None, :]
    tl.store(yptr, (m00 * x0 + m01 * x1).to(Y.dtype.element_ty), mask=mask)
    tl.store(yptr + 1, (m10 * x0 + m11 * x1).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_bwd(
    X, W, F0, F1, DY, DX, DW, n_rows, n_pairs, n1, n2, xs0, xs1, xs2, fs0, fs1, fs2, fsp, fe0, fe1, eps,
    COS_SIN: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, pairs, pmask, mask = row_tile(pid, n_rows, n_pairs, BLOCK_M, BLOCK_P)
    dense = rows[:, None] * (2 * n_pairs) + 2 * pairs[None, :]
    d0 = tl.load(DY + dense, mask=mask, other=0.0).to(tl.float32)
    d1 = tl.load(DY + dense + 1, mask=mask, other=0.0).to(tl.float32)
    foff = row_offsets(rows, n1, n2, fs0, fs1, fs2)
    m00, m01, m10, m11 = _rotation(F0, F1, foff, pairs, mask, fsp, fe0, fe1, COS_SIN)
    g0 = m00 * d0 + m10 * d1  # M^T dout: the gradient w.r.t. the rotated input
    g1 = m01 * d0 + m11 * d1
    if NORM:
        xptr = X + row_offsets(rows, n1, n2, xs0, xs1, xs2)[:, None] + 2 * pairs[None, :]
        x0 = tl.load(xptr, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(xptr + 1, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(x0 * x0, axis=1) + tl.sum(x1 * x1, axis=1)) / (2 * n_pairs) + eps)
        h0 = x0 * rstd[:, None]
        h1 = x1 * rstd[:, None]
        if HAS_W:
            w0 = tl.load(W + 2 * pairs, mask=pmask, other=0.0).to(tl.float32)
            w1 = tl.load(W + 2 * pairs + 1, mask=pmask, other=0.0).to(tl.float32)
            tl.store(DW + pid * (2 * n_pairs) + 2 * pairs, tl.sum(g0 * h0, axis=0), mask=pmask)
            tl.store(DW + pid * (2 * n_pairs) + 2 * pairs + 1, tl.sum(g1 * h1, axis=0), mask=pmask)
            g0 = g0 * w0[None, :]
            g1 = g1 * w1[None, :]
        c = (tl.sum(g0 * h0, axis=1) + tl.sum(g1 * h1, axis=1)) / (2 * n_pairs)
        g0 = rstd[:, None] * (g0 - h0 * c[:, None])
        g1 = rstd[:, None] * (g1 - h1 * c[:, None])
    tl.store(DX + dense, g0.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + dense + 1, g1.to(DX.dtype.element_ty), mask=mask)


def freq_layout(x4: torch.Tensor, freqs, sequence_dim: int):
    """(F0, F1, (fs0, fs1, fs2, fsp, fe0, fe1), cos_sin) for a 4-D x, without copying freqs."""
    if isinstance(freqs, torch.Tensor):
        n_pairs = x4.shape[-1] // 2
        f = freqs
        while f.dim() < 6:  # (n0, n1, n2, D/2, 2, 2), broadcast dims get stride 0 below
            f = f.unsqueeze(0)
        f = f.expand(*x4.shape[:-1], n_pairs, 2, 2)
        return f, f, (f.stride(0), f.stride(1), f.stride(2), f.stride(3), f.stride(4), f.stride(5)), False
    cos, sin = freqs
    shape = [1] * 4
    shape[sequence_dim] = cos.shape[0]
    shape[-1] = cos.shape[-1]
    # (S, D) -> x's 4-D shape with stride 0 on batch and heads; one set of strides serves both,
    # so cos and sin must share them (they do when built together; else both are made contiguous)
    c, s = cos.reshape(shape).expand(x4.shape), sin.reshape(shape).expand(x4.shape)
    if c.stride() != s.stride():
        c = cos.contiguous().reshape(shape).expand(x4.shape)
        s = sin.contiguous().reshape(shape).expand(x4.shape)
    return c, s, (c.stride(0), c.stride(1), c.stride(2), 2 * c.stride(3), 0, 0), True


def _grid(shape):
    n_pairs = shape[-1] // 2
    n_rows = shape[0] * shape[1] * shape[2]
    bm, bp = _utils.block_sizes(n_pairs, n_rows)
    bm = max(1, min(bm, _utils.TILE // (2 * bp)))
    return n_rows, n_pairs, bm, bp, (triton.cdiv(n_rows, bm),)


class RopeFunction(torch.autograd.Function):
    """x (4-D, last dim stride 1) -> RoPE(x) or RoPE(RMSNorm(x) * weight) when norm."""

    @staticmethod
    def forward(ctx, x4, weight, f0, f1, fstrides, cos_sin, norm, eps):
        n_rows, n_pairs, bm, bp, grid = _grid(x4.shape)
        y = _utils.empty(x4.shape, x4.dtype, x4.device)
        _rope_fwd[grid](
            x4, weight if weight is not None else x4, f0, f1, y, n_rows, n_pairs, x4.shape[1], x4.shape[2],
            *_utils.row_args(x4), *fstrides, eps,
            COS_SIN=cos_sin, NORM=norm, HAS_W=weight is not None, BLOCK_M=bm, BLOCK_P=bp,
            num_warps=_utils.num_warps_for(2 * bm * bp),
        )
        ctx.save_for_backward(x4 if norm else None, weight, f0, f1)
        ctx.args = (fstrides, cos_sin, norm, eps, x4.shape, x4.stride(), x4.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x4, weight, f0, f1 = ctx.saved_tensors
        fstrides, cos_sin, norm, eps, shape, stride, dtype = ctx.args
        dy = dy.contiguous()
        xs = x4 if x4 is not None else dy  # X is read only with NORM
        n_rows, n_pairs, bm, bp, grid = _grid(shape)
        dx = _utils.empty(shape, dtype, dy.device)
        has_w = norm and weight is not None
        dw_part = _utils.empty((grid[0], 2 * n_pairs), torch.float32, dy.device) if has_w else dx
        _rope_bwd[grid](
            xs, weight if has_w else xs, f0, f1, dy, dx, dw_part, n_rows, n_pairs, shape[1], shape[2],
            *stride[:3], *fstrides, eps,
            COS_SIN=cos_sin, NORM=norm, HAS_W=has_w, BLOCK_M=bm, BLOCK_P=bp,
            num_warps=_utils.num_warps_for(2 * bm * bp),
        )
        dw = dw_part.sum(0).to(weight.dtype) if has_w and ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None, None, None, None


def _run(x, weight, freqs, sequence_dim, norm, eps):
    if x.dim() > 4:
        raise ValueError(f"triton rope takes at most 4-D x, got {x.dim()}-D")
    lead = 4 - x.dim()
    x4 = _utils.last_dim_unit(_utils.as_4d(x))
    seq = sequence_dim + lead
    f0, f1, fstrides, cos_sin = freq_layout(x4, freqs, seq)
    y = RopeFunction.apply(x4, weight, f0, f1, fstrides, cos_sin, norm, float(eps))
    return y.view(x.shape)


def apply_rope(x: torch.Tensor, freqs, sequence_dim: int = 2) -> torch.Tensor:
    """Rotate adjacent pairs of x's last dim (float32 maths, output x.dtype); freqs as
    `flux_npu.ops.reference.apply_rope`. Differentiable in x."""
    return _run(x, None, freqs, sequence_dim, False, 0.0)


def norm_rope(x: torch.Tensor, weight, freqs, eps: float = 1e-6, sequence_dim: int = 2) -> torch.Tensor:
    """RoPE(RMSNorm(x) * weight) in one pass; differentiable in x and weight."""
    return _run(x, weight, freqs, sequence_dim, True, eps)
