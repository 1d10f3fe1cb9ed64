"""Triton device helpers shared by the op files."""

import triton
import triton.language as tl  # noqa: F401  (a jit function's module must expose triton.language)


@triton.jit
def row_offsets(rows, n1, n2, s0, s1, s2):
    """Element offset of each row start: rows index a (n0, n1, n2) grid of leading dims with
    strides (s0, s1, s2) (int64: Flux-dev activations approach 2**31 elements in a batch)."""
    i2 = rows % n2
    r = rows // n2
    i1 = r % n1
    i0 = r // n1
    return i0 * s0 + i1 * s1 + i2 * s2
