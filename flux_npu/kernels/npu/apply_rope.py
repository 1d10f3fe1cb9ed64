"""NPU RoPE: torch_npu.npu_rotary_mul(x, r1, r2, rotary_mode="interleave").

Flux rotates adjacent pairs (x[2i], x[2i+1]); that is the op's *interleave* mode with r1 = cos and
r2 = sin, each repeated per pair (diffusers' (cos, sin) form already is). The half mode rotates
(x[i], x[i + D/2]) and would be wrong for Flux, so when a torch_npu build predates the
`rotary_mode` argument (detected once from the op's schema / signature / docstring) the kernel
declines and the reference runs.

Operands: interleave mode takes one cos/sin for every (batch, head): shape (1,1,S,D) for a BNSD
input, (1,S,1,D) for BSND, in x's dtype, on x's device, built on every call: a cache keyed on the
freqs tensor cannot see writes that bump no version counter (`.data.copy_`, DLPack aliases).
Frequencies that require grad (learnable RoPE) go to the reference, counted with the reason: the
operands read two of a BFL matrix's four entries, so the other two would get no gradient.
BFL rotation matrices (..., S, D/2, 2, 2) = [[cos, -sin], [sin, cos]] become cos/sin from entries
[0, 0] and [1, 0]. They must not vary over heads. BFL code builds them per batch element
((B, 1, S, ...), from per-sample ids); as interleave mode has no per-batch cos/sin, such a batch
is rotated one sample at a time. The op only rotates: BFL matrices that are not rotations
([[c, -s], [s, c]] exactly; checked on every call, one host sync) are handed
to the reference, counted as a fallback with the reason. Under torch.compile that check cannot
run, so BFL matrices are declined there (the reference traces into the graph).

Limits (docstring): 4-D input, D even and < 896, B*N < 1000, float16/bfloat16/float32,
Atlas A2/A3, and interleave only with jit_compile=False (`torch_npu.npu.set_compile_mode`; read
when a signature is planned, see `_support.jit_compile_declines`). B*N >= 1000 (a training
batch of 42+ at Flux's 24 heads) is met by splitting the
batch into chunks of B*N < 1000; only N >= 1000 heads declines. Chunks (and per-sample calls)
cost one concatenation, still far fewer passes over x than the reference's chain of elementwise
ops.
"""

from __future__ import annotations

import torch

from ...backends.npu import soc_declines
from ...ops import reference
from ...ops.registry import record_fallback, register_kernel
from ._support import TORCH_NPU, jit_compile_declines, op_has_param, torch_npu

CAPS = TORCH_NPU.using(vendor_op="npu_rotary_mul")

MAX_D = 896  # D < 896
MAX_BN = 1000  # B * N < 1000


def _layout(x, freqs, sequence_dim):
    """(B, N, S) of x and the sequence axis the operands must follow."""
    seq = 2 if isinstance(freqs, torch.Tensor) else sequence_dim
    heads = 1 if seq == 2 else 2
    return x.shape[0], x.shape[heads], x.shape[seq], seq


def _bfl_batch(freqs, x):
    """The batch BFL freqs carry: 1, or x's batch when built per sample; None when they vary over
    heads or do not line up with x (B, H, S). Leading dims align right against (B, H)."""
    if freqs.dim() < 4 or freqs.shape[-4] != x.shape[2]:
        return None
    lead = tuple(freqs.shape[:-4])
    if any(d != 1 for d in lead[:-2]):
        return None
    b, h = ((1, 1) + lead)[-2:]
    if h != 1 or b not in (1, x.shape[0]):
        return None
    return b


def _check(backend, x, freqs, sequence_dim):
    tensors = (freqs,) if isinstance(freqs, torch.Tensor) else tuple(freqs)
    why = CAPS.reason(backend, x, *tensors)
    if why:
        return why
    if x.dim() != 4:
        return f"{x.dim()}-D input (npu_rotary_mul takes 4-D BNSD/BSND)"
    D = x.shape[-1]
    if D % 2 or D >= MAX_D:
        return f"head dim {D} (npu_rotary_mul needs D even and < {MAX_D})"
    B, N, S, _ = _layout(x, freqs, sequence_dim)
    if N >= MAX_BN:
        return f"{N} heads: npu_rotary_mul interleave needs B*N < {MAX_BN} even for one sample"
    if isinstance(freqs, torch.Tensor) and _bfl_batch(freqs, x) is None:
        return (f"BFL freqs {tuple(freqs.shape)} vary over heads or do not match x {tuple(x.shape)}: interleave "
                "mode takes one cos/sin (1,1,S,D) for all heads (per batch element at most)")
    if isinstance(freqs, torch.Tensor) and torch.compiler.is_compiling():
        return ("BFL matrices under torch.compile: whether they are rotations (all npu_rotary_mul computes) "
                "cannot be checked inside a graph")
    why = op_has_param("npu_rotary_mul", "rotary_mode")
    if why:
        return why
    why = jit_compile_declines("npu_rotary_mul(rotary_mode='interleave')")
    if why:
        return why
    return soc_declines(x.dtype, "rotary_interleave")


def _operands(freqs, seq, dtype, batch):
    """(r1, r2): (batch, 1, S, D) for BFL freqs (batch 1 or per sample), (1,1,S,D) / (1,S,1,D)
    for a (cos, sin) pair, in x's dtype."""
    if isinstance(freqs, torch.Tensor):
        rotation = bool(
            torch.equal(freqs[..., 0, 0], freqs[..., 1, 1]) and torch.equal(freqs[..., 0, 1], -freqs[..., 1, 0])
        )
        S, half = freqs.shape[-4], freqs.shape[-3]
        cos = freqs[..., 0, 0].reshape(batch, 1, S, half).repeat_interleave(2, dim=-1)
        sin = freqs[..., 1, 0].reshape(batch, 1, S, half).repeat_interleave(2, dim=-1)
        return cos.to(dtype).contiguous(), sin.to(dtype).contiguous(), rotation
    cos, sin = freqs
    shape = (1, 1, cos.shape[0], cos.shape[1]) if seq == 2 else (1, cos.shape[0], 1, cos.shape[1])
    return cos.to(dtype).reshape(shape).contiguous(), sin.to(dtype).reshape(shape).contiguous(), True


@register_kernel("apply_rope", "npu", "torch_npu.npu_rotary_mul", check=_check, caps=CAPS)
def rotary_mul(backend, x, freqs, sequence_dim):
    """torch_npu.npu_rotary_mul(x, cos, sin, rotary_mode="interleave")."""
    _, _, _, seq = _layout(x, freqs, sequence_dim)
    bfl = isinstance(freqs, torch.Tensor)
    batch = _bfl_batch(freqs, x) if bfl else 1
    keys = (freqs,) if bfl else tuple(freqs)
    if torch.is_grad_enabled() and any(t.requires_grad for t in keys):
        record_fallback("apply_rope", backend.name, "torch_npu.npu_rotary_mul: frequencies require grad "
                        "(learnable RoPE); the reference gives their gradient")
        return reference.apply_rope(x, freqs, sequence_dim)
    r1, r2, rotation = _operands(freqs, seq, x.dtype, batch)
    if not rotation:
        record_fallback("apply_rope", backend.name, "torch_npu.npu_rotary_mul: BFL matrices are not rotations "
                        "[[c, -s], [s, c]]; the op can only rotate")
        return reference.apply_rope(x, freqs, sequence_dim)
    rotary_mul = torch_npu().npu_rotary_mul
    B, N = x.shape[0], x.shape[1 if seq == 2 else 2]
    chunk = 1 if batch > 1 else max(1, (MAX_BN - 1) // N)  # keep every call's B*N < 1000
    if chunk >= B:
        return rotary_mul(x.contiguous(), r1, r2, rotary_mode="interleave")
    parts = []
    for start in range(0, B, chunk):
        r = slice(start, start + 1) if batch > 1 else slice(None)
        parts.append(rotary_mul(x[start:start + chunk].contiguous(), r1[r], r2[r], rotary_mode="interleave"))
    return torch.cat(parts, dim=0)
