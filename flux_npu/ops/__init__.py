"""The ops' public, dispatching entry points.

Every op validates its arguments once (a clear error naming the problem and the fix), then runs
the active backend's first kernel that accepts the input, else the plain-torch reference
(`flux_npu.ops.reference`), recording why. `backend=` overrides the active backend for one call.
What each op is (validation, plan key, reference, sample inputs, stock code) lives in its file of
the catalogue, `flux_npu/ops/catalogue/<op>.py`; this module is the dispatch they share.
"""

from __future__ import annotations

import torch

from ..backends import Backend
from . import reference, registry
from .catalogue import CATALOGUE
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

# Every public op's own parts (its validation, the input signature its kernels' checks read, its
# reference) are its catalogue record (`catalogue.<op>.INFO`); it hands its arguments to `_call`,
# which does what all share: resolve the backend; while torch.compile traces, validate and walk the
# checks in the trace; otherwise build the signature, look its plan up, and only on a miss validate
# and walk the checks (`_miss`). A signature that cannot be built or hashed (a non-tensor where a
# tensor belongs, an unhashable scalar, an attention float mask) goes the slow way every call,
# which also raises the clear error.

_ATTENTION = CATALOGUE["attention"]
_ROPE_FREQS = CATALOGUE["rope_freqs"]
_APPLY_ROPE = CATALOGUE["apply_rope"]
_RMS_NORM = CATALOGUE["rms_norm"]
_LAYER_NORM_MODULATE = CATALOGUE["layer_norm_modulate"]
_GATED_RESIDUAL = CATALOGUE["gated_residual"]
_QK_NORM_ROPE = CATALOGUE["qk_norm_rope"]
_ADALN_RESIDUAL = CATALOGUE["adaln_residual"]


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


# -- attention ---------------------------------------------------------------------------------


def attention(q, k, v, mask=None, scale: float | None = None, layout: str = "BHSD", *, backend=None):
    """Scaled dot-product attention. q, k, v: (B, H, S, D) (`layout="BSHD"`: (B, S, H, D)).

    mask: None, bool (True = attend) or additive float, broadcastable to (B, H, Sq, Sk).
    scale: defaults to 1/sqrt(D). Output: q's layout and dtype. A query row whose keys are all
    masked out gives zeros (and zero gradients) on every backend."""
    return _call(_ATTENTION, backend, (q, k, v, mask, scale, layout))


# -- RoPE --------------------------------------------------------------------------------------


def rope_freqs(pos, dim: int, theta: float = 10000.0, form: str = "bfl", *, backend=None):
    """RoPE frequencies (see `reference.rope_freqs`), computed in float64 where the backend has
    it and in float32 where it does not (NPU); always returned as float32."""
    return _call(_ROPE_FREQS, backend, (pos, dim, theta, form))


def apply_rope(x, freqs, sequence_dim: int = 2, *, backend=None):
    """Rotate adjacent pairs of x's last dim (see `reference.apply_rope` for both freqs forms)."""
    if freqs.__class__ is list:
        freqs = tuple(freqs)
    return _call(_APPLY_ROPE, backend, (x, freqs, sequence_dim))


# -- norms -------------------------------------------------------------------------------------


def rms_norm(x, weight=None, eps: float = 1e-6, out_dtype: torch.dtype | None = None, *, backend=None):
    """RMSNorm over the last dim, float32 accumulation, output dtype `out_dtype` or x.dtype."""
    return _call(_RMS_NORM, backend, (x, weight, eps, out_dtype))


def layer_norm_modulate(x, shift, scale, eps: float = 1e-6, *, backend=None):
    """AdaLN modulation: (1 + scale) * LayerNorm(x) + shift; shift/scale broadcast against x."""
    return _call(_LAYER_NORM_MODULATE, backend, (x, shift, scale, eps))


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


def qk_norm_rope(q, k, q_weight, k_weight, freqs, eps: float = 1e-6, sequence_dim: int = 2, *, backend=None):
    """RMSNorm(q), RMSNorm(k) (own weights) then RoPE on both: one fused pass where the backend
    has a kernel; on npu its rms_norm and apply_rope kernels composed (a registered kernel too);
    elsewhere the reference."""
    if freqs.__class__ is list:
        freqs = tuple(freqs)
    return _call(_QK_NORM_ROPE, backend, (q, k, q_weight, k_weight, freqs, eps, sequence_dim))


def adaln_residual(x, gate, y, shift, scale, eps: float = 1e-6, *, backend=None):
    """Gated residual then AdaLN of its result, as Flux's double blocks do between attention and
    the feed-forward: returns (h, n) with h = x + gate * y (x's dtype) and
    n = (1 + scale) * LayerNorm(h) + shift. One pass where the backend has a fused kernel (cuda);
    elsewhere its gated_residual and layer_norm_modulate kernels, composed."""
    return _call(_ADALN_RESIDUAL, backend, (x, gate, y, shift, scale, eps))


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
