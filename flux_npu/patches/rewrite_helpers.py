"""The run-time helpers a rewritten forward calls (rewrite.py): each takes the fused op where its
inputs allow it and otherwise computes what the original expression computes, counting a
hand-back with the reason (`make_helpers`)."""

from __future__ import annotations

import types

import torch

from .. import ops
from .routes import (
    backend_name,
    calls_plainly,
    handback,
    key_padding_mask,
    note_route,
    rms_module,
    user_attention_backend,
)


def _comfy_cast_op(norm) -> bool:
    """A ComfyUI `operations.LayerNorm` (comfy.ops: disable_weight_init / manual_cast, what every
    ComfyUI Flux block's norms are): a torch LayerNorm subclass whose forward runs the interrupt
    check, then torch's forward or, to cast the weights, `layer_norm` on the weights cast to x's
    dtype. Without affine weights both compute exactly `layer_norm(x, shape, None, None, eps)`."""
    cls = type(norm)
    return callable(getattr(cls, "forward_comfy_cast_weights", None)) and hasattr(cls, "comfy_cast_weights")


def _plain_ln(norm, x) -> bool:
    return (
        (type(norm) is torch.nn.LayerNorm or (isinstance(norm, torch.nn.LayerNorm) and _comfy_cast_op(norm)))
        and calls_plainly(norm)
        and norm.weight is None
        and norm.bias is None
        and tuple(norm.normalized_shape) == (x.shape[-1],)
    )


def _broadcasts_to(t, x) -> bool:
    if not isinstance(t, torch.Tensor) or t.shape[-1] != x.shape[-1] or t.dim() > x.dim():
        return False
    try:
        return torch.broadcast_shapes(t.shape, x.shape) == x.shape
    except RuntimeError:
        return False


def _segments(dims, x, *mods):
    """ComfyUI `modulation_dims` [(start, end, row), ...] as token ranges that tile x's dim 1 exactly,
    in order, each with its modulation row (mods[:, row:row + 1]) present, or None. ComfyUI builds them
    so (reference images at timestep zero: `invert_slices` and `timestep_zero_index`); then
    `apply_mod` equals our op applied per range. Anything else stays with `apply_mod` (uncovered
    tokens keep an unmodulated value there, overlapping ones are modulated twice)."""
    import operator

    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        return None
    try:
        segs = sorted((operator.index(s), operator.index(e), operator.index(r)) for s, e, r in dims)
    except (TypeError, ValueError):
        return None
    at = 0
    for start, end, row in segs:
        if start != at or end <= start or row < 0 or not all(
                isinstance(m, torch.Tensor) and m.dim() == 3 and row < m.shape[1] for m in mods):
            return None
        at = end
    return segs if segs and at == x.shape[1] else None


def make_helpers(backend, where: str, enabled, dispatch=None):
    """The run-time helpers the rewritten function calls; each takes the fused op when it applies
    and computes what the original expression computes (counting a hand-back) when it does not.
    An op the user excluded (patch(exclude=...)) gets the plain original expression."""
    use_ln, use_gated = "layer_norm_modulate" in enabled, "gated_residual" in enabled
    use_rms, use_attn = "rms_norm" in enabled, "attention" in enabled

    def ln_ok(norm, x, shift, scale):
        return (
            isinstance(x, torch.Tensor) and _plain_ln(norm, x) and _broadcasts_to(shift, x)
            and _broadcasts_to(scale, x) and shift.dtype == scale.dtype == x.dtype
        )

    def gated_ok(x, gate, y):
        return (
            isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and isinstance(gate, torch.Tensor)
            and y.shape == x.shape and x.dtype == y.dtype == gate.dtype and _broadcasts_to(gate, x)
        )

    def lnmod(norm, x, shift, scale):
        if use_ln and ln_ok(norm, x, shift, scale):
            return ops.layer_norm_modulate(x, shift, scale, norm.eps, backend=backend)
        if use_ln:
            handback("layer_norm_modulate", backend, f"{where}: not a plain LayerNorm (without hooks or an instance "
                                                     "forward) + same-dtype modulation")
        return (1 + scale) * norm(x) + shift

    def gated(x, gate, y):
        if use_gated and gated_ok(x, gate, y):
            return ops.gated_residual(x, gate, y, backend=backend)
        if use_gated:
            handback("gated_residual", backend, f"{where}: shapes or dtypes of x + gate * y differ")
        return x + gate * y

    def adares(norm, x, gate, y, shift, scale):
        # the fused op where both halves would take theirs (h has x's shape and dtype, so the
        # norm's conditions read on x hold for h); else each half decides on its own
        if use_ln and use_gated and gated_ok(x, gate, y) and ln_ok(norm, x, shift, scale):
            return ops.adaln_residual(x, gate, y, shift, scale, norm.eps, backend=backend)
        h = gated(x, gate, y)
        return h, lnmod(norm, h, shift, scale)

    def rms(norm, x):
        return rms_module(norm, x, backend, where, use_rms)

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                  attention_kwargs=None, *, backend=None, parallel_config=None):
        chosen = user_attention_backend(types.SimpleNamespace(_attention_backend=backend))
        if use_attn and chosen is None and parallel_config is None:
            if dropout_p == 0.0 and not is_causal and not enable_gqa and not attention_kwargs:
                mask = key_padding_mask(attn_mask)
                note_route(f"{where} attention", "ops.attention")
                return ops.attention(query, key, value, mask=mask, scale=scale, layout="BSHD", backend=ops_backend)
            handback("attention", ops_backend, f"{where}: dropout, causal, GQA or attention_kwargs requested")
        note_route(f"{where} attention", f"diffusers dispatch_attention_fn ({backend_name(chosen)})")
        return dispatch(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa, attention_kwargs=attention_kwargs, backend=backend,
                        parallel_config=parallel_config)

    def lnmod_apply_mod(apply_mod, norm, x, shift, scale, dims):
        if dims is None and use_ln and ln_ok(norm, x, shift, scale):
            return ops.layer_norm_modulate(x, shift, scale, norm.eps, backend=backend)
        segs = _segments(dims, x, shift, scale) if dims is not None and use_ln else None
        if segs is not None and all(ln_ok(norm, x[:, s:e], shift[:, r:r + 1], scale[:, r:r + 1]) for s, e, r in segs):
            # LayerNorm is per token: each range normalised and modulated by its row, as apply_mod does
            return torch.cat([ops.layer_norm_modulate(x[:, s:e], shift[:, r:r + 1], scale[:, r:r + 1], norm.eps,
                                                      backend=backend) for s, e, r in segs], dim=1)
        if use_ln:
            handback("layer_norm_modulate", backend, f"{where}: modulation_dims not tiling the tokens in order"
                     if dims is not None else f"{where}: not a plain LayerNorm + same-dtype modulation")
        return apply_mod(norm(x), (1 + scale), shift, dims)

    def gated_apply_mod(apply_mod, x, gate, y, dims, inplace):
        if dims is None and use_gated and gated_ok(x, gate, y):
            return ops.gated_residual(x, gate, y, backend=backend)
        segs = _segments(dims, x, gate) if dims is not None and use_gated else None
        if segs is not None and isinstance(y, torch.Tensor) and y.shape == x.shape and all(
                gated_ok(x[:, s:e], gate[:, r:r + 1], y[:, s:e]) for s, e, r in segs):
            return torch.cat([ops.gated_residual(x[:, s:e], gate[:, r:r + 1], y[:, s:e], backend=backend)
                              for s, e, r in segs], dim=1)
        if use_gated:
            handback("gated_residual", backend, f"{where}: modulation_dims not tiling the tokens in order"
                     if dims is not None else f"{where}: shapes or dtypes of x + gate * y differ")
        if inplace:  # `x += apply_mod(...)` as written: x is changed in place
            x += apply_mod(y, gate, None, dims)
            return x
        return x + apply_mod(y, gate, None, dims)

    ops_backend = backend
    return lnmod, gated, rms, attention, adares, lnmod_apply_mod, gated_apply_mod
