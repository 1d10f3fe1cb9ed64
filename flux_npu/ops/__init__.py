"""The op catalogue: public, dispatching entry points.

Every op validates its arguments once (a clear error naming the problem and the fix), then runs
the active backend's first kernel that accepts the input, else the plain-torch reference
(`flux_npu.ops.reference`), recording why. `backend=` overrides the active backend for one call.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference
from .precision import FLOAT_DTYPES, rope_compute_dtype
from .registry import (
    OPS,
    Kernel,
    KernelDeclined,
    active_backend,
    dispatch,
    dispatch_stats,
    explain,
    fused_ops,
    kernels_for,
    record_fallback,
    register_kernel,
    reset_dispatch_stats,
    set_strict,
    use_backend,
)


def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _float(op, name, t):
    _tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype}; supported dtypes are float32, bfloat16, float16 and "
            f"float64. Cast it first (e.g. {name}.float())."
        )


def _same_device(op, **tensors):
    devs = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devs.values())) > 1:
        raise ValueError(f"{op}: tensors are on different devices ({devs}); move them to one device first")


def attention(q, k, v, mask=None, scale: Optional[float] = None, layout: str = "BHSD", *, backend=None):
    """Scaled dot-product attention. q, k, v: (B, H, S, D) (`layout="BSHD"`: (B, S, H, D)).

    mask: None, bool (True = attend) or additive float, broadcastable to (B, H, Sq, Sk).
    scale: defaults to 1/sqrt(D). Output: q's layout and dtype."""
    for n, t in (("q", q), ("k", k), ("v", v)):
        _float("attention", n, t)
        if t.dim() != 4:
            raise ValueError(f"attention: {n} must be 4-D {layout}, got shape {tuple(t.shape)}")
    if layout not in reference.LAYOUTS:
        raise ValueError(f"attention: layout must be one of {reference.LAYOUTS}, got {layout!r}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    h, s = (1, 2) if layout == "BHSD" else (2, 1)
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"attention: batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[s] != v.shape[s] or k.shape[h] != v.shape[h]:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} disagree on heads or sequence ({layout})")
    if q.shape[h] % k.shape[h]:
        raise ValueError(f"attention: q has {q.shape[h]} heads, not a multiple of k/v's {k.shape[h]} ({layout})")
    if mask is not None:
        _tensor("mask", mask)
        target = (q.shape[0], q.shape[h], q.shape[s], k.shape[s])
        try:
            torch.broadcast_shapes(mask.shape, target)
        except RuntimeError:
            raise ValueError(
                f"attention: mask of shape {tuple(mask.shape)} does not broadcast to (B, H, Sq, Sk) = {target}"
            ) from None
        if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
            raise TypeError(f"attention: mask must be bool (True = attend) or an additive float mask, got {mask.dtype}")
    _same_device("attention", q=q, k=k, v=v, mask=mask)
    return dispatch("attention", reference.attention, backend, (q, k, v, mask, scale, layout), {})


def rope_freqs(pos, dim: int, theta: float = 10000.0, form: str = "bfl", *, backend=None):
    """RoPE frequencies (see `reference.rope_freqs`), computed in float64 where the backend has
    it and in float32 where it does not (NPU); always returned as float32."""
    _tensor("pos", pos)
    if dim <= 0 or dim % 2:
        raise ValueError(f"rope_freqs: dim must be a positive even number, got {dim}")
    if form not in ("bfl", "cos_sin"):
        raise ValueError(f"rope_freqs: form must be 'bfl' or 'cos_sin', got {form!r}")
    if form == "cos_sin" and pos.dim() != 1:
        raise ValueError(f"rope_freqs: form='cos_sin' takes 1-D positions (S,), got shape {tuple(pos.shape)}")
    b = active_backend() if backend is None else _resolve_backend(backend)
    cdt = rope_compute_dtype(b, pos.device)

    def ref(pos, dim, theta, form):
        return reference.rope_freqs(pos, dim, theta, form, compute_dtype=cdt)

    return dispatch("rope_freqs", ref, b, (pos, dim, theta, form), {})


def apply_rope(x, freqs, sequence_dim: int = 2, *, backend=None):
    """Rotate adjacent pairs of x's last dim (see `reference.apply_rope` for both freqs forms)."""
    _float("apply_rope", "x", x)
    if x.shape[-1] % 2:
        raise ValueError(f"apply_rope: the last dim of x must be even, got {x.shape[-1]}")
    if isinstance(freqs, torch.Tensor):
        if freqs.dim() < 3 or tuple(freqs.shape[-2:]) != (2, 2) or freqs.shape[-3] * 2 != x.shape[-1]:
            raise ValueError(
                f"apply_rope: BFL freqs must be (..., S, D/2, 2, 2) with D/2 = {x.shape[-1] // 2}, got {tuple(freqs.shape)}"
            )
        try:
            torch.broadcast_shapes(freqs.shape[:-3], x.shape[:-1])
        except RuntimeError:
            raise ValueError(f"apply_rope: freqs {tuple(freqs.shape)} do not broadcast against x {tuple(x.shape)}") from None
        _same_device("apply_rope", x=x, freqs=freqs)
    elif isinstance(freqs, (tuple, list)) and len(freqs) == 2:
        cos, sin = freqs
        _float("apply_rope", "cos", cos)
        _float("apply_rope", "sin", sin)
        if sequence_dim not in (1, 2) or x.dim() != 4:
            raise ValueError(f"apply_rope: (cos, sin) form needs a 4-D x and sequence_dim 1 or 2, got {x.dim()}-D, {sequence_dim}")
        want = (x.shape[sequence_dim], x.shape[-1])
        if tuple(cos.shape) != want or tuple(sin.shape) != want:
            raise ValueError(f"apply_rope: cos/sin must be (S, D) = {want}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
        freqs = (cos, sin)
    else:
        raise TypeError("apply_rope: freqs must be a BFL rotation tensor (..., S, D/2, 2, 2) or a (cos, sin) pair")
    return dispatch("apply_rope", reference.apply_rope, backend, (x, freqs, sequence_dim), {})


def rms_norm(x, weight=None, eps: float = 1e-6, out_dtype: Optional[torch.dtype] = None, *, backend=None):
    """RMSNorm over the last dim, float32 accumulation, output dtype `out_dtype` or x.dtype."""
    _float("rms_norm", "x", x)
    if weight is not None:
        _float("rms_norm", "weight", weight)
        if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(f"rms_norm: weight must be ({x.shape[-1]},) for x {tuple(x.shape)}, got {tuple(weight.shape)}")
        _same_device("rms_norm", x=x, weight=weight)
    return dispatch("rms_norm", reference.rms_norm, backend, (x, weight, eps, out_dtype), {})


def layer_norm_modulate(x, shift, scale, eps: float = 1e-6, *, backend=None):
    """AdaLN modulation: (1 + scale) * LayerNorm(x) + shift; shift/scale broadcast against x."""
    _float("layer_norm_modulate", "x", x)
    for n, t in (("shift", shift), ("scale", scale)):
        _float("layer_norm_modulate", n, t)
        if t.shape[-1] != x.shape[-1]:
            raise ValueError(f"layer_norm_modulate: {n} last dim {t.shape[-1]} != x's {x.shape[-1]}")
        try:
            if torch.broadcast_shapes(t.shape, x.shape) != x.shape:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(
                f"layer_norm_modulate: {n} of shape {tuple(t.shape)} does not broadcast to x {tuple(x.shape)} "
                f"(pass (B, 1, D) for a (B, S, D) x)"
            ) from None
    _same_device("layer_norm_modulate", x=x, shift=shift, scale=scale)
    return dispatch("layer_norm_modulate", reference.layer_norm_modulate, backend, (x, shift, scale, eps), {})


def gated_residual(x, gate, y, *, backend=None):
    """x + gate * y (Flux's gated residual), output dtype = x.dtype."""
    for n, t in (("x", x), ("gate", gate), ("y", y)):
        _float("gated_residual", n, t)
    if y.shape != x.shape:
        raise ValueError(f"gated_residual: y {tuple(y.shape)} must have x's shape {tuple(x.shape)}")
    return dispatch("gated_residual", reference.gated_residual, backend, (x, gate, y), {})


def qk_norm_rope(q, k, q_weight, k_weight, freqs, eps: float = 1e-6, sequence_dim: int = 2, *, backend=None):
    """RMSNorm(q), RMSNorm(k) (own weights) then RoPE on both: one fused pass where the backend
    has a kernel; elsewhere the backend's own rms_norm and apply_rope kernels, composed."""
    for n, t in (("q", q), ("k", k)):
        _float("qk_norm_rope", n, t)
    if q.shape != k.shape:
        raise ValueError(f"qk_norm_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must have one shape")
    b = active_backend() if backend is None else _resolve_backend(backend)

    def composed(q, k, q_weight, k_weight, freqs, eps, sequence_dim):
        # validation of weights and freqs happens in the two ops
        qn = rms_norm(q, q_weight, eps, backend=b)
        kn = rms_norm(k, k_weight, eps, backend=b)
        return apply_rope(qn, freqs, sequence_dim, backend=b), apply_rope(kn, freqs, sequence_dim, backend=b)

    if isinstance(freqs, list):
        freqs = tuple(freqs)
    return dispatch("qk_norm_rope", composed, b, (q, k, q_weight, k_weight, freqs, eps, sequence_dim), {})


def _resolve_backend(backend):
    from ..backends import get_backend

    return get_backend(backend)  # a name or a Backend (returned as is)


__all__ = [
    "OPS",
    "Kernel",
    "KernelDeclined",
    "active_backend",
    "apply_rope",
    "attention",
    "dispatch_stats",
    "explain",
    "fused_ops",
    "gated_residual",
    "kernels_for",
    "layer_norm_modulate",
    "qk_norm_rope",
    "record_fallback",
    "reference",
    "register_kernel",
    "reset_dispatch_stats",
    "rms_norm",
    "rope_freqs",
    "set_strict",
    "use_backend",
]
