"""Triton device helpers shared by the op files."""

import triton
import triton.language as tl


@triton.jit
def row_offsets(rows, n1, n2, s0, s1, s2):
    """Element offset of each row start: rows index a (n0, n1, n2) grid of leading dims with
    strides (s0, s1, s2) (int64: Flux-dev activations approach 2**31 elements in a batch)."""
    i2 = rows % n2
    r = rows // n2
    i1 = r % n1
    i0 = r // n1
    return i0 * s0 + i1 * s1 + i2 * s2


@triton.jit
def row_tile(pid, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program `pid`'s tile of BLOCK_M rows x BLOCK_N columns: (row indices as int64, column
    indices, column mask, 2-D mask of the elements that exist)."""
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    return rows.to(tl.int64), cols, cmask, rmask[:, None] & cmask[None, :]
