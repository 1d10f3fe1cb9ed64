"""Launch helpers shared by the Triton op files (imported only by them, so only lazily).

Row addressing. Every kernel here works on "rows" (the last dim of a tensor). A row's start is
found from its index through up to three leading dims of any stride, so the (B, S, H, D) views
that Flux takes of a projection (`unflatten` of (B, S, H*D), or a chunk of a fused qkv output)
are read in place, without a `.contiguous()` copy. Only the last dim must have stride 1.

Poisoning. Tests set `POISON = True` (or FLUX_NPU_TRITON_POISON=1): every buffer a launcher
allocates for a kernel to fill is then created full of NaN instead of uninitialised, so an element
a kernel forgets to write fails the test instead of passing by luck.
"""

from __future__ import annotations

import os

import torch
import triton

POISON = os.environ.get("FLUX_NPU_TRITON_POISON", "") not in ("", "0")

# Largest row one program holds in registers. Flux's rows are 128 (head dim) and 3072 (hidden);
# longer rows would need a two-pass (split-row) kernel, which Flux never needs: they decline.
MAX_ROW = 16384
# Elements one program processes per step: several short rows per program keep the GPU busy for
# D=128 and keep the interpreter (which runs one program at a time in numpy) from crawling.
TILE = 4096


def empty(shape, dtype, device) -> torch.Tensor:
    """An output buffer: uninitialised, or NaN-filled when POISON is on."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def block_sizes(n_cols: int, n_rows: int):
    """(BLOCK_M rows, BLOCK_N columns) for rows of `n_cols` elements."""
    block_n = triton.next_power_of_2(max(n_cols, 1))
    block_m = max(1, min(TILE // block_n, triton.next_power_of_2(max(n_rows, 1)), 64))
    return block_m, block_n


def num_warps_for(block_elems: int) -> int:
    if block_elems >= 4096:
        return 8
    if block_elems >= 1024:
        return 4
    return 2


def as_4d(t: torch.Tensor) -> torch.Tensor:
    """View t as 4-D (leading size-1 dims added; more than 4 dims merged where strides allow)."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    if t.dim() > 4:
        t = t.reshape(-1, *t.shape[-3:])
    return t


def last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim has stride 1 (rows addressable), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def row_args(t: torch.Tensor):
    """(stride0, stride1, stride2) of a 4-D tensor's leading dims, for the kernels' row decoding."""
    return t.stride(0), t.stride(1), t.stride(2)
