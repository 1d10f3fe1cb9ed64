"""The op catalogue: public, dispatching entry points.

Every op validates its arguments once (a clear error naming the problem and the fix), then runs
the active backend's first kernel that accepts the input, else the plain-torch reference
(`flux_npu.ops.reference`), recording why. `backend=` overrides the active backend for one call.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Optional

import torch

from ..backends import Backend
from . import reference, registry
from .precision import FLOAT_DTYPES, rope_compute_dtype
from .registry import (
    _PLANS,
    _STRICT,
    OPS,
    Kernel,
    KernelDeclined,
    _is_compiling,
    _plan,
    _strict_error,
    active_backend,
    dispatch,
    dispatch_stats,
    explain,
    fused_ops,
    kernels_for,
    prepare,
    record_fallback,
    register_kernel,
    reset_default_backend,
    reset_dispatch_stats,
    resolve_backend,
    run_plan,
    run_unplanned,
    set_strict,
    traced,
    use_backend,
)

# Every public op states only what is its own (its validation, the input signature its kernels'
# checks read, its reference) in an `_Op`, and hands its arguments to `_call`, which does what all
# share: resolve the backend; while torch.compile traces, validate and walk the checks in the
# trace; otherwise build the signature, look its plan up, and only on a miss validate and walk the
# checks (`_miss`). A signature that cannot be built or hashed (a non-tensor where a tensor
# belongs, an unhashable scalar, an attention float mask) goes the slow way every call, which also
# raises the clear error.


class _Op:
    """One public op's own parts. key(plan_key, *args) -> hashable signature (raises
    AttributeError/TypeError/ValueError when there is none); ref(*args) the reference, or, with
    bound=True, ref(backend, *args) (a reference that depends on the backend)."""

    __slots__ = ("name", "validate", "key", "ref", "bound")

    def __init__(self, name, validate, key, ref, bound=False):
        self.name, self.validate, self.key, self.ref, self.bound = name, validate, key, ref, bound

    def reference(self, b):
        return functools.partial(self.ref, b) if self.bound else self.ref


def _call(op, backend, args):
    b = backend if backend.__class__ is Backend else resolve_backend(backend)
    if _is_compiling():
        op.validate(*args)
        return traced(op.name, b, op.reference(b), args)
    try:
        key = op.key(b.plan_key, *args)
        plan = _PLANS.get(key)
    except (AttributeError, TypeError, ValueError):  # not a signature: validation will say why
        key = plan = None
    if plan is None:  # first call with this signature, or none could be made
        return _miss(op, b, args, key)
    # the planned call: one dict lookup, one increment
    if plan.reason is not None and _STRICT[0]:
        raise _strict_error(plan)
    plan.n += 1
    fn = plan.fn
    if fn is not None:
        return fn(b, *args)
    return op.ref(b, *args) if op.bound else op.ref(*args)


def _miss(op, b, args, key):
    ref = op.reference(b)
    if op.validate(*args) == "empty":
        # zero-size input: every backend returns the empty result the reference computes
        plan = registry.Plan(op.name, b.name, None, "reference", None)
        if key is not None:
            _PLANS[key] = plan
    else:
        plan = _plan(op.name, b, args, key)
    if key is None:
        return run_unplanned(plan, b, ref, args)
    return run_plan(plan, b, ref, args)


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


def _broadcast(a, b):
    """torch.broadcast_shapes for two shapes as plain tuples (None when they do not broadcast)."""
    a, b = tuple(a), tuple(b)
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b):
        if x != y and x != 1 and y != 1:
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


def _t(t):
    return None if t is None else (t.dtype, t.shape, t.device)


# -- attention ---------------------------------------------------------------------------------


def _validate_attention(q, k, v, mask, scale, layout):
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
        raise ValueError(
            f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} disagree on heads or sequence ({layout})"
        )
    if q.shape[h] % k.shape[h]:
        raise ValueError(f"attention: q has {q.shape[h]} heads, not a multiple of k/v's {k.shape[h]} ({layout})")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")
    if mask is not None:
        _tensor("mask", mask)
        target = (q.shape[0], q.shape[h], q.shape[s], k.shape[s])
        if mask.dim() > 4 or _broadcast(mask.shape, target) != target:
            raise ValueError(
                f"attention: mask of shape {tuple(mask.shape)} does not broadcast to (B, H, Sq, Sk) = {target}"
            )
        if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
            raise TypeError(f"attention: mask must be bool (True = attend) or an additive float mask, got {mask.dtype}")
    _same_device("attention", q=q, k=k, v=v, mask=mask)


def _key_attention(pk, q, k, v, mask, scale, layout):
    if mask is not None and mask.dtype is not torch.bool:
        # an additive mask's kernel choice may depend on its values (npu: only 0 / -inf maps
        # exactly onto the fused op's boolean mask), so it is decided per call
        raise TypeError
    # whether a backward will be needed is part of the signature: an inference-only kernel (npu's
    # npu_fused_infer_attention_score) may serve a no-grad call but never one that needs a backward
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return ("attention", pk, q.dtype, q.shape, q.device, k.dtype, k.shape, k.device, v.dtype, v.shape, v.device,
            None if mask is None else (mask.shape, mask.device), scale, layout, grad)


_ATTENTION = _Op("attention", _validate_attention, _key_attention, reference.attention)


def attention(q, k, v, mask=None, scale: Optional[float] = None, layout: str = "BHSD", *, backend=None):
    """Scaled dot-product attention. q, k, v: (B, H, S, D) (`layout="BSHD"`: (B, S, H, D)).

    mask: None, bool (True = attend) or additive float, broadcastable to (B, H, Sq, Sk).
    scale: defaults to 1/sqrt(D). Output: q's layout and dtype. A query row whose keys are all
    masked out gives zeros (and zero gradients) on every backend."""
    return _call(_ATTENTION, backend, (q, k, v, mask, scale, layout))


# -- RoPE --------------------------------------------------------------------------------------


def _validate_rope_freqs(pos, dim, theta, form):
    _tensor("pos", pos)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim <= 0 or dim % 2:
        raise ValueError(f"rope_freqs: dim must be a positive even number, got {dim}")
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not math.isfinite(theta) or theta <= 0:
        raise ValueError(f"rope_freqs: theta must be a finite number > 0 (Flux uses 10000), got {theta!r}")
    if form not in ("bfl", "cos_sin"):
        raise ValueError(f"rope_freqs: form must be 'bfl' or 'cos_sin', got {form!r}")
    if form == "cos_sin" and pos.dim() != 1:
        raise ValueError(f"rope_freqs: form='cos_sin' takes 1-D positions (S,), got shape {tuple(pos.shape)}")


def _ref_rope_freqs(b, pos, dim, theta, form):
    return reference.rope_freqs(pos, dim, theta, form, compute_dtype=rope_compute_dtype(b, pos.device))


_ROPE_FREQS = _Op(
    "rope_freqs", _validate_rope_freqs,
    lambda pk, pos, dim, theta, form: ("rope_freqs", pk, pos.dtype, pos.shape, pos.device, dim, theta, form),
    _ref_rope_freqs, bound=True,
)


def rope_freqs(pos, dim: int, theta: float = 10000.0, form: str = "bfl", *, backend=None):
    """RoPE frequencies (see `reference.rope_freqs`), computed in float64 where the backend has
    it and in float32 where it does not (NPU); always returned as float32."""
    return _call(_ROPE_FREQS, backend, (pos, dim, theta, form))


def _validate_apply_rope(x, freqs, sequence_dim, op="apply_rope"):
    _float(op, "x", x)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"{op}: the last dim of x must be even, got {tuple(x.shape)}")
    if isinstance(freqs, torch.Tensor):
        _float(op, "freqs", freqs)
        if freqs.dim() < 3 or tuple(freqs.shape[-2:]) != (2, 2) or freqs.shape[-3] * 2 != x.shape[-1]:
            raise ValueError(
                f"{op}: BFL freqs must be (..., S, D/2, 2, 2) with D/2 = {x.shape[-1] // 2}, got {tuple(freqs.shape)}"
            )
        lead = tuple(x.shape[:-1])
        if _broadcast(freqs.shape[:-3], lead) != lead:
            raise ValueError(
                f"{op}: freqs {tuple(freqs.shape)} must broadcast to x {tuple(x.shape)} without enlarging it "
                f"(leading dims 1 or equal to x's, e.g. (B or 1, 1, S, D/2, 2, 2) for x (B, H, S, D))"
            )
        _same_device(op, x=x, freqs=freqs)
    elif isinstance(freqs, tuple) and len(freqs) == 2:
        cos, sin = freqs
        _float(op, "cos", cos)
        _float(op, "sin", sin)
        if sequence_dim not in (1, 2) or x.dim() != 4:
            raise ValueError(
                f"{op}: (cos, sin) form needs a 4-D x and sequence_dim 1 or 2, got {x.dim()}-D, {sequence_dim}"
            )
        want = (x.shape[sequence_dim], x.shape[-1])
        if tuple(cos.shape) != want or tuple(sin.shape) != want:
            raise ValueError(f"{op}: cos/sin must be (S, D) = {want}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
        _same_device(op, x=x, cos=cos, sin=sin)
    else:
        raise TypeError(f"{op}: freqs must be a BFL rotation tensor (..., S, D/2, 2, 2) or a (cos, sin) pair")
    if x.numel() == 0:
        return "empty"


def _freqs_key(freqs):
    if freqs.__class__ is tuple:
        c, s = freqs  # ValueError when it is not a pair
        return (c.dtype, c.shape, c.device, s.dtype, s.shape, s.device)
    return (freqs.dtype, freqs.shape, freqs.device)


_APPLY_ROPE = _Op(
    "apply_rope", _validate_apply_rope,
    lambda pk, x, freqs, sd: ("apply_rope", pk, x.dtype, x.shape, x.device, _freqs_key(freqs), sd),
    reference.apply_rope,
)


def apply_rope(x, freqs, sequence_dim: int = 2, *, backend=None):
    """Rotate adjacent pairs of x's last dim (see `reference.apply_rope` for both freqs forms)."""
    if freqs.__class__ is list:
        freqs = tuple(freqs)
    return _call(_APPLY_ROPE, backend, (x, freqs, sequence_dim))


# -- norms -------------------------------------------------------------------------------------


def _validate_rms_norm(x, weight, eps, out_dtype, op="rms_norm", name="weight"):
    _float(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dim, got a 0-D tensor")
    if weight is not None:
        _float(op, name, weight)
        if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(f"{op}: {name} must be ({x.shape[-1]},) for x {tuple(x.shape)}, got {tuple(weight.shape)}")
        _same_device(op, x=x, weight=weight)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a number >= 0, got {eps!r}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be None or a float dtype (float32, bfloat16, float16, float64), "
                        f"got {out_dtype!r}")


_RMS_NORM = _Op(
    "rms_norm", _validate_rms_norm,
    lambda pk, x, w, eps, od: ("rms_norm", pk, x.dtype, x.shape, x.device, _t(w), eps, od),
    reference.rms_norm,
)


def rms_norm(x, weight=None, eps: float = 1e-6, out_dtype: Optional[torch.dtype] = None, *, backend=None):
    """RMSNorm over the last dim, float32 accumulation, output dtype `out_dtype` or x.dtype."""
    return _call(_RMS_NORM, backend, (x, weight, eps, out_dtype))


def _validate_layer_norm_modulate(x, shift, scale, eps, op="layer_norm_modulate"):
    _float(op, "x", x)
    for n, t in (("shift", shift), ("scale", scale)):
        _float(op, n, t)
        if t.dim() < 1 or t.shape[-1] != x.shape[-1]:
            raise ValueError(f"{op}: {n} last dim {tuple(t.shape)[-1:]} != x's {x.shape[-1]}")
        if _broadcast(t.shape, x.shape) != tuple(x.shape):
            raise ValueError(
                f"{op}: {n} of shape {tuple(t.shape)} does not broadcast to x {tuple(x.shape)} "
                f"(pass (B, 1, D) for a (B, S, D) x)"
            )
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a number >= 0, got {eps!r}")
    _same_device(op, x=x, shift=shift, scale=scale)


_LAYER_NORM_MODULATE = _Op(
    "layer_norm_modulate", _validate_layer_norm_modulate,
    lambda pk, x, sh, sc, eps: ("layer_norm_modulate", pk, x.dtype, x.shape, x.device, sh.dtype, sh.shape,
                                sh.device, sc.dtype, sc.shape, sc.device, eps),
    reference.layer_norm_modulate,
)


def layer_norm_modulate(x, shift, scale, eps: float = 1e-6, *, backend=None):
    """AdaLN modulation: (1 + scale) * LayerNorm(x) + shift; shift/scale broadcast against x."""
    return _call(_LAYER_NORM_MODULATE, backend, (x, shift, scale, eps))


def _validate_gated_residual(x, gate, y, op="gated_residual"):
    for n, t in (("x", x), ("gate", gate), ("y", y)):
        _float(op, n, t)
    if y.shape != x.shape:
        raise ValueError(f"{op}: y {tuple(y.shape)} must have x's shape {tuple(x.shape)}")
    if _broadcast(gate.shape, x.shape) != tuple(x.shape):
        raise ValueError(
            f"{op}: gate {tuple(gate.shape)} must broadcast to x {tuple(x.shape)} without enlarging it "
            f"(e.g. (B, 1, D) for a (B, S, D) x)"
        )
    _same_device(op, x=x, gate=gate, y=y)


def _key_gated_residual(pk, x, g, y):
    return ("gated_residual", pk, x.dtype, x.shape, x.device, g.dtype, g.shape, g.device, y.dtype, y.shape, y.device)


_GATED_RESIDUAL = _Op("gated_residual", _validate_gated_residual, _key_gated_residual, reference.gated_residual)


def gated_residual(x, gate, y, *, backend=None):
    """x + gate * y (Flux's gated residual), output dtype = x.dtype."""
    # The one op with its planned kernel call inline: stock is a single ~1.3 us ATen call, and the
    # two frames `_call` adds (its own and the key's, ~0.15 us) took it from 1.25x to 1.32x of stock
    # (docs/PERFORMANCE.md, "Host cost"). Everything but a planned kernel call goes to `_call`.
    b = backend if backend.__class__ is Backend else resolve_backend(backend)
    if not _is_compiling():
        try:
            plan = _PLANS.get(("gated_residual", b.plan_key, x.dtype, x.shape, x.device, gate.dtype, gate.shape,
                               gate.device, y.dtype, y.shape, y.device))
        except AttributeError:  # not tensors: `_call` validates and says why
            plan = None
        if plan is not None and plan.reason is None and plan.fn is not None:
            plan.n += 1
            return plan.fn(b, x, gate, y)
    return _call(_GATED_RESIDUAL, b, (x, gate, y))


def _validate_qk_norm_rope(q, k, q_weight, k_weight, freqs, eps, sequence_dim):
    for n, t in (("q", q), ("k", k)):
        _float("qk_norm_rope", n, t)
    if q.shape != k.shape:
        raise ValueError(f"qk_norm_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must have one shape")
    # the same checks rms_norm and apply_rope make: wrong-shaped weights or freqs must not
    # broadcast into garbage inside a fused kernel
    _validate_rms_norm(q, q_weight, eps, None, "qk_norm_rope", "q_weight")
    _validate_rms_norm(k, k_weight, eps, None, "qk_norm_rope", "k_weight")
    _same_device("qk_norm_rope", q=q, k=k)
    return _validate_apply_rope(q, freqs, sequence_dim, "qk_norm_rope")


def _composed_qk_norm_rope(b, q, k, q_weight, k_weight, freqs, eps, sequence_dim):
    qn = rms_norm(q, q_weight, eps, backend=b)
    kn = rms_norm(k, k_weight, eps, backend=b)
    return apply_rope(qn, freqs, sequence_dim, backend=b), apply_rope(kn, freqs, sequence_dim, backend=b)


_QK_NORM_ROPE = _Op(
    "qk_norm_rope", _validate_qk_norm_rope,
    lambda pk, q, k, qw, kw, freqs, eps, sd: ("qk_norm_rope", pk, q.dtype, q.shape, q.device, k.dtype, k.shape,
                                              k.device, _t(qw), _t(kw), _freqs_key(freqs), eps, sd),
    _composed_qk_norm_rope, bound=True,
)


def qk_norm_rope(q, k, q_weight, k_weight, freqs, eps: float = 1e-6, sequence_dim: int = 2, *, backend=None):
    """RMSNorm(q), RMSNorm(k) (own weights) then RoPE on both: one fused pass where the backend
    has a kernel; elsewhere the backend's own rms_norm and apply_rope kernels, composed."""
    if freqs.__class__ is list:
        freqs = tuple(freqs)
    return _call(_QK_NORM_ROPE, backend, (q, k, q_weight, k_weight, freqs, eps, sequence_dim))


def _validate_adaln_residual(x, gate, y, shift, scale, eps):
    _validate_gated_residual(x, gate, y, "adaln_residual")
    _validate_layer_norm_modulate(x, shift, scale, eps, "adaln_residual")


_ADALN_RESIDUAL = _Op(
    "adaln_residual", _validate_adaln_residual,
    lambda pk, x, g, y, sh, sc, eps: ("adaln_residual", pk, x.dtype, x.shape, x.device, g.dtype, g.shape, g.device,
                                      y.dtype, y.shape, y.device, sh.dtype, sh.shape, sh.device, sc.dtype,
                                      sc.shape, sc.device, eps),
    reference.adaln_residual,
)


def adaln_residual(x, gate, y, shift, scale, eps: float = 1e-6, *, backend=None):
    """Gated residual then AdaLN of its result, as Flux's double blocks do between attention and
    the feed-forward: returns (h, n) with h = x + gate * y (x's dtype) and
    n = (1 + scale) * LayerNorm(h) + shift. One pass where the backend has a fused kernel (cuda);
    elsewhere its gated_residual and layer_norm_modulate kernels, composed."""
    return _call(_ADALN_RESIDUAL, backend, (x, gate, y, shift, scale, eps))


def _resolve_backend(backend):
    return resolve_backend(backend)


__all__ = [
    "OPS",
    "Kernel",
    "adaln_residual",
    "KernelDeclined",
    "active_backend",
    "apply_rope",
    "dispatch",
    "attention",
    "dispatch_stats",
    "explain",
    "fused_ops",
    "gated_residual",
    "kernels_for",
    "layer_norm_modulate",
    "prepare",
    "qk_norm_rope",
    "record_fallback",
    "reference",
    "register_kernel",
    "reset_default_backend",
    "reset_dispatch_stats",
    "rms_norm",
    "rope_freqs",
    "set_strict",
    "use_backend",
]
