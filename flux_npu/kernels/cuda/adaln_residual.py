"""Fused gated residual + AdaLN on CUDA in Triton: h = x + gate * y, n = LayerNorm(h) * (1 + scale) + shift.

Flux's double-stream blocks do exactly this between attention and the feed-forward:
`hidden_states = hidden_states + gate_msa * attn_output`, then `norm2` and the `(1 + scale_mlp)`,
`+ shift_mlp` modulation. Unfused that is an addcmul (read x, y; write h) and an AdaLN (read h;
write n); here one kernel reads x and y once and writes h and n. It serves the op
`adaln_residual(x, gate, y, shift, scale, eps) -> (h, n)`, which the source rewrite routes Flux's
double-stream blocks to (`flux_npu/patches/rewrite.py`).

Numerics as the unfused code: h is computed in float32 and rounded to x's dtype, and the
LayerNorm reads the rounded h (what the next op of unfused code sees); corrected-mean centring as
`layer_norm_modulate.py`, whose row helpers (`ln_rows`, `ln_mod_rows_bwd`, `group_view`) both
kernels share. gate, shift and scale vary along the same leading dims of x and are
constant after them ((B, 1, D) against (B, S, D)); y has x's shape (any strides).

Backward, with dn the gradient of n and dh that of h: the LayerNorm backward gives dh_ln (as in
`layer_norm_modulate.py`), dh_total = dh + dh_ln, then dx = dh_total, dy = dh_total * gate,
dgate = sum_L(dh_total * y), dshift = sum_L(dn), dscale = sum_L(dn * hhat); the three L
reductions on a persistent grid with one float32 partial row per program. h is the saved output,
not recomputed.
"""

from __future__ import annotations

import torch

from ...ops.registry import register_kernel
from . import _triton as T
from ._checks import TRITON, row_reason, triton_reason
from ._triton import jit, row_tile, tl
from .layer_norm_modulate import group_reason, group_view, ln_mod_rows_bwd, ln_rows


@jit
def _adaln_res_fwd(
    X, G, Yin, SH, SC, H, N, n_rows, n_cols, xsg, xsl, ysg, ysl, gsg, shg, scg, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    rows, cols, cmask, mask = row_tile(tl.program_id(1), n_rows, n_cols, BLOCK_M, BLOCK_N)
    x = tl.load(X + g * xsg + rows[:, None] * xsl + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Yin + g * ysg + rows[:, None] * ysl + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(G + g * gsg + cols, mask=cmask, other=0.0).to(tl.float32)
    # unfused code stores h in x's dtype and normalises what it stored: round here too
    h = (x + gate[None, :] * y).to(H.dtype.element_ty)
    dense = (g * n_rows + rows[:, None]) * n_cols + cols[None, :]
    tl.store(H + dense, h, mask=mask)
    hhat, _ = ln_rows(h.to(tl.float32), mask, n_cols, eps)
    sh = tl.load(SH + g * shg + cols, mask=cmask, other=0.0).to(tl.float32)
    sc = tl.load(SC + g * scg + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(N + dense, (hhat * (1.0 + sc[None, :]) + sh[None, :]).to(N.dtype.element_ty), mask=mask)


@jit
def _bwd_block(H, Yin, DH, DN, g, blk, cols, n_rows, n_cols, ysg, ysl, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """h, dn, dh (dense) and y (strided rows) of row block `blk` of group g, in their own dtypes."""
    rows, _, _, mask = row_tile(blk, n_rows, n_cols, BLOCK_M, BLOCK_N)
    dense = (g * n_rows + rows[:, None]) * n_cols + cols[None, :]
    h = tl.load(H + dense, mask=mask, other=0.0)
    dn = tl.load(DN + dense, mask=mask, other=0.0)
    dh = tl.load(DH + dense, mask=mask, other=0.0)
    y = tl.load(Yin + g * ysg + rows[:, None] * ysl + cols[None, :], mask=mask, other=0.0)
    return h, dn, dh, y


@jit
def _adaln_res_bwd(
    H, Yin, G, SC, DH, DN, DX, DY, DG, DSH, DSC, n_rows, n_cols, n_blocks, ysg, ysl, gsg, scg, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    programs = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    gate = tl.load(G + g * gsg + cols, mask=cmask, other=0.0).to(tl.float32)
    sc = tl.load(SC + g * scg + cols, mask=cmask, other=0.0).to(tl.float32)
    dg = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dsh = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dsc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # all four loads of a block are issued before any reduction (one DRAM round trip per block, not
    # three), and, as rms_norm's backward, one block ahead: the next block's loads (in their own
    # dtype, half the registers of float32) are in flight while this one is reduced and stored
    blk = pid
    h_raw, dn_raw, dh_raw, y_raw = _bwd_block(H, Yin, DH, DN, g, blk, cols, n_rows, n_cols, ysg, ysl, BLOCK_M, BLOCK_N)
    while blk < n_blocks:  # one partial row per program (see _triton.py: a while loop, not range())
        h_next, dn_next, dh_next, y_next = _bwd_block(H, Yin, DH, DN, g, blk + programs, cols, n_rows, n_cols,
                                                      ysg, ysl, BLOCK_M, BLOCK_N)
        rows, _, _, mask = row_tile(blk, n_rows, n_cols, BLOCK_M, BLOCK_N)
        dense = (g * n_rows + rows[:, None]) * n_cols + cols[None, :]
        h = h_raw.to(tl.float32)
        dn = dn_raw.to(tl.float32)
        dh = dh_raw.to(tl.float32)
        y = y_raw.to(tl.float32)
        h_raw, dn_raw, dh_raw, y_raw = h_next, dn_next, dh_next, y_next
        hhat, rstd = ln_rows(h, mask, n_cols, eps)
        dsh += tl.sum(dn, axis=0)
        dsc += tl.sum(dn * hhat, axis=0)
        dht = ln_mod_rows_bwd(dn, hhat, rstd, sc, n_cols) + dh
        tl.store(DX + dense, dht.to(DX.dtype.element_ty), mask=mask)
        tl.store(DY + dense, (dht * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
        dg += tl.sum(dht * y, axis=0)
        blk += programs
    part = (g * programs + pid) * n_cols + cols
    tl.store(DG + part, dg, mask=cmask)
    tl.store(DSH + part, dsh, mask=cmask)
    tl.store(DSC + part, dsc, mask=cmask)


class AdaLNResidualFunction(torch.autograd.Function):
    """Eager gated residual + AdaLN: `forward` is the launcher (ops.adaln_residual -> dispatch ->
    apply -> forward)."""

    @staticmethod
    def forward(ctx, backend, x, gate, y, shift, scale, eps):
        """x, y (G..., L..., N); gate, shift, scale (G..., 1..., N). ctx None: the custom op's launcher,
        which passes x, y (G, L, N) and gate, shift, scale (G, N) with unit last-dim strides."""
        if ctx is None:
            x3, y3, g2, sh2, sc2 = x, y, gate, shift, scale
        else:
            (x3, y3), (g2, sh2, sc2) = group_view(x, rows=(y,), mods=(gate, shift, scale), op="adaln_residual")
        Gn, L, N = x3.shape
        bm, bn, nb = T.row_blocks(N, L)
        h = T.empty(x.shape, x.dtype, x.device)
        n = T.empty(x.shape, x.dtype, x.device)
        eps = float(eps)
        T.launch(_adaln_res_fwd)[(Gn, nb)](
            x3, g2, y3, sh2, sc2, h, n, L, N, x3.stride(0), x3.stride(1), y3.stride(0), y3.stride(1),
            g2.stride(0), sh2.stride(0), sc2.stride(0), eps,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=T.num_warps_for(bm * bn),
        )
        if ctx is not None:
            ctx.save_for_backward(h, y3, g2, sh2, sc2)
            ctx.eps, ctx.shapes = eps, (gate.shape, shift.shape, scale.shape)
        return h, n

    @staticmethod
    def backward(ctx, dh, dn):
        h, y3, g2, sh2, sc2 = ctx.saved_tensors
        Gn, _, N = y3.shape
        dx, dg, dy, dsh, dsc = _bwd(h.view(Gn, -1, N), y3, g2, sh2, sc2, dh, dn, ctx.eps)
        gs, shs, scs = ctx.shapes
        return None, dx.view(h.shape), dg.view(gs), dy.view(h.shape), dsh.view(shs), dsc.view(scs), None


def _fwd(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The custom op's launcher: x, y (G, L, N) with unit last-dim stride; gate, shift, scale (G, N).
    Dense (h, n) in x's dtype."""
    return AdaLNResidualFunction.forward(None, None, x, gate, y, shift, scale, eps)


def _fwd_fake(x, gate, y, shift, scale, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


# Programs per SM of the backward's persistent grid (see _triton.persistent_programs): one. A 3072
# row on 16 warps with h, dn, dh and y in flight compiles to 109 (triton 3.9) / 122 (3.6) registers
# a thread on sm_90: one 16-warp program fits an SM.
BWD_PROGRAMS_PER_SM = 1


def _bwd(
    h: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    dh: torch.Tensor, dn: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dgate, dy, dshift, dscale) in the dtypes of x (= h), gate, y, shift, scale."""
    Gn, L, N = h.shape
    bm, bn, nb = T.row_blocks(N, L, T.BWD_TILE)
    programs = T.persistent_programs(h.device, nb, BWD_PROGRAMS_PER_SM, groups=Gn)
    dx = T.empty((Gn, L, N), h.dtype, h.device)
    dy = T.empty((Gn, L, N), y.dtype, h.device)
    dg, dsh, dsc = (T.empty((Gn, programs, N), torch.float32, h.device) for _ in range(3))
    T.launch(_adaln_res_bwd)[(Gn, programs)](
        h, y, gate, scale, dh.contiguous(), dn.contiguous(), dx, dy, dg, dsh, dsc, L, N, nb,
        y.stride(0), y.stride(1), gate.stride(0), scale.stride(0), eps,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=T.bwd_warps(bm * bn),
    )
    return dx, dg.sum(1).to(gate.dtype), dy, dsh.sum(1).to(shift.dtype), dsc.sum(1).to(scale.dtype)


def _bwd_fake(h, y, gate, shift, scale, dh, dn, eps):
    return (
        h.new_empty(h.shape), gate.new_empty(gate.shape), y.new_empty(h.shape),
        shift.new_empty(shift.shape), scale.new_empty(scale.shape),
    )


def _setup(ctx, inputs, output):
    x, gate, y, shift, scale, eps = inputs
    ctx.save_for_backward(output[0], y, gate, shift, scale)
    ctx.eps = eps


def _backward(ctx, dh, dn):
    h, y, gate, shift, scale = ctx.saved_tensors
    dx, dg, dy, dsh, dsc = ctx.bwd(h, y, gate, shift, scale, dh, dn, ctx.eps)
    return dx, dg, dy, dsh, dsc, None


_ADALN_RES = T.TritonOp(
    "adaln_residual", _fwd, _adaln_res_fwd, _fwd_fake, _bwd, _adaln_res_bwd, _bwd_fake, _setup, _backward,
)
adaln_residual_op, adaln_residual_bwd_op = _ADALN_RES.op, _ADALN_RES.bwd_op


def adaln_residual(x, gate, y, shift, scale, eps: float = 1e-6):
    """(x + gate * y, (1 + scale) * LayerNorm(x + gate * y) + shift), both in x's dtype, in one
    pass; differentiable in all five tensors. Under torch.compile: the custom op."""
    why = reason(x, gate, y, shift, scale)
    if why:
        raise ValueError(f"triton adaln_residual: {why}")
    if torch.compiler.is_compiling():
        (x3, y3), (g2, sh2, sc2) = group_view(x, rows=(y,), mods=(gate, shift, scale), op="adaln_residual")
        h, n = adaln_residual_op(x3, g2, y3, sh2, sc2, float(eps))
        return h.view(x.shape), n.view(x.shape)
    return AdaLNResidualFunction.apply(None, x, gate, y, shift, scale, eps)


def reason(x, gate, y, shift, scale) -> str | None:
    """Shape rules of the kernel (None when it takes the input)."""
    if tuple(y.shape) != tuple(x.shape):
        return f"y {tuple(y.shape)} must have x's shape {tuple(x.shape)}"
    return group_reason(x, gate=gate, shift=shift, scale=scale)


def check(backend, x, gate, y, shift, scale, eps):
    return (
        triton_reason(backend, x, gate, y, shift, scale) or row_reason(x.shape[-1])
        or reason(x, gate, y, shift, scale)
    )


def _traced(backend, x, gate, y, shift, scale, eps):
    return adaln_residual(x, gate, y, shift, scale, eps)


register_kernel(
    "adaln_residual", "cuda", "triton.adaln_residual", check=check, traced=_traced, caps=TRITON,
    doc="Triton gated residual + AdaLN: h = x + gate * y and (1 + scale) * LayerNorm(h) + shift in one pass.",
)(AdaLNResidualFunction.apply)
