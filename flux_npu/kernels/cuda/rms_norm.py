"""RMSNorm on CUDA in Triton: y = x * rsqrt(mean(x^2) + eps) * weight over the last dim.

Kernels, launchers (custom ops `flux_npu::triton_rms_norm` / `_bwd`), autograd, check and
registration in one file. One program normalises BLOCK_M rows held in registers, in float32, and
rounds once to the output dtype.

Backward, with xhat = x * rstd and g = dy * w:  dx = rstd * (g - xhat * mean(g * xhat)),
dw = sum_rows(dy * xhat). rstd is recomputed from x (one reduction over data already loaded) rather
than saved. The weight gradient is bounded: a persistent grid of as many programs per SM as fit at
once (bwd_programs_per_sm) loops over row blocks, accumulates dw in registers and writes one float32
partial row per program; one small torch sum follows (deterministic, no atomics). At Flux-dev shapes
(B*S*H = 110,592 rows of 128) that is 528 partial rows on an H100 instead of 6,912. Each program
prefetches its next row block; on short rows of a 16-bit dtype (Flux's heads of 128) the backward
is `_rms_norm_words_bwd`, which reads and writes the rows as 32-bit words so that the compiled loop
issues the next block's loads at its top (docs/DESIGN.md, "CUDA / Triton layer and the op
benchmarks").
"""

from __future__ import annotations

import torch

from ...ops.registry import register_kernel
from . import _triton as T
from ._checks import TRITON, row_reason, triton_reason
from ._triton import jit, row_offsets, row_tile, tl


@jit
def _rms_norm_fwd(
    X, W, Y, n_rows, n_cols, n1, n2, xs0, xs1, xs2, eps,
    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols, cmask, mask = row_tile(tl.program_id(0), n_rows, n_cols, BLOCK_M, BLOCK_N)
    xoff = row_offsets(rows, n1, n2, xs0, xs1, xs2)
    x = tl.load(X + xoff[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    tl.store(Y + rows[:, None] * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@jit
def _load_block(X, DY, blk, cols, n_rows, n_cols, n1, n2, xs0, xs1, xs2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """x (strided rows) and dy (dense) of row block `blk`, in their own dtypes; zeros past the end."""
    rows, _, _, mask = row_tile(blk, n_rows, n_cols, BLOCK_M, BLOCK_N)
    xoff = row_offsets(rows, n1, n2, xs0, xs1, xs2)
    x = tl.load(X + xoff[:, None] + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    return x, dy


@jit
def _rms_norm_bwd(
    X, W, DY, DX, DW, n_rows, n_cols, n_blocks, n1, n2, xs0, xs1, xs2, eps,
    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    # dw accumulates per element of the tile and is reduced over rows once, after the loop: a sum
    # over rows each iteration would be a cross-warp reduction (shared memory, a barrier) per block
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    programs = tl.num_programs(0)
    # software prefetch: the next row block's x and dy are loaded (in their own dtype, half the
    # registers of float32) before this block's reductions, so each program keeps two blocks of
    # loads in flight instead of waiting a full DRAM latency per block
    blk = pid
    x_raw, dy_raw = _load_block(X, DY, blk, cols, n_rows, n_cols, n1, n2, xs0, xs1, xs2, BLOCK_M, BLOCK_N)
    while blk < n_blocks:  # one partial dw row per program (see _triton.py: a while loop, not range())
        x_next, dy_next = _load_block(X, DY, blk + programs, cols, n_rows, n_cols, n1, n2, xs0, xs1, xs2,
                                      BLOCK_M, BLOCK_N)
        rows, _, _, mask = row_tile(blk, n_rows, n_cols, BLOCK_M, BLOCK_N)
        x = x_raw.to(tl.float32)
        dy = dy_raw.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        xhat = x * rstd[:, None]
        if HAS_W:
            g = dy * w[None, :]
            dw += dy * xhat
        else:
            g = dy
        c = tl.sum(g * xhat, axis=1) / n_cols
        dx = rstd[:, None] * (g - xhat * c[:, None])
        tl.store(DX + rows[:, None] * n_cols + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        x_raw, dy_raw = x_next, dy_next
        blk += programs
    if HAS_W:
        tl.store(DW + pid * n_cols + cols, tl.sum(dw, axis=0), mask=cmask)


@jit
def _row_starts(blk, n1, n2, xs0, xs1, xs2, BLOCK_M: tl.constexpr):
    """Where x's rows of row block `blk` start, in 32-bit words, as a column."""
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    return (row_offsets(rows.to(tl.int64), n1, n2, xs0, xs1, xs2) // 2)[:, None]


@jit
def _load_words(X, DY, blk, xstart, n_rows, n_words, BLOCK_M: tl.constexpr, WORDS: tl.constexpr):
    """x (rows starting at word `xstart`) and dy (dense) of row block `blk` as int32 words of two
    16-bit elements; zeros past the end."""
    rows, lanes, _, mask = row_tile(blk, n_rows, n_words, BLOCK_M, WORDS)
    x = tl.load(X.to(tl.pointer_type(tl.int32)) + xstart + lanes[None, :], mask=mask, other=0)
    dy = tl.load(DY.to(tl.pointer_type(tl.int32)) + rows[:, None] * n_words + lanes[None, :], mask=mask, other=0)
    return x, dy


@jit
def _halves(words, dtype: tl.constexpr):
    """float32 (elements 2j, elements 2j + 1) of int32 words holding two 16-bit `dtype` elements
    (little-endian: element 2j in the low half)."""
    if dtype == tl.bfloat16:  # a bfloat16 is the high half of the float32 with its bits
        return (words << 16).to(tl.float32, bitcast=True), (words & -65536).to(tl.float32, bitcast=True)
    else:
        lo = words.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, (words >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@jit
def _words(lo, hi, dtype: tl.constexpr):
    """int32 words of (lo, hi) rounded to the 16-bit `dtype`: the inverse of _halves."""
    lo16 = lo.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 65535
    return lo16 | (hi.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) << 16)


@jit
def _rms_norm_words_bwd(
    X, W, DY, DX, DW, n_rows, n_cols, n_blocks, n1, n2, xs0, xs1, xs2, eps,
    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """_rms_norm_bwd for short rows of a 16-bit dtype in 32-bit words (see the launcher): each
    tile is the (BLOCK_M, BLOCK_N / 2) words of the rows, its even and odd elements computed as two
    float32 halves. Written so that ptxas issues the next block's loads at the top of an iteration
    and waits for them only late in it (tests/test_triton_compile.py measures where; in
    _rms_norm_bwd it waits just after the reductions): the loads sit in a branch of their own (in
    one basic block with the reductions ptxas issues them after the reductions); a loop-carried
    tile of 32-bit words needs no repacking (a 16-bit tile is repacked in the iteration that loaded
    it, which waits for the load); and the next block's row starts (two integer divisions a row) are
    decoded an iteration ahead."""
    WORDS: tl.constexpr = BLOCK_N // 2
    pid = tl.program_id(0)
    n_words = n_cols // 2
    lanes = tl.arange(0, WORDS)
    lmask = lanes < n_words
    if HAS_W:
        w_lo = tl.load(W + 2 * lanes, mask=lmask, other=0.0).to(tl.float32)
        w_hi = tl.load(W + 2 * lanes + 1, mask=lmask, other=0.0).to(tl.float32)
    dw_lo = tl.zeros((BLOCK_M, WORDS), dtype=tl.float32)  # summed over rows after the loop, as _rms_norm_bwd
    dw_hi = tl.zeros((BLOCK_M, WORDS), dtype=tl.float32)
    programs = tl.num_programs(0)
    blk = pid
    x_raw, dy_raw = _load_words(X, DY, blk, _row_starts(blk, n1, n2, xs0, xs1, xs2, BLOCK_M), n_rows, n_words,
                                BLOCK_M, WORDS)
    xstart = _row_starts(blk + programs, n1, n2, xs0, xs1, xs2, BLOCK_M)
    while blk < n_blocks:  # one partial dw row per program (see _triton.py: a while loop, not range())
        if blk + programs < n_blocks:
            x_next, dy_next = _load_words(X, DY, blk + programs, xstart, n_rows, n_words, BLOCK_M, WORDS)
        else:
            x_next = tl.zeros((BLOCK_M, WORDS), tl.int32)
            dy_next = tl.zeros((BLOCK_M, WORDS), tl.int32)
        xstart = _row_starts(blk + 2 * programs, n1, n2, xs0, xs1, xs2, BLOCK_M)
        rows, _, _, mask = row_tile(blk, n_rows, n_words, BLOCK_M, WORDS)
        x_lo, x_hi = _halves(x_raw, X.dtype.element_ty)
        dy_lo, dy_hi = _halves(dy_raw, DY.dtype.element_ty)
        rstd = 1.0 / tl.sqrt(tl.sum(x_lo * x_lo + x_hi * x_hi, axis=1) / n_cols + eps)
        x_lo = x_lo * rstd[:, None]  # xhat
        x_hi = x_hi * rstd[:, None]
        if HAS_W:
            dw_lo += dy_lo * x_lo
            dw_hi += dy_hi * x_hi
            dy_lo = dy_lo * w_lo[None, :]  # g
            dy_hi = dy_hi * w_hi[None, :]
        c = tl.sum(dy_lo * x_lo + dy_hi * x_hi, axis=1) / n_cols
        dx = _words(rstd[:, None] * (dy_lo - x_lo * c[:, None]), rstd[:, None] * (dy_hi - x_hi * c[:, None]),
                    DX.dtype.element_ty)
        tl.store(DX.to(tl.pointer_type(tl.int32)) + rows[:, None] * n_words + lanes[None, :], dx, mask=mask)
        x_raw, dy_raw = x_next, dy_next
        blk += programs
    if HAS_W:
        tl.store(DW + pid * n_cols + 2 * lanes, tl.sum(dw_lo, axis=0), mask=lmask)
        tl.store(DW + pid * n_cols + 2 * lanes + 1, tl.sum(dw_hi, axis=0), mask=lmask)


def bwd_programs_per_sm(block_n: int) -> int:
    """Programs per SM of the weight-gradient grid (see _triton.persistent_programs): the backward
    tiles hold 8 elements a thread up to 4096 columns (16 rows of 128 on 8 warps, one 3072/4096 row
    on 16 warps), which compile to at most 64 registers a thread on sm_90 (triton 3.6 and 3.9), so
    32 warps' worth fit an SM: 4 programs of 8 warps, 2 of 16. Longer rows hold more a thread: 1."""
    return 4 if block_n <= 2048 else 2 if block_n <= 4096 else 1


def _sizes(x4, tile=T.TILE):
    n_cols = x4.shape[-1]
    n_rows = x4.numel() // n_cols
    bm, bn = T.block_sizes(n_cols, n_rows, tile)
    return n_rows, n_cols, bm, bn, T.cdiv(n_rows, bm)


class RMSNormFunction(torch.autograd.Function):
    """Eager RMSNorm: `forward` is the launcher (the kernel's [grid] call is its own), so a patched
    module reaches the launch through ops.rms_norm -> dispatch -> apply -> forward."""

    @staticmethod
    def forward(ctx, backend, x, weight, eps, out_dtype):
        """x: any rank, weight (N,) or None; returns a dense y of x's shape. ctx None: the custom op's
        launcher (no autograd state)."""
        x4 = T.last_dim_unit(T.as_4d(x))
        n_rows, n_cols, bm, bn, n_blocks = _sizes(x4)
        y = T.empty(x.shape, out_dtype or x.dtype, x.device)
        eps = float(eps)
        T.launch(_rms_norm_fwd)[(n_blocks,)](
            x4, weight if weight is not None else x4, y, n_rows, n_cols, x4.shape[1], x4.shape[2], *T.row_args(x4),
            eps, HAS_W=weight is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=T.num_warps_for(bm * bn),
        )
        if ctx is not None:
            ctx.save_for_backward(x4, weight)
            ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x4, weight = ctx.saved_tensors
        dx, dw = _bwd(x4, weight, dy, ctx.eps)
        return None, dx.view(dy.shape), (dw if weight is not None and ctx.needs_input_grad[2] else None), None, None


def _fwd(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The custom op's launcher: x 4-D, last dim stride 1, any other strides. Returns a dense y."""
    return RMSNormFunction.forward(None, None, x, weight, eps, out_dtype)


def _fwd_fake(x, weight, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _bwd(
    x: torch.Tensor, weight: torch.Tensor | None, dy: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx dense in x's dtype, dw in weight's dtype or an empty placeholder without weight)."""
    n_rows, n_cols, bm, bn, n_blocks = _sizes(x, T.BWD_TILE)
    has_w = weight is not None
    programs = T.persistent_programs(x.device, n_blocks, bwd_programs_per_sm(bn)) if has_w else n_blocks
    dx = T.empty(x.shape, x.dtype, x.device)
    dw_part = T.empty((programs, n_cols), torch.float32, x.device) if has_w else dx
    dy = dy.contiguous()
    # short rows of a 16-bit dtype whose rows start 4-byte aligned: the 32-bit-word kernel, which
    # overlaps its prefetch with more of each iteration; on long rows (one per program) it compiles
    # to more registers on triton 3.9 (73 against 64 at D=3072: one program per SM instead of two)
    words = bm > 1 and T.word_pairs(n_cols, x, dy, dx)
    T.launch(_rms_norm_words_bwd if words else _rms_norm_bwd)[(programs,)](
        x, weight if has_w else x, dy, dx, dw_part, n_rows, n_cols, n_blocks, x.shape[1], x.shape[2],
        *T.row_args(x), eps,
        HAS_W=has_w, BLOCK_M=bm, BLOCK_N=bn, num_warps=T.bwd_warps(bm * bn),
    )
    dw = dw_part.sum(0).to(weight.dtype) if has_w else T.no_grad_placeholder(x)
    return dx, dw


def _bwd_fake(x, weight, dy, eps):
    dw = weight.new_empty(weight.shape) if weight is not None else T.no_grad_placeholder(x)
    return x.new_empty(x.shape), dw


def _setup(ctx, inputs, output):
    x, weight, eps, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = ctx.bwd(x, weight, dy, ctx.eps)
    return dx, (dw if weight is not None and ctx.needs_input_grad[1] else None), None, None


_RMS_NORM = T.TritonOp("rms_norm", _fwd, _rms_norm_fwd, _fwd_fake, _bwd, _rms_norm_bwd, _bwd_fake, _setup, _backward)
rms_norm_op, rms_norm_bwd_op = _RMS_NORM.op, _RMS_NORM.bwd_op


def rms_norm(x: torch.Tensor, weight=None, eps: float = 1e-6, out_dtype=None) -> torch.Tensor:
    """RMSNorm over the last dim (float32 maths, one rounding to `out_dtype` or x.dtype).
    weight: (N,) or None. Differentiable in x and weight. Under torch.compile: the custom op."""
    if torch.compiler.is_compiling():
        x4 = T.last_dim_unit(T.as_4d(x))
        return rms_norm_op(x4, weight, float(eps), out_dtype or x.dtype).view(x.shape)
    return RMSNormFunction.apply(None, x, weight, eps, out_dtype)


def _check(backend, x, weight, eps, out_dtype):
    if out_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        return f"out_dtype {out_dtype} is not a Triton dtype (float32, bfloat16, float16)"
    return triton_reason(backend, x, weight) or row_reason(x.shape[-1])


def _traced(backend, x, weight, eps, out_dtype):
    return rms_norm(x, weight, eps, out_dtype)


register_kernel(
    "rms_norm", "cuda", "triton.rms_norm", check=_check, traced=_traced, caps=TRITON,
    doc="Triton RMSNorm: one read, one write, float32 maths, strided rows read in place.",
)(RMSNormFunction.apply)
