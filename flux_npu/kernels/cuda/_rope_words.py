"""qk_norm_rope's backward for 16-bit q and k with both weights (Flux's QK norm on every attention)
as 32-bit words: `_rope_words_bwd` and what it reads (`word_freqs`), beside apply_rope.py, whose
backward launcher picks it where its conditions hold (see `_rope_words_bwd`'s docstring and
apply_rope.py's module docstring)."""

from __future__ import annotations

import torch

from . import _triton as T
from ._triton import jit, row_tile, tl
from .rms_norm import _halves, _words


@jit
def _word_starts(blk, n1, n2, a0, a1, a2, b0, b1, b2, fs0, fs1, fs2, BLOCK_M: tl.constexpr):
    """Where row block `blk`'s first row starts (scalars): the frequencies in elements, x of both
    tensors in 32-bit words. The launcher takes this kernel only where a block's rows lie in one
    run of the innermost leading dim (n2 a multiple of BLOCK_M), so row j starts j strides s2
    further on: one scalar decoding a block, no per-row division and nothing to carry across
    iterations in a per-row register layout."""
    r = blk * BLOCK_M
    i2 = (r % n2).to(tl.int64)
    r = r // n2
    i1 = (r % n1).to(tl.int64)
    i0 = (r // n1).to(tl.int64)
    return i0 * fs0 + i1 * fs1 + i2 * fs2, (i0 * a0 + i1 * a1 + i2 * a2) // 2, (i0 * b0 + i1 * b1 + i2 * b2) // 2


@jit
def _floats(words):
    """The two float32 of int64 words (little-endian: low half first)."""
    return words.to(tl.int32).to(tl.float32, bitcast=True), (words >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@jit
def _word_loads(X0, X1, DY0, DY1, F0, blk, foff, x0off, x1off, n_rows, n_words, a2, b2, fs2,
                COS_SIN: tl.constexpr, BLOCK_M: tl.constexpr, WORDS: tl.constexpr):
    """Every load of row block `blk` for _rope_words_bwd (zeros past the end), each a (BLOCK_M,
    WORDS) tile, so all take one register layout: the frequencies as int64 words of two float32
    (the launcher's `word_freqs` rows: (cos, sin) of each pair, or a BFL row's (M00, M01) words
    then its (M10, M11) words; the second tile repeats the first with cos/sin), and dy and x of both
    tensors as int32 words of two 16-bit elements.
    Every half of every word is used, so none is dropped and repacked after the load."""
    rows, lanes, _, mask = row_tile(blk, n_rows, n_words, BLOCK_M, WORDS)
    j = tl.arange(0, BLOCK_M).to(tl.int64)[:, None]
    fw = (foff + j * fs2) // 2 + lanes[None, :]
    fa = tl.load(F0.to(tl.pointer_type(tl.int64)) + fw, mask=mask, other=0)
    fb = fa
    if not COS_SIN:
        fb = tl.load(F0.to(tl.pointer_type(tl.int64)) + fw + n_words, mask=mask, other=0)
    dense = rows[:, None] * n_words + lanes[None, :]
    dy0 = tl.load(DY0.to(tl.pointer_type(tl.int32)) + dense, mask=mask, other=0)
    x0 = tl.load(X0.to(tl.pointer_type(tl.int32)) + x0off + j * (a2 // 2) + lanes[None, :], mask=mask, other=0)
    dy1 = tl.load(DY1.to(tl.pointer_type(tl.int32)) + dense, mask=mask, other=0)
    x1 = tl.load(X1.to(tl.pointer_type(tl.int32)) + x1off + j * (b2 // 2) + lanes[None, :], mask=mask, other=0)
    return fa, fb, dy0, dy1, x0, x1


@jit
def _unrotate_words(x_raw, dy_raw, w_lo, w_hi, DX, rows, lanes, mask, n_cols, n_words, eps, m00, m01, m10, m11):
    """_unrotate_rows (NORM and HAS_W) on 32-bit words: stores dx's words and returns the block's
    weight-gradient terms of the even and odd elements."""
    d0, d1 = _halves(dy_raw, DX.dtype.element_ty)
    g0 = m00 * d0 + m10 * d1  # M^T dout
    g1 = m01 * d0 + m11 * d1
    x0, x1 = _halves(x_raw, DX.dtype.element_ty)
    rstd = 1.0 / tl.sqrt(tl.sum(x0 * x0 + x1 * x1, axis=1) / n_cols + eps)
    h0 = x0 * rstd[:, None]
    h1 = x1 * rstd[:, None]
    dw0 = g0 * h0
    dw1 = g1 * h1
    g0 = g0 * w_lo[None, :]
    g1 = g1 * w_hi[None, :]
    c = tl.sum(g0 * h0 + g1 * h1, axis=1) / n_cols
    dx = _words(rstd[:, None] * (g0 - h0 * c[:, None]), rstd[:, None] * (g1 - h1 * c[:, None]), DX.dtype.element_ty)
    tl.store(DX.to(tl.pointer_type(tl.int32)) + rows[:, None] * n_words + lanes[None, :], dx, mask=mask)
    return dw0, dw1


@jit
def _rope_words_bwd(
    X0, X1, W0, W1, DY0, DY1, DX0, DX1, DW, F0, F1, n_rows, n_cols, n_blocks, n1, n2,
    a0, a1, a2, b0, b1, b2, fs0, fs1, fs2, eps,
    COS_SIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """_rope_bwd with NORM, HAS_W and TWO (qk_norm_rope with both weights, Flux's QK norm) for
    16-bit q and k (the launcher says when), written as rms_norm's _rms_norm_words_bwd so that
    ptxas issues the next block's loads at the top of an iteration and first waits for them late
    in it (tests/test_triton_compile.py measures where; _rope_bwd waits a third of the way in):
    - a RoPE pair is a 32-bit word of x, dy and dx: its even and odd elements are two float32
      halves, no tl.reshape/split/join;
    - every load is a (BLOCK_M, BLOCK_D / 2) tile of contiguous words, so all take one register
      layout (no conversion through shared memory): the frequencies as int64 words of two float32
      (`word_freqs`: cos and sin of a pair side by side, or a BFL pair's matrix rows), every half
      of every word used (a word with a dead half is repacked right after its load, which waits);
    - the next block's loads sit in a branch of their own (in one basic block with the reductions
      ptxas issues them after the reductions), and carry raw words (a decoded tile is computed in
      the iteration that loads it);
    - the next block's row starts are decoded an iteration ahead, as scalars (`_word_starts`:
      a row start carried as a column would be converted between layouts each iteration)."""
    WORDS: tl.constexpr = BLOCK_D // 2
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    n_words = n_cols // 2
    lanes = tl.arange(0, WORDS)
    lmask = lanes < n_words
    w0_lo = tl.load(W0 + 2 * lanes, mask=lmask, other=0.0).to(tl.float32)
    w0_hi = tl.load(W0 + 2 * lanes + 1, mask=lmask, other=0.0).to(tl.float32)
    w1_lo = tl.load(W1 + 2 * lanes, mask=lmask, other=0.0).to(tl.float32)
    w1_hi = tl.load(W1 + 2 * lanes + 1, mask=lmask, other=0.0).to(tl.float32)
    dw0_lo = tl.zeros((BLOCK_M, WORDS), dtype=tl.float32)  # summed over rows after the loop, as _rope_bwd
    dw0_hi = tl.zeros((BLOCK_M, WORDS), dtype=tl.float32)
    dw1_lo = tl.zeros((BLOCK_M, WORDS), dtype=tl.float32)
    dw1_hi = tl.zeros((BLOCK_M, WORDS), dtype=tl.float32)
    blk = pid
    foff, x0off, x1off = _word_starts(blk, n1, n2, a0, a1, a2, b0, b1, b2, fs0, fs1, fs2, BLOCK_M)
    fa, fb, dy0, dy1, x0, x1 = _word_loads(X0, X1, DY0, DY1, F0, blk, foff, x0off, x1off, n_rows, n_words, a2, b2, fs2,
                                           COS_SIN, BLOCK_M, WORDS)
    foff, x0off, x1off = _word_starts(blk + programs, n1, n2, a0, a1, a2, b0, b1, b2, fs0, fs1, fs2, BLOCK_M)
    while blk < n_blocks:  # one partial dw row per program and tensor (see _triton.py: a while loop, not range())
        if blk + programs < n_blocks:
            nfa, nfb, ndy0, ndy1, nx0, nx1 = _word_loads(
                X0, X1, DY0, DY1, F0, blk + programs, foff, x0off, x1off, n_rows, n_words, a2, b2, fs2,
                COS_SIN, BLOCK_M, WORDS)
        else:
            nfa = tl.zeros((BLOCK_M, WORDS), tl.int64)
            nfb = nfa
            ndy0 = tl.zeros((BLOCK_M, WORDS), tl.int32)
            ndy1 = ndy0
            nx0 = ndy0
            nx1 = ndy0
        foff, x0off, x1off = _word_starts(blk + 2 * programs, n1, n2, a0, a1, a2, b0, b1, b2, fs0, fs1, fs2, BLOCK_M)
        rows, _, _, mask = row_tile(blk, n_rows, n_words, BLOCK_M, WORDS)
        # the block's matrices serve both tensors (q and k)
        if COS_SIN:  # M = [[c, -s], [s, c]]
            m00, m10 = _floats(fa)
            m01 = -m10
            m11 = m00
        else:
            m00, m01 = _floats(fa)
            m10, m11 = _floats(fb)
        lo, hi = _unrotate_words(x0, dy0, w0_lo, w0_hi, DX0, rows, lanes, mask, n_cols, n_words, eps,
                                 m00, m01, m10, m11)
        dw0_lo += lo
        dw0_hi += hi
        lo, hi = _unrotate_words(x1, dy1, w1_lo, w1_hi, DX1, rows, lanes, mask, n_cols, n_words, eps,
                                 m00, m01, m10, m11)
        dw1_lo += lo
        dw1_hi += hi
        fa, fb, dy0, dy1, x0, x1 = nfa, nfb, ndy0, ndy1, nx0, nx1
        blk += programs
    tl.store(DW + pid * n_cols + 2 * lanes, tl.sum(dw0_lo, axis=0), mask=lmask)
    tl.store(DW + pid * n_cols + 2 * lanes + 1, tl.sum(dw0_hi, axis=0), mask=lmask)
    tl.store(DW + (programs + pid) * n_cols + 2 * lanes, tl.sum(dw1_lo, axis=0), mask=lmask)
    tl.store(DW + (programs + pid) * n_cols + 2 * lanes + 1, tl.sum(dw1_hi, axis=0), mask=lmask)


def word_freqs(f0: torch.Tensor, f1: torch.Tensor | None):
    """The frequencies re-laid for _rope_words_bwd, float32 rows of the same length as the
    originals, read as int64 words of two floats: (cos, sin) of each pair's even column side by
    side ((S, D) from (S, D) cos and sin: half of what the rows hold, the other columns are never
    used), or a BFL row's (D/2, 2, 2) block as its pairs' (M00, M01) then their (M10, M11). One
    small copy of the un-broadcast frequencies (S rows) per backward, so that every word loaded is
    used in full (a word with a dead half is unpacked right after its load, which waits for it)."""
    if f1 is None:
        return f0.float().transpose(-3, -2).contiguous(), None
    cs = torch.stack((f0.float()[..., ::2], f1.float()[..., ::2]), -1).flatten(-2)
    return cs, cs  # as (cos, sin): one tensor, its strides shared


# _rope_words_bwd with cos/sin: triton 3.6's ptxas allocates it 150 registers a thread unasked (3
# programs of 4 warps per SM), 128 when capped there, without spilling (4 per SM, as triton 3.9's
# allocates unasked; capped, 3.9's spills 8 bytes): the cap is given below triton 3.9 only (3.8's,
# capped: 128, no spill, first wait 0.69).
# Read once at import, not per launch.
_CAP_COS_SIN = T.triton is not None and tuple(int(v) for v in T.triton.__version__.split(".")[:2]) < (3, 9)


def _words_maxnreg(cos_sin: bool) -> dict:
    """The launch's register cap for _rope_words_bwd."""
    return {"maxnreg": 128} if cos_sin and _CAP_COS_SIN else {}
