"""What the cuda backend's Triton op files share: the triton import, row addressing, launch sizes,
output buffers and the custom-op definition.

Triton is imported here once, guarded: where it is absent or broken, `jit` leaves kernels as plain
functions that are never launched (every kernel's check declines first, naming the import error),
so the op table and `flux-npu info` load without triton. The op files therefore use
`from __future__ import annotations` (Triton reads the `tl.constexpr` annotations as strings).

Row addressing. Every kernel works on rows (the last dim, stride 1). A row's start is decoded from
its index through up to three leading dims of any stride, so the (B, S, H, D) views Flux takes of
a projection (`unflatten` of (B, S, H*D), a chunk of a fused qkv output) are read in place; broadcast
operands (RoPE frequencies, AdaLN shift/scale) get stride 0 instead of being expanded in memory.

Persistent loops are written `blk = pid; while blk < n_blocks: ...; blk += programs`, not
`for blk in range(pid, n_blocks, programs)`: triton 3.6's interpreter turns a run-time loop bound into
an index with int() of a one-element numpy array, which numpy >= 2.4 refuses ("only 0-dimensional
arrays can be converted to Python scalars"), so every range() loop with a run-time bound fails
there; a while loop compiles to the same scf loop and runs under every interpreter.

Poisoning. Tests set `POISON = True` (or FLUX_NPU_TRITON_POISON=1): every buffer a launcher
allocates for a kernel to fill is then NaN instead of uninitialised, so an element a kernel forgets
to write fails the test instead of passing by luck.

Launches. Eager calls run an autograd.Function per op whose `forward` prepares the rows and
launches the kernel itself (`kernel[grid](...)`: triton's own launch, nothing of torch's between;
`launch` below hands the kernel back as is). torch.compile traces a custom op per kernel pair
instead, `flux_npu::triton_<name>` with registered autograd (the backward being another such op), so
compiled graphs and CUDA graphs take the kernels without a graph break. With compiled Triton the op
is a `torch.library.triton_op` whose launches go through `wrap_triton` while torch traces it (a
dispatch mode is active: fake tensors, functionalization, make_fx), so inductor sees the kernels and
the fake implementation is derived from the launcher. Outside tracing `wrap_triton` would dispatch
every launch through torch's higher-order op (pytree flattening, signature binding, side-table
locks): ~10x the host time of the launch itself, measured with triton's compiled-kernel path up to
its C launcher (tests/test_triton_launch_frames.py counts the frames so this cannot regress unseen).
Under TRITON_INTERPRET=1 `triton.jit` returns an InterpretedFunction, which torch >= 2.12's
`wrap_triton` hands back unwrapped and torch 2.11's refuses, and a triton_op's derived fake
implementation would run the interpreter on fake tensors ("Attempted to set the storage of a
tensor on device meta ..."). There the same launcher becomes an opaque `torch.library.custom_op`
with an explicit fake implementation: same name, schema and autograd, and `torch.library.opcheck`
passes on CPU tensors; interpreted kernels are never wrapped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.library import wrap_triton  # torch's own: needs triton only when a kernel is wrapped

from ...utils.env import env_flag

try:  # guarded: without triton, kernels stay plain functions and the checks say why
    import triton
    import triton.language as tl

    jit = triton.jit
    IMPORT_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install raising anything else
    triton = tl = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

    def jit(fn):
        return fn


POISON = env_flag("FLUX_NPU_TRITON_POISON")  # the one yes/no parser (utils/env.py)

# Largest row one program holds in registers (Flux's rows are 128 and 3072; T5's 4096). Longer rows
# would need a split-row kernel, which Flux never needs: they decline (checks mirror this value).
MAX_ROW = 16384
# Elements one program processes per step: several short rows per program keep the GPU busy for
# D=128 and keep the interpreter (which runs one program at a time in numpy) from crawling.
TILE = 4096
# Programs of a persistent backward grid under the interpreter (no SMs to count; a few programs
# still exercise the strided loop and the partial-row sum).
INTERPRETER_PROGRAMS = 3


@jit
def row_offsets(rows, n1, n2, s0, s1, s2):
    """Element offset of each row start: rows index a (n0, n1, n2) grid of leading dims with
    strides (s0, s1, s2). The indices are decoded in int32 (row counts fit it) and only the offsets
    are int64 (Flux-dev activations approach 2**31 elements in a batch): a 64-bit division compiles
    to a branch on whether its operands fit 32 bits, which splits a persistent loop's body into
    blocks that ptxas does not schedule across (the prefetched loads then wait behind the current
    block's reductions)."""
    r32 = rows.to(tl.int32)
    i2 = r32 % n2
    r = r32 // n2
    i1 = r % n1
    i0 = r // n1
    return i0.to(tl.int64) * s0 + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2


@jit
def row_tile(block, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row block `block`'s tile of BLOCK_M rows x BLOCK_N columns: (row indices as int64, column
    indices, column mask, 2-D mask of the elements that exist)."""
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # row counts fit int32; offsets below are int64
    rmask = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    return rows.to(tl.int64), cols, cmask, rmask[:, None] & cmask[None, :]


def empty(shape, dtype, device) -> torch.Tensor:
    """An output buffer: uninitialised, or NaN-filled when POISON is on."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def block_sizes(n_cols: int, n_rows: int, tile: int = TILE):
    """(BLOCK_M rows, BLOCK_N columns) for rows of `n_cols` elements, about `tile` elements.
    The row count is only compared, never converted, unless it is below one tile: under
    torch.compile with dynamic shapes a changing sequence length then causes no recompile."""
    block_n = next_pow2(max(n_cols, 1))
    block_m = max(1, min(tile // block_n, 64))
    if n_rows < block_m:
        block_m = next_pow2(max(n_rows, 1))
    return block_m, block_n


def row_blocks(n_cols: int, n_rows: int, tile: int = TILE):
    """(BLOCK_M, BLOCK_N, number of row blocks) of the row kernels."""
    bm, bn = block_sizes(n_cols, n_rows, tile)
    return bm, bn, cdiv(n_rows, bm)


def num_warps_for(block_elems: int) -> int:
    if block_elems >= 4096:
        return 8
    if block_elems >= 1024:
        return 4
    return 2


# Backward kernels hold about twice the float32 values per element of a forward (x, dy, the
# normalised x, the gradient) plus the next block's prefetched loads, so their registers, not their
# grid, bound how much memory traffic an SM keeps in flight. They take half-size tiles of short rows
# (D=128: 16 rows) and spread a single long row (D=3072: BLOCK_N 4096) over 16 warps, which halves the
# registers per thread (tests/test_triton_compile.py asserts no spills and the blocks in flight).
BWD_TILE = 2048


def bwd_warps(block_elems: int) -> int:
    """num_warps of a backward kernel's tile (see BWD_TILE)."""
    if block_elems >= 4096:
        return 16
    if block_elems >= 2048:
        return 8
    return num_warps_for(block_elems)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, n_blocks: int, per_sm: int, groups: int = 1) -> int:
    """Programs of a backward grid that loops over row blocks and writes one float32 partial row
    per program. On a GPU `per_sm` per SM in all, shared by `groups` (the (groups, programs) grids of
    the AdaLN kernels), so the partial buffers stay a few MB at Flux-dev shapes instead of one row per
    block. Each launcher passes as many programs per SM as its compiled code fits at once on sm_90
    with triton 3.6 (the GPU image's) and 3.9: a program more would only wait for a second wave, one
    fewer would leave registers idle (tests/test_triton_compile.py records every launch's grid and
    holds each kernel to what its binary fits). Under the interpreter a small fixed number per group."""
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    elif device.type == "cpu" and not INTERPRETED:  # compiled kernels on CPU tensors: a stand-in driver
        # compiling for a GPU target (tests/test_triton_compile.py); its SM count
        drv = triton.runtime.driver.active
        sms = drv.utils.get_device_properties(drv.get_current_device())["multiprocessor_count"]
    else:
        return max(1, min(INTERPRETER_PROGRAMS, n_blocks))
    return max(1, min(per_sm * sms // groups, n_blocks))


def word_pairs(n_cols: int, *rows: torch.Tensor) -> bool:
    """Whether these row tensors (last dim n_cols, stride 1) can be read and written as int32
    words of two elements: 16-bit elements, an even row length, and every row starting 4-byte
    aligned (even strides and storage offset, and an aligned address where there is one: a fake
    tensor of torch.compile's tracing has none, and torch allocates storages aligned)."""
    return n_cols % 2 == 0 and all(
        t.element_size() == 2 and t.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in t.stride()[:-1])
        and _address(t) % 4 == 0
        for t in rows
    )


def _address(t: torch.Tensor) -> int:
    """t's data pointer, or 0 for a tensor without one (fake and functional tensors while torch traces)."""
    try:
        return t.data_ptr()
    except RuntimeError:
        return 0


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


def launch(kernel):
    """`kernel` ready for `[grid](...)`: itself in eager (triton's own launch), wrapped by
    `wrap_triton` only while torch traces it: a dispatch mode is active (fake tensors,
    functionalization, make_fx: how torch.compile's AOT stage and a triton_op's fake implementation
    run the launchers; dynamo itself never enters them, the custom ops are opaque to it), so
    inductor sees the launch. Interpreted kernels are never wrapped (torch 2.11's wrap_triton
    refuses them; they only run eagerly, inside an opaque custom op)."""
    if _dispatch_modes() and _JIT is not None and isinstance(kernel, _JIT):
        return wrap_triton(kernel)
    return kernel


_dispatch_modes = torch._C._len_torch_dispatch_stack  # counts infra modes too (fake, functional, proxy)
try:
    from triton.runtime.jit import JITFunction as _JIT  # InterpretedFunction is not one
except Exception:  # no (working) triton: nothing is ever launched
    _JIT = None


def interpreted(kernel) -> bool:
    """Whether triton.jit made `kernel` an interpreter function (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


INTERPRETED = interpreted(row_offsets)  # how this process's triton.jit made every kernel


def define_op(name: str, fn: Callable, kernel, fake: Callable):
    """Register launcher `fn` as custom op `flux_npu::triton_<name>`: a triton_op when `kernel` is
    compiled Triton, else an opaque custom_op with the explicit `fake` (see the module doc)."""
    if IMPORT_ERROR is not None:
        return None  # never called: every kernel's check declines without triton
    qualname = f"flux_npu::triton_{name}"
    if interpreted(kernel):
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(qualname, fn, mutates_args=())


class TritonOp:
    """One kernel pair (forward and backward launchers) as custom ops with registered autograd:
    `.op` and `.bwd_op`, what torch.compile traces (the backward calls `ctx.bwd`, the backward op).
    Eager calls do not come here: each op file's autograd.Function launches the same kernels with
    no custom-op dispatch between (a custom-op call costs several times an autograd.Function call
    on the host, issue 9)."""

    def __init__(self, name, fwd, fwd_kernel, fwd_fake, bwd, bwd_kernel, bwd_fake, setup, backward):
        self.op = define_op(name, fwd, fwd_kernel, fwd_fake)
        self.bwd_op = define_op(name + "_bwd", bwd, bwd_kernel, bwd_fake)
        if self.op is not None:
            bwd_op = self.bwd_op

            def setup_op(ctx, inputs, output):
                setup(ctx, inputs, output)
                ctx.bwd = bwd_op

            self.op.register_autograd(backward, setup_context=setup_op)


def no_grad_placeholder(like: torch.Tensor) -> torch.Tensor:
    """Output slot of a gradient that does not exist (a custom op returns tensors only)."""
    return like.new_empty(0, dtype=torch.float32)
