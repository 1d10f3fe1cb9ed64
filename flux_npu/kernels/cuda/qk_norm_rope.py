"""Fused QK-norm + RoPE on CUDA in Triton: RoPE(RMSNorm(q) * q_weight), RoPE(RMSNorm(k) * k_weight).

Flux normalises q and k over the head dim and rotates them right after. Here q and k are each read
once and written once, and both go through one launch of the RoPE kernel with its RMSNorm
prologue (`apply_rope.py`, NORM and TWO on: each program reads a row block's frequencies once and
applies them to q and k). The backward is one launch too (after a small copy of the frequencies
where it reads them as 64-bit words: `_rope_words.word_freqs`), with the two weight gradients reduced
on a persistent grid that prefetches each next row block. q and k of different shapes, dtypes or weight
presence (never the case in Flux) take one launch each.
Custom ops `flux_npu::triton_qk_norm_rope` / `_bwd`, autograd, check and registration.
"""

from __future__ import annotations

import torch

from ...ops.registry import register_kernel
from .._common import check_qk_norm_rope, composed_qk_norm_rope
from . import _triton as T
from ._checks import TRITON, freqs_reason, row_reason, triton_reason
from .apply_rope import _rope_bwd, _rope_fwd, bwd_launch, freq_tensors, fwd_launch, split_freqs


def _one_launch(q, k, q_weight, k_weight) -> bool:
    if q.shape != k.shape or q.dtype != k.dtype or (q_weight is None) != (k_weight is None):
        return False
    return q_weight is None or q_weight.dtype == k_weight.dtype


class QKNormRopeFunction(torch.autograd.Function):
    """Eager QK-norm + RoPE: `forward` prepares the rows and calls the shared launcher
    (ops.qk_norm_rope -> dispatch -> apply -> forward -> fwd_launch)."""

    @staticmethod
    def forward(ctx, backend, q, k, q_weight, k_weight, freqs, eps, sequence_dim):
        for name, t in (("q", q), ("k", k)):
            if t.dim() > 4:
                raise ValueError(f"triton qk_norm_rope takes at most 4-D {name}, got {t.dim()}-D")
        q4, k4 = T.last_dim_unit(T.as_4d(q)), T.last_dim_unit(T.as_4d(k))
        f0, f1 = split_freqs(freqs)
        eps, sd = float(eps), sequence_dim + 4 - q.dim()
        if _one_launch(q4, k4, q_weight, k_weight):
            yq, yk = fwd_launch([q4, k4], [q_weight, k_weight], f0, f1, sd, True, eps)
        else:
            yq, yk = _fwd(q4, k4, q_weight, k_weight, f0, f1, eps, sd)
        ctx.save_for_backward(q4, k4, q_weight, k_weight, f0, f1)
        ctx.eps, ctx.sequence_dim = eps, sd
        return yq.view(q.shape), yk.view(k.shape)

    @staticmethod
    def backward(ctx, dyq, dyk):
        q4, k4, q_weight, k_weight, f0, f1 = ctx.saved_tensors
        dq, dk, dqw, dkw = _bwd(q4, k4, q_weight, k_weight, f0, f1, dyq.reshape(q4.shape), dyk.reshape(k4.shape),
                                ctx.eps, ctx.sequence_dim)
        need = ctx.needs_input_grad
        return (
            None, dq.view(dyq.shape), dk.view(dyk.shape),
            dqw if q_weight is not None and need[3] else None, dkw if k_weight is not None and need[4] else None,
            None, None, None,
        )


def _fwd(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
    f0: torch.Tensor, f1: torch.Tensor | None, eps: float, sequence_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k 4-D with unit last-dim stride; (f0, f1) as `rope.apply_rope_op`. Dense outputs."""
    if _one_launch(q, k, q_weight, k_weight):
        yq, yk = fwd_launch([q, k], [q_weight, k_weight], f0, f1, sequence_dim, True, eps)
    else:
        (yq,) = fwd_launch([q], [q_weight], f0, f1, sequence_dim, True, eps)
        (yk,) = fwd_launch([k], [k_weight], f0, f1, sequence_dim, True, eps)
    return yq, yk


def _fwd_fake(q, k, q_weight, k_weight, f0, f1, eps, sequence_dim):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _bwd(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
    f0: torch.Tensor, f1: torch.Tensor | None, dyq: torch.Tensor, dyk: torch.Tensor, eps: float, sequence_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dq_weight, dk_weight); a weight that is None gets an empty placeholder."""
    if _one_launch(q, k, q_weight, k_weight):
        (dq, dk), dws = bwd_launch([q, k], [q_weight, k_weight], [dyq, dyk], f0, f1, sequence_dim, True, eps)
        dws = dws or [None, None]
    else:
        (dq,), dwq = bwd_launch([q], [q_weight], [dyq], f0, f1, sequence_dim, True, eps)
        (dk,), dwk = bwd_launch([k], [k_weight], [dyk], f0, f1, sequence_dim, True, eps)
        dws = [dwq[0] if dwq else None, dwk[0] if dwk else None]
    out = []
    for w, dw in zip((q_weight, k_weight), dws, strict=False):
        out.append(dw.to(w.dtype) if w is not None else T.no_grad_placeholder(q))
    return dq, dk, out[0], out[1]


def _bwd_fake(q, k, q_weight, k_weight, f0, f1, dyq, dyk, eps, sequence_dim):
    dws = [w.new_empty(w.shape) if w is not None else T.no_grad_placeholder(q) for w in (q_weight, k_weight)]
    return q.new_empty(q.shape), k.new_empty(k.shape), dws[0], dws[1]


def _setup(ctx, inputs, output):
    q, k, q_weight, k_weight, f0, f1, eps, sequence_dim = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, f0, f1)
    ctx.eps, ctx.sequence_dim = eps, sequence_dim


def _backward(ctx, dyq, dyk):
    q, k, q_weight, k_weight, f0, f1 = ctx.saved_tensors
    dq, dk, dqw, dkw = ctx.bwd(q, k, q_weight, k_weight, f0, f1, dyq, dyk, ctx.eps, ctx.sequence_dim)
    need = ctx.needs_input_grad
    return (
        dq, dk, dqw if q_weight is not None and need[2] else None, dkw if k_weight is not None and need[3] else None,
        None, None, None, None,
    )


_QK_NORM_ROPE = T.TritonOp("qk_norm_rope", _fwd, _rope_fwd, _fwd_fake, _bwd, _rope_bwd, _bwd_fake, _setup, _backward)
qk_norm_rope_op, qk_norm_rope_bwd_op = _QK_NORM_ROPE.op, _QK_NORM_ROPE.bwd_op


def qk_norm_rope(q, k, q_weight, k_weight, freqs, eps: float = 1e-6, sequence_dim: int = 2):
    """(RoPE(RMSNorm(q)), RoPE(RMSNorm(k))) as `flux_npu.ops.reference.qk_norm_rope`, in one launch;
    differentiable in q, k and both weights. Under torch.compile: the custom op."""
    if not torch.compiler.is_compiling():
        return QKNormRopeFunction.apply(None, q, k, q_weight, k_weight, freqs, eps, sequence_dim)
    for name, t in (("q", q), ("k", k)):
        if t.dim() > 4:
            raise ValueError(f"triton qk_norm_rope takes at most 4-D {name}, got {t.dim()}-D")
    q4, k4 = (T.last_dim_unit(T.as_4d(t)) for t in (q, k))
    f0, f1 = split_freqs(freqs)
    yq, yk = qk_norm_rope_op(q4, k4, q_weight, k_weight, f0, f1, float(eps), sequence_dim + 4 - q.dim())
    return yq.view(q.shape), yk.view(k.shape)


def _check(backend, q, k, q_weight, k_weight, freqs, eps, sequence_dim):
    if not isinstance(freqs, (torch.Tensor, tuple, list)):
        return "freqs of an unknown form"
    why = triton_reason(backend, q, k, q_weight, k_weight, *freq_tensors(freqs)) or row_reason(q.shape[-1])
    if why:
        return why
    for n, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None and (not isinstance(w, torch.Tensor) or w.dim() != 1 or w.shape[0] != q.shape[-1]):
            return f"{n} must be None or a ({q.shape[-1]},) tensor"
    if q.shape[-1] != k.shape[-1] or q.dim() != k.dim():
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in head dim or rank"
    return freqs_reason(q, freqs, sequence_dim) or freqs_reason(k, freqs, sequence_dim)


def _traced(backend, q, k, q_weight, k_weight, freqs, eps, sequence_dim):
    return qk_norm_rope(q, k, q_weight, k_weight, freqs, eps, sequence_dim)


register_kernel(
    "qk_norm_rope", "cuda", "triton.qk_norm_rope", check=_check, traced=_traced, caps=TRITON,
    doc="Triton RMSNorm + RoPE of q and k in one launch (one read and one write of each).",
)(QKNormRopeFunction.apply)

# Where the fused kernel declines, the backend's own rms_norm and apply_rope kernels composed (a
# registered kernel, so the fallback named "reference" is only ever the plain-torch one).
register_kernel("qk_norm_rope", "cuda", "composed(rms_norm, apply_rope)", check=check_qk_norm_rope)(
    composed_qk_norm_rope
)
