"""RoPE on CUDA in Triton, Flux's adjacent-pair convention, with an optional RMSNorm prologue.

Kernels, launchers, custom ops (`flux_npu::triton_apply_rope` / `_bwd`), autograd, check and
registration of `apply_rope`; `qk_norm_rope.py` reuses these kernels with NORM on.

x's last dim holds D/2 pairs (x[2i], x[2i+1]); each pair is multiplied by a 2x2 matrix M:
    out0 = M00 x0 + M01 x1,   out1 = M10 x0 + M11 x1,
with M from either frequency form Flux code hands over:
  - BFL: matrices (..., S, D/2, 2, 2) broadcast against x's leading dims; all four entries are
    used (no assumption that M is a rotation, as the reference);
  - diffusers: (cos, sin), each (S, D), x's sequence axis `sequence_dim`;
    M = [[c, -s], [s, c]] with c, s at the pair's even column, as the reference.

Memory access is contiguous: a program loads a (BLOCK_M, D) tile of whole rows, `tl.reshape`s it
to (BLOCK_M, D/2, 2) and `tl.split`s even and odd elements in registers, then `tl.join`s the
rotated pairs and stores whole rows. The frequencies are read the same way: a row of cos and of
sin, or the (D/2, 2, 2) block of a BFL row as one contiguous 2*D-element load split twice (pairs
at stride 2 and four scalar loads per pair made the first kernel run at 7% of copy bandwidth on
an H100). Frequencies are never expanded in memory: broadcast dims get stride 0.

Two tensors in one launch (q and k of `qk_norm_rope`; `apply_rope` passes one): each program
reads its row block's frequencies once and rotates the block of both. Which tensor is written is
decided at compile time (constexpr TWO), never by choosing a pointer at run time: torch.compile's
analysis of what a Triton kernel writes treats every pointer that meets a run-time branch as
written, and would then copy q, k and the weights before each call.

With NORM the row is first RMS-normalised (weight optional) and rounded to x's dtype, as unfused
Flux code does between its QK norm and RoPE, then rotated. The backward rotates the incoming
gradient back (dx = M^T dout) and, with NORM, applies the RMSNorm backward in the same program;
the weight gradient uses a persistent grid (as many programs per SM as fit at once: BWD_PROGRAMS_PER_SM)
accumulating per tile element in registers, summed over rows once after the loop, and writing one
float32 partial row per program, then one small sum. Each iteration of that loop issues every load
of the next row block (frequencies, dy and x of q and k, in their own dtypes) before computing the
current one, so a block's DRAM latency overlaps the previous block's reductions and stores.
qk_norm_rope's backward with both weights on 16-bit rows (Flux's) is `_rope_words_bwd`, which reads
pairs as 32-bit words and the frequencies as 64-bit words of a copy re-laid per backward
(`word_freqs`), so that the compiled loop waits for the next block's loads only late in an
iteration (its docstring; docs/DESIGN.md).
Frequencies are constants derived from positions and get no gradient (the check declines freqs
that require grad).
"""

from __future__ import annotations

import torch

from ...ops.registry import register_kernel
from . import _triton as T
from ._checks import TRITON, freqs_reason, row_reason, triton_reason
from ._rope_words import _rope_words_bwd, _words_maxnreg, word_freqs
from ._triton import jit, row_offsets, row_tile, tl


@jit
def _matrix(F0, F1, rows, n_rows, n_cols, n1, n2, fs0, fs1, fs2,
            COS_SIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The pairs' 2x2 matrices (M00, M01, M10, M11), each (BLOCK_M, BLOCK_D // 2) float32, read
    as whole contiguous rows of the frequencies."""
    foff = row_offsets(rows, n1, n2, fs0, fs1, fs2)
    rmask = rows < n_rows
    if COS_SIN:
        cols = tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < n_cols)[None, :]
        c = tl.load(F0 + foff[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(F1 + foff[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        c, _ = tl.split(tl.reshape(c, (BLOCK_M, BLOCK_D // 2, 2)))
        s, _ = tl.split(tl.reshape(s, (BLOCK_M, BLOCK_D // 2, 2)))
        return c, -s, s, c
    else:
        cols = tl.arange(0, 2 * BLOCK_D)  # (D/2, 2, 2) per row = 2*D contiguous elements
        mask = rmask[:, None] & (cols < 2 * n_cols)[None, :]
        f = tl.load(F0 + foff[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        col0, col1 = tl.split(tl.reshape(f, (BLOCK_M, BLOCK_D // 2, 2, 2)))  # [..., i, j]: j = 0 / 1
        m00, m10 = tl.split(col0)
        m01, m11 = tl.split(col1)
        return m00, m01, m10, m11


@jit
def _rotate_rows(X, W, Y, rows, cols, cmask, mask, n_cols, n1, n2, s0, s1, s2, eps, m00, m01, m10, m11,
                 NORM: tl.constexpr, HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward of one tensor's row block: load whole rows, (normalise,) rotate, store whole rows."""
    xoff = row_offsets(rows, n1, n2, s0, s1, s2)
    x = tl.load(X + xoff[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        x = x * rstd[:, None]
        if HAS_W:
            x = x * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        # unfused Flux rounds the normalised q/k to their dtype before RoPE: do the same
        x = x.to(X.dtype.element_ty).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_D // 2, 2)))
    y = tl.reshape(tl.join(m00 * x0 + m01 * x1, m10 * x0 + m11 * x1), (BLOCK_M, BLOCK_D))
    tl.store(Y + rows[:, None] * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@jit
def _rope_fwd(
    X0, X1, W0, W1, Y0, Y1, F0, F1, n_rows, n_cols, n1, n2,
    a0, a1, a2, b0, b1, b2, fs0, fs1, fs2, eps,
    COS_SIN: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr, TWO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, cmask, mask = row_tile(tl.program_id(0), n_rows, n_cols, BLOCK_M, BLOCK_D)
    # the block's frequencies are read once and serve both tensors (q and k)
    m00, m01, m10, m11 = _matrix(F0, F1, rows, n_rows, n_cols, n1, n2, fs0, fs1, fs2, COS_SIN, BLOCK_M, BLOCK_D)
    _rotate_rows(X0, W0, Y0, rows, cols, cmask, mask, n_cols, n1, n2, a0, a1, a2, eps, m00, m01, m10, m11,
                 NORM, HAS_W, BLOCK_M, BLOCK_D)
    if TWO:  # compile-time: no pointer is chosen at run time, so torch.compile sees exactly what is written
        _rotate_rows(X1, W1, Y1, rows, cols, cmask, mask, n_cols, n1, n2, b0, b1, b2, eps, m00, m01, m10, m11,
                     NORM, HAS_W, BLOCK_M, BLOCK_D)


@jit
def _bwd_loads(X0, X1, DY0, DY1, F0, F1, blk, cols, n_rows, n_cols, n1, n2, a0, a1, a2, b0, b1, b2, fs0, fs1, fs2,
               COS_SIN: tl.constexpr, NORM: tl.constexpr, TWO: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Every load of row block `blk`'s backward, in the operands' own dtypes (zeros past the end):
    the frequencies (cos and sin rows, or a BFL row's (D/2, 2, 2) block twice), dy of both tensors
    and, with NORM, x of both (a tensor that is not there repeats the first)."""
    rows, _, _, mask = row_tile(blk, n_rows, n_cols, BLOCK_M, BLOCK_D)
    foff = row_offsets(rows, n1, n2, fs0, fs1, fs2)
    if COS_SIN:
        f0 = tl.load(F0 + foff[:, None] + cols[None, :], mask=mask, other=0.0)
        f1 = tl.load(F1 + foff[:, None] + cols[None, :], mask=mask, other=0.0)
    else:
        fcols = tl.arange(0, 2 * BLOCK_D)  # (D/2, 2, 2) per row = 2*D contiguous elements
        fmask = (rows < n_rows)[:, None] & (fcols < 2 * n_cols)[None, :]
        f0 = tl.load(F0 + foff[:, None] + fcols[None, :], mask=fmask, other=0.0)
        f1 = f0
    dense = rows[:, None] * n_cols + cols[None, :]
    dy0 = tl.load(DY0 + dense, mask=mask, other=0.0)
    dy1 = dy0
    if TWO:
        dy1 = tl.load(DY1 + dense, mask=mask, other=0.0)
    x0 = dy0
    x1 = dy0
    if NORM:
        x0 = tl.load(X0 + row_offsets(rows, n1, n2, a0, a1, a2)[:, None] + cols[None, :], mask=mask, other=0.0)
        x1 = x0
        if TWO:
            x1 = tl.load(X1 + row_offsets(rows, n1, n2, b0, b1, b2)[:, None] + cols[None, :], mask=mask, other=0.0)
    return f0, f1, dy0, dy1, x0, x1


@jit
def _bwd_matrix(f0, f1, COS_SIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The pairs' 2x2 matrices (M00, M01, M10, M11), each (BLOCK_M, BLOCK_D // 2) float32, from the
    raw frequency rows `_bwd_loads` returns (as `_matrix` does from memory)."""
    if COS_SIN:
        c, _ = tl.split(tl.reshape(f0.to(tl.float32), (BLOCK_M, BLOCK_D // 2, 2)))
        s, _ = tl.split(tl.reshape(f1.to(tl.float32), (BLOCK_M, BLOCK_D // 2, 2)))
        return c, -s, s, c
    else:
        col0, col1 = tl.split(tl.reshape(f0.to(tl.float32), (BLOCK_M, BLOCK_D // 2, 2, 2)))
        m00, m10 = tl.split(col0)
        m01, m11 = tl.split(col1)
        return m00, m01, m10, m11


@jit
def _unrotate_rows(x_raw, dy_raw, w, DX, rows, cols, mask, n_cols, eps, m00, m01, m10, m11,
                   NORM: tl.constexpr, HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward of one tensor's row block from its loaded x and dy: stores dx and returns the
    block's weight-gradient terms per element (BLOCK_M, BLOCK_D), summed over rows by the caller
    once after its loop."""
    d0, d1 = tl.split(tl.reshape(dy_raw.to(tl.float32), (BLOCK_M, BLOCK_D // 2, 2)))
    g = tl.reshape(tl.join(m00 * d0 + m10 * d1, m01 * d0 + m11 * d1), (BLOCK_M, BLOCK_D))  # M^T dout
    dw = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if NORM:
        x = x_raw.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        h = x * rstd[:, None]
        if HAS_W:
            dw = g * h
            g = g * w[None, :]
        c = tl.sum(g * h, axis=1) / n_cols
        g = rstd[:, None] * (g - h * c[:, None])
    tl.store(DX + rows[:, None] * n_cols + cols[None, :], g.to(DX.dtype.element_ty), mask=mask)
    return dw


@jit
def _rope_bwd(
    X0, X1, W0, W1, DY0, DY1, DX0, DX1, DW, F0, F1, n_rows, n_cols, n_blocks, n1, n2,
    a0, a1, a2, b0, b1, b2, fs0, fs1, fs2, eps,
    COS_SIN: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr, TWO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < n_cols
    w0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    w1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_W:
        w0 = tl.load(W0 + cols, mask=cmask, other=0.0).to(tl.float32)
        if TWO:
            w1 = tl.load(W1 + cols, mask=cmask, other=0.0).to(tl.float32)
    # the weight gradients accumulate per element of the tile and are summed over rows once, after
    # the loop (a per-block row sum is a cross-warp reduction through shared memory, with a barrier)
    dw0 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    blk = pid
    f0, f1, dy0, dy1, x0, x1 = _bwd_loads(X0, X1, DY0, DY1, F0, F1, blk, cols, n_rows, n_cols, n1, n2,
                                          a0, a1, a2, b0, b1, b2, fs0, fs1, fs2, COS_SIN, NORM, TWO, BLOCK_M, BLOCK_D)
    while blk < n_blocks:  # persistent when there is a dw to reduce (see _triton.py: a while loop, not range())
        if HAS_W:
            # software prefetch, as rms_norm's backward: the next block's loads (frequencies, dy,
            # x; in their own dtypes) are in flight while this block is computed and stored
            nf0, nf1, ndy0, ndy1, nx0, nx1 = _bwd_loads(
                X0, X1, DY0, DY1, F0, F1, blk + programs, cols, n_rows, n_cols, n1, n2,
                a0, a1, a2, b0, b1, b2, fs0, fs1, fs2, COS_SIN, NORM, TWO, BLOCK_M, BLOCK_D)
        else:  # one block per program: nothing follows
            nf0, nf1, ndy0, ndy1, nx0, nx1 = f0, f1, dy0, dy1, x0, x1
        rows, _, _, mask = row_tile(blk, n_rows, n_cols, BLOCK_M, BLOCK_D)
        # the block's frequencies serve both tensors (q and k)
        m00, m01, m10, m11 = _bwd_matrix(f0, f1, COS_SIN, BLOCK_M, BLOCK_D)
        dw0 += _unrotate_rows(x0, dy0, w0, DX0, rows, cols, mask, n_cols, eps, m00, m01, m10, m11,
                              NORM, HAS_W, BLOCK_M, BLOCK_D)
        if TWO:
            dw1 += _unrotate_rows(x1, dy1, w1, DX1, rows, cols, mask, n_cols, eps, m00, m01, m10, m11,
                                  NORM, HAS_W, BLOCK_M, BLOCK_D)
        f0, f1, dy0, dy1, x0, x1 = nf0, nf1, ndy0, ndy1, nx0, nx1
        blk += programs
    if HAS_W:
        tl.store(DW + pid * n_cols + cols, tl.sum(dw0, axis=0), mask=cmask)
        if TWO:
            tl.store(DW + (programs + pid) * n_cols + cols, tl.sum(dw1, axis=0), mask=cmask)


# -- launchers ---------------------------------------------------------------------------------


def freq_operands(shape4, f0: torch.Tensor, f1: torch.Tensor | None, sequence_dim: int):
    """(F0, F1, (fs0, fs1, fs2), cos_sin) for an x of 4-D `shape4`, frequencies broadcast with
    stride 0 (never copied unless their rows are not contiguous)."""
    if f1 is None:  # BFL (..., S, D/2, 2, 2)
        rows_contiguous = f0.stride(-1) == 1 and f0.stride(-2) == 2 and (f0.shape[-3] == 1 or f0.stride(-3) == 4)
        f = f0 if rows_contiguous else f0.contiguous()
        while f.dim() < 6:
            f = f.unsqueeze(0)
        f = f.expand(*shape4[:-1], *f.shape[-3:])
        return f, f, (f.stride(0), f.stride(1), f.stride(2)), False
    view = [1] * 4
    view[sequence_dim] = f0.shape[0]
    view[-1] = f0.shape[-1]
    # one set of strides serves cos and sin: they must share them, with unit stride along D
    if f0.stride() != f1.stride() or f0.stride(-1) != 1:
        f0, f1 = f0.contiguous(), f1.contiguous()
    c, s = f0.reshape(view).expand(shape4), f1.reshape(view).expand(shape4)
    return c, s, (c.stride(0), c.stride(1), c.stride(2)), True


# The backward's tile: 8 rows of 128 on 4 warps (8 elements a thread, 16-byte loads). Its registers
# (the next block's loads held while this one is computed) allow several such programs per SM, and
# small programs waste less of the register file than one 8-warp program. Programs per SM of the
# persistent (weight-gradient) grid: as many as fit at once on sm_90 with both triton 3.6 and 3.9, per
# frequency form and tensor count (tests/test_triton_compile.py holds each compiled form to it); a
# program more would run as a second wave with an equal share of the blocks. Keyed (cos_sin, two);
# registers a thread on triton 3.9 / 3.6 in the comments.
BWD_TILE = 1024
BWD_PROGRAMS_PER_SM = {
    (True, True): 4,  # 128 / 128 (_rope_words_bwd; _rope_bwd: 126 / 128)
    (True, False): 6,  # 78 / 72: 7 fit on 3.6
    (False, True): 3,  # 160 / 155 (_rope_words_bwd; _rope_bwd: 150 / 154)
    (False, False): 4,  # 101 / 92: 5 fit on 3.6
}


def _sizes(shape4, tile=T.TILE):
    n_cols = shape4[-1]
    n_rows = shape4[0] * shape4[1] * shape4[2]
    bm, bd = T.block_sizes(n_cols, n_rows, tile)
    return n_rows, n_cols, bm, bd, T.cdiv(n_rows, bm)


def fwd_launch(xs, weights, f0, f1, sequence_dim, norm, eps):
    """Outputs (dense, x's dtype) for one tensor or two of the same shape, dtype and weight dtype,
    in one launch."""
    x = xs[0]
    F0, F1, fstrides, cos_sin = freq_operands(x.shape, f0, f1, sequence_dim)
    n_rows, n_cols, bm, bd, n_blocks = _sizes(x.shape)
    ys = [T.empty(t.shape, t.dtype, t.device) for t in xs]
    a, b = xs[0], xs[-1]
    wa, wb = weights[0], weights[-1]
    has_w = norm and wa is not None
    T.launch(_rope_fwd)[(n_blocks,)](
        a, b, wa if has_w else a, wb if has_w else b, ys[0], ys[-1], F0, F1, n_rows, n_cols, x.shape[1], x.shape[2],
        *T.row_args(a), *T.row_args(b), *fstrides, eps,
        COS_SIN=cos_sin, NORM=norm, HAS_W=has_w, TWO=len(xs) == 2, BLOCK_M=bm, BLOCK_D=bd,
        num_warps=T.num_warps_for(bm * bd * (2 if cos_sin else 3)),
    )
    return ys


def bwd_launch(xs, weights, dys, f0, f1, sequence_dim, norm, eps):
    """(dxs, dws) for fwd_launch's inputs; dws are float32 sums (None without weights)."""
    x = xs[0]
    n_rows, n_cols, bm, bd, n_blocks = _sizes(x.shape, BWD_TILE)
    has_w = norm and weights[0] is not None
    cos_sin = f1 is not None
    per_sm = BWD_PROGRAMS_PER_SM[cos_sin, len(xs) == 2]
    programs = T.persistent_programs(x.device, n_blocks, per_sm) if has_w else n_blocks
    dxs = [T.empty(t.shape, t.dtype, t.device) for t in xs]
    dys = [d.contiguous() for d in dys]
    dw_part = T.empty((len(xs), programs, n_cols), torch.float32, x.device) if has_w else dxs[0]
    a, b = xs[0], xs[-1]
    # q and k with both weights (Flux's QK norm), 16-bit rows starting 4-byte aligned, each row block
    # in one run of the innermost leading dim (n2 a multiple of BLOCK_M; Flux: 24 heads or 4608
    # tokens against 8 rows): the word kernel, which overlaps its prefetch with more of each iteration
    words = has_w and len(xs) == 2 and bm > 1 and x.shape[2] % bm == 0 and T.word_pairs(n_cols, *xs, *dys, *dxs)
    F0, F1, fstrides, _ = freq_operands(x.shape, *(word_freqs(f0, f1) if words else (f0, f1)), sequence_dim)
    args = (a, b, weights[0] if has_w else a, weights[-1] if has_w else b, dys[0], dys[-1], dxs[0], dxs[-1], dw_part,
            F0, F1, n_rows, n_cols, n_blocks, x.shape[1], x.shape[2], *T.row_args(a), *T.row_args(b), *fstrides, eps)
    if words:
        T.launch(_rope_words_bwd)[(programs,)](
            *args, COS_SIN=cos_sin, BLOCK_M=bm, BLOCK_D=bd, num_warps=T.num_warps_for(bm * bd),
            **_words_maxnreg(cos_sin),
        )
    else:
        T.launch(_rope_bwd)[(programs,)](
            *args, COS_SIN=cos_sin, NORM=norm, HAS_W=has_w, TWO=len(xs) == 2, BLOCK_M=bm, BLOCK_D=bd,
            num_warps=T.num_warps_for(bm * bd),
        )
    return dxs, ([dw_part[i].sum(0) for i in range(len(xs))] if has_w else None)


# -- apply_rope as a custom op -------------------------------------------------------------------


class ApplyRopeFunction(torch.autograd.Function):
    """Eager RoPE: `forward` prepares the rows and calls the shared launcher (ops.apply_rope ->
    dispatch -> apply -> forward -> fwd_launch)."""

    @staticmethod
    def forward(ctx, backend, x, freqs, sequence_dim):
        if x.dim() > 4:
            raise ValueError(f"triton apply_rope takes at most 4-D x, got {x.dim()}-D")
        x4 = T.last_dim_unit(T.as_4d(x))
        f0, f1 = split_freqs(freqs)
        sd = sequence_dim + 4 - x.dim()
        (y,) = fwd_launch([x4], [None], f0, f1, sd, False, 0.0)
        ctx.save_for_backward(f0, f1)
        ctx.sequence_dim = sd
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        f0, f1 = ctx.saved_tensors
        return None, _bwd(dy.reshape(_shape4(dy)), f0, f1, ctx.sequence_dim).view(dy.shape), None, None


def _shape4(t):
    return (1,) * (4 - t.dim()) + tuple(t.shape)


def _fwd(x: torch.Tensor, f0: torch.Tensor, f1: torch.Tensor | None, sequence_dim: int) -> torch.Tensor:
    """x 4-D, last dim stride 1; f1 None: f0 are BFL matrices, else (f0, f1) = (cos, sin)."""
    return fwd_launch([x], [None], f0, f1, sequence_dim, False, 0.0)[0]


def _fwd_fake(x, f0, f1, sequence_dim):
    return x.new_empty(x.shape)


def _bwd(dy: torch.Tensor, f0: torch.Tensor, f1: torch.Tensor | None, sequence_dim: int) -> torch.Tensor:
    return bwd_launch([dy], [None], [dy], f0, f1, sequence_dim, False, 0.0)[0][0]


def _bwd_fake(dy, f0, f1, sequence_dim):
    return dy.new_empty(dy.shape)


def _setup(ctx, inputs, output):
    _, f0, f1, sequence_dim = inputs
    ctx.save_for_backward(f0, f1)
    ctx.sequence_dim = sequence_dim


def _backward(ctx, dy):
    f0, f1 = ctx.saved_tensors
    return ctx.bwd(dy, f0, f1, ctx.sequence_dim), None, None, None


_APPLY_ROPE = T.TritonOp("apply_rope", _fwd, _rope_fwd, _fwd_fake, _bwd, _rope_bwd, _bwd_fake, _setup, _backward)
apply_rope_op, apply_rope_bwd_op = _APPLY_ROPE.op, _APPLY_ROPE.bwd_op


def split_freqs(freqs):
    """(f0, f1) operands of the custom ops: (BFL matrices, None) or (cos, sin)."""
    if isinstance(freqs, torch.Tensor):
        return freqs, None
    return freqs[0], freqs[1]


def apply_rope(x: torch.Tensor, freqs, sequence_dim: int = 2) -> torch.Tensor:
    """Rotate adjacent pairs of x's last dim (float32 maths, output x.dtype); freqs as
    `flux_npu.ops.reference.apply_rope`. Differentiable in x. Under torch.compile: the custom op."""
    if not torch.compiler.is_compiling():
        return ApplyRopeFunction.apply(None, x, freqs, sequence_dim)
    if x.dim() > 4:
        raise ValueError(f"triton apply_rope takes at most 4-D x, got {x.dim()}-D")
    x4 = T.last_dim_unit(T.as_4d(x))
    f0, f1 = split_freqs(freqs)
    return apply_rope_op(x4, f0, f1, sequence_dim + 4 - x.dim()).view(x.shape)


def freq_tensors(freqs):
    return (freqs,) if isinstance(freqs, torch.Tensor) else tuple(t for t in freqs if isinstance(t, torch.Tensor))


def _check(backend, x, freqs, sequence_dim):
    if not isinstance(freqs, (torch.Tensor, tuple, list)):
        return "freqs of an unknown form"
    return (
        triton_reason(backend, x, *freq_tensors(freqs)) or row_reason(x.shape[-1])
        or freqs_reason(x, freqs, sequence_dim)
    )


def _traced(backend, x, freqs, sequence_dim):
    return apply_rope(x, freqs, sequence_dim)


register_kernel(
    "apply_rope", "cuda", "triton.rope", check=_check, traced=_traced, caps=TRITON,
    doc="Triton RoPE, BFL matrices or diffusers (cos, sin), whole rows loaded contiguously.",
)(ApplyRopeFunction.apply)
