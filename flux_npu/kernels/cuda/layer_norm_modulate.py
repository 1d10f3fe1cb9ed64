"""AdaLN modulation on CUDA in Triton: y = LayerNorm(x) * (1 + scale) + shift (LayerNorm without affine).

Kernels, launchers (custom ops `flux_npu::triton_layer_norm_modulate` / `_bwd`), autograd, check
and registration. Flux's AdaLayerNormZero / Single / Continuous compute this on (B, S, D)
activations with shift and scale of shape (B, 1, D) (chunks of one projection, so strided views).
Unfused it is four passes over x plus temporaries; here one read of x and one write of y.

Broadcast handled: x seen as (G, L, D) where shift/scale are constant along L, i.e. their leading
dims equal x's for a prefix (G = their product) and are 1 after it: (B, 1, D), (D,), (1, 1, D) and
the full (B, S, D) are all of this form. Any other broadcast is declined by the check and served
by the reference.

Mean and variance are centred and corrected: mean = sum(x)/D, d = x - mean, then
xc = d - sum(d)/D and var = mean(xc^2). The correction removes the rounding error of the float32
mean, which otherwise survives in xc: on rows of equal values (variance 0) an uncorrected kernel
returned LayerNorm values of ~1e-4 instead of 0 (relative error 4.3e-5 in float32 measured on an
H100); with it such rows give exactly 0, and rows with a large common offset (1e4 + noise) keep
float32 accuracy relative to the noise.

Backward, with xhat = xc * rstd and dxh = dy * (1 + scale):
    dx = rstd * (dxh - mean(dxh) - xhat * mean(dxh * xhat)),
    dshift = sum_L(dy),  dscale = sum_L(dy * xhat).
The L reductions are bounded: a persistent grid of one program per SM in all (BWD_PROGRAMS_PER_SM,
shared by the groups) loops over row blocks, accumulates in registers and writes one float32 partial
row per program, then one small torch sum (deterministic, no atomics). At Flux-dev shape (4608 rows
of 3072) that is ~132 partial rows per gradient instead of 4608 (~54 MB less traffic per gradient).
"""

from __future__ import annotations

import math

import torch

from ...ops.registry import register_kernel
from . import _triton as T
from ._checks import TRITON, group_split, row_reason, triton_reason
from ._triton import jit, row_tile, tl


@jit
def _centred(x, mask, n_cols):
    """(xc, var) of a tile's rows: x minus its corrected mean (see the module doc), and the
    variance; masked elements stay 0."""
    mean = tl.sum(x, axis=1) / n_cols
    d = tl.where(mask, x - mean[:, None], 0.0)
    xc = tl.where(mask, d - (tl.sum(d, axis=1) / n_cols)[:, None], 0.0)
    return xc, tl.sum(xc * xc, axis=1) / n_cols


@jit
def ln_rows(x, mask, n_cols, eps):
    """(xhat, rstd) of a tile's rows: the LayerNorm (no affine) in float32."""
    xc, var = _centred(x, mask, n_cols)
    rstd = 1.0 / tl.sqrt(var + eps)
    return xc * rstd[:, None], rstd


@jit
def ln_mod_rows_bwd(dy, xhat, rstd, sc, n_cols):
    """Gradient reaching x of y = xhat * (1 + sc) + shift, for a tile's rows (see the module doc)."""
    dxh = dy * (1.0 + sc[None, :])
    c1 = tl.sum(dxh, axis=1) / n_cols
    c2 = tl.sum(dxh * xhat, axis=1) / n_cols
    return rstd[:, None] * (dxh - c1[:, None] - xhat * c2[:, None])


@jit
def _ln_mod_fwd(
    X, SH, SC, Y, n_rows, n_cols, xsg, xsl, shg, scg, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    rows, cols, cmask, mask = row_tile(tl.program_id(1), n_rows, n_cols, BLOCK_M, BLOCK_N)
    x = tl.load(X + g * xsg + rows[:, None] * xsl + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat, _ = ln_rows(x, mask, n_cols, eps)
    sh = tl.load(SH + g * shg + cols, mask=cmask, other=0.0).to(tl.float32)
    sc = tl.load(SC + g * scg + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xhat * (1.0 + sc[None, :]) + sh[None, :]
    tl.store(Y + (g * n_rows + rows[:, None]) * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@jit
def _ln_bwd_block(X, DY, g, blk, cols, n_rows, n_cols, xsg, xsl, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """x (strided rows) and dy (dense) of row block `blk` of group g, in their own dtypes."""
    rows, _, _, mask = row_tile(blk, n_rows, n_cols, BLOCK_M, BLOCK_N)
    x = tl.load(X + g * xsg + rows[:, None] * xsl + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + (g * n_rows + rows[:, None]) * n_cols + cols[None, :], mask=mask, other=0.0)
    return x, dy


@jit
def _ln_mod_bwd(
    X, SC, DY, DX, DSH, DSC, n_rows, n_cols, n_blocks, xsg, xsl, scg, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    programs = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    sc = tl.load(SC + g * scg + cols, mask=cmask, other=0.0).to(tl.float32)
    dsh = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dsc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # software prefetch, as rms_norm's backward: the next block's x and dy are in flight (in their
    # own dtype) while this block is reduced
    blk = pid
    x_raw, dy_raw = _ln_bwd_block(X, DY, g, blk, cols, n_rows, n_cols, xsg, xsl, BLOCK_M, BLOCK_N)
    while blk < n_blocks:  # one partial row per program (see _triton.py: a while loop, not range())
        x_next, dy_next = _ln_bwd_block(X, DY, g, blk + programs, cols, n_rows, n_cols, xsg, xsl, BLOCK_M, BLOCK_N)
        rows, _, _, mask = row_tile(blk, n_rows, n_cols, BLOCK_M, BLOCK_N)
        dense = (g * n_rows + rows[:, None]) * n_cols + cols[None, :]
        x = x_raw.to(tl.float32)
        dy = dy_raw.to(tl.float32)
        x_raw, dy_raw = x_next, dy_next
        xhat, rstd = ln_rows(x, mask, n_cols, eps)
        dsh += tl.sum(dy, axis=0)
        dsc += tl.sum(dy * xhat, axis=0)
        dx = ln_mod_rows_bwd(dy, xhat, rstd, sc, n_cols)
        tl.store(DX + dense, dx.to(DX.dtype.element_ty), mask=mask)
        blk += programs
    part = (g * programs + pid) * n_cols + cols
    tl.store(DSH + part, dsh, mask=cmask)
    tl.store(DSC + part, dsc, mask=cmask)


class LayerNormModulateFunction(torch.autograd.Function):
    """Eager AdaLN: `forward` is the launcher (ops.layer_norm_modulate -> dispatch -> apply -> forward)."""

    @staticmethod
    def forward(ctx, backend, x, shift, scale, eps):
        """x (G..., L..., N), shift/scale (G..., 1..., N); ctx None: the custom op's launcher, which
        passes x (G, L, N) and shift/scale (G, N) with unit last-dim strides."""
        if ctx is None:
            x3, sh2, sc2 = x, shift, scale
        else:
            (x3,), (sh2, sc2) = group_view(x, mods=(shift, scale))
        G, L, N = x3.shape
        bm, bn, nb = T.row_blocks(N, L)
        y = T.empty(x.shape, x.dtype, x.device)
        eps = float(eps)
        T.launch(_ln_mod_fwd)[(G, nb)](
            x3, sh2, sc2, y, L, N, x3.stride(0), x3.stride(1), sh2.stride(0), sc2.stride(0), eps,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=T.num_warps_for(bm * bn),
        )
        if ctx is not None:
            ctx.save_for_backward(x3, sh2, sc2)
            ctx.eps, ctx.shapes = eps, (shift.shape, scale.shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        x3, sh2, sc2 = ctx.saved_tensors
        dx, dsh, dsc = _bwd(x3, sh2, sc2, dy, ctx.eps)
        return None, dx.view(dy.shape), dsh.view(ctx.shapes[0]), dsc.view(ctx.shapes[1]), None


def _fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The custom op's launcher: x (G, L, N) with unit last-dim stride; shift, scale (G, N). Dense y."""
    return LayerNormModulateFunction.forward(None, None, x, shift, scale, eps)


def _fwd_fake(x, shift, scale, eps):
    return x.new_empty(x.shape)


# Programs per SM of the backward's persistent grid (see _triton.persistent_programs): one. A 3072
# row on 16 warps compiles to 84 (triton 3.9) / 96 (3.6) registers a thread on sm_90, so one 16-warp
# program fits an SM's 64K registers; a second would wait for the first.
BWD_PROGRAMS_PER_SM = 1


def _bwd(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, dy: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dshift, dscale), the latter two (G, N) in shift's / scale's dtypes."""
    G, L, N = x.shape
    bm, bn, nb = T.row_blocks(N, L, T.BWD_TILE)
    programs = T.persistent_programs(x.device, nb, BWD_PROGRAMS_PER_SM, groups=G)
    dx = T.empty((G, L, N), x.dtype, x.device)
    dsh = T.empty((G, programs, N), torch.float32, x.device)
    dsc = T.empty((G, programs, N), torch.float32, x.device)
    T.launch(_ln_mod_bwd)[(G, programs)](
        x, scale, dy.contiguous(), dx, dsh, dsc, L, N, nb, x.stride(0), x.stride(1), scale.stride(0), eps,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=T.bwd_warps(bm * bn),
    )
    return dx, dsh.sum(1).to(shift.dtype), dsc.sum(1).to(scale.dtype)


def _bwd_fake(x, shift, scale, dy, eps):
    return x.new_empty(x.shape), shift.new_empty(shift.shape), scale.new_empty(scale.shape)


def _setup(ctx, inputs, output):
    x, shift, scale, eps = inputs
    ctx.save_for_backward(x, shift, scale)
    ctx.eps = eps


def _backward(ctx, dy):
    x, shift, scale = ctx.saved_tensors
    dx, dsh, dsc = ctx.bwd(x, shift, scale, dy, ctx.eps)
    return dx, dsh, dsc, None


_LN_MOD = T.TritonOp(
    "layer_norm_modulate", _fwd, _ln_mod_fwd, _fwd_fake, _bwd, _ln_mod_bwd, _bwd_fake, _setup, _backward,
)
layer_norm_modulate_op, layer_norm_modulate_bwd_op = _LN_MOD.op, _LN_MOD.bwd_op


def groups(x, *mods) -> int | None:
    """k such that every modulation tensor in `mods` varies along x's first k dims and is constant
    after them (the (G, L, N) view below), or None when they do not share such a k."""
    ks = {group_split(x.shape, t.shape) for t in mods}
    k = ks.pop() if len(ks) == 1 else None
    return k


def group_reason(x, **mods) -> str | None:
    if groups(x, *mods.values()) is not None:
        return None
    names = ", ".join(f"{n} {tuple(t.shape)}" for n, t in mods.items())
    return (
        f"{names} against x {tuple(x.shape)}: the kernel takes them varying along the same leading dims "
        f"and constant after them (e.g. (B, 1, D))"
    )


def group_view(x, rows=(), mods=(), op="layer_norm_modulate"):
    """x and `rows` (x-shaped) as (G, L, N), `mods` as (G, N), all with unit last-dim stride, or
    ValueError naming the shapes."""
    k = groups(x, *mods)
    if k is None:
        raise ValueError(f"triton {op}: " + group_reason(x, **{f"modulation {i}": t for i, t in enumerate(mods)}))
    N = x.shape[-1]
    G, L = math.prod(x.shape[:k]), math.prod(x.shape[k:-1])
    return (
        tuple(T.last_dim_unit(t.reshape(G, L, N)) for t in (x, *rows)),
        tuple(T.last_dim_unit(t.reshape(G, N)) for t in mods),
    )


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(1 + scale) * LayerNorm(x) + shift over the last dim (float32 maths, output x.dtype).
    shift/scale: (G..., 1..., D) against x (G..., L..., D), e.g. (B, 1, D) for (B, S, D).
    Differentiable in x, shift and scale. Under torch.compile: the custom op."""
    if torch.compiler.is_compiling():
        (x3,), (sh2, sc2) = group_view(x, mods=(shift, scale))
        return layer_norm_modulate_op(x3, sh2, sc2, float(eps)).view(x.shape)
    return LayerNormModulateFunction.apply(None, x, shift, scale, eps)


def _check(backend, x, shift, scale, eps):
    return (
        triton_reason(backend, x, shift, scale) or row_reason(x.shape[-1])
        or group_reason(x, shift=shift, scale=scale)
    )


def _traced(backend, x, shift, scale, eps):
    return layer_norm_modulate(x, shift, scale, eps)


register_kernel(
    "layer_norm_modulate", "cuda", "triton.layer_norm_modulate", check=_check, traced=_traced, caps=TRITON,
    doc="Triton AdaLN: LayerNorm + (1 + scale), + shift in one pass.",
)(LayerNormModulateFunction.apply)
