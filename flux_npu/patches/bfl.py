"""Patches for the reference BFL Flux layout (`flux.math`, `flux.modules.layers`), the layout that
x-flux, FluxKits and ComfyUI (`comfy.ldm.flux.math`, `comfy.ldm.flux.layers`) derive from.

math:   attention(q, k, v, pe) -> ops.apply_rope + ops.attention; rope(pos, dim, theta) ->
        ops.rope_freqs (no float64 on devices that lack it); apply_rope(xq, xk, freqs_cis) ->
        ops.apply_rope. All three are rebound where imported by name (`from flux.math import ...`).
layers: RMSNorm.forward -> ops.rms_norm (output dtype as the original: promote(x, scale));
        QKNorm.forward -> ops.rms_norm of q and k rounded once to v's dtype (the original's final
        `.to(v)`); EmbedND.forward -> ops.rope_freqs per axis.
"""

from __future__ import annotations

import torch

from .. import ops
from .engine import PatchSet, Spec, register_patch_set, suffix_pattern

RMS_EPS = 1e-6  # the BFL RMSNorm's hard-coded epsilon


def build_attention(original, backend):
    def attention(q, k, v, pe, *args, **kwargs):
        if args or any(val is not None and val != {} for val in kwargs.values()):
            return original(q, k, v, pe, *args, **kwargs)  # masks / options we do not model
        q = ops.apply_rope(q, pe, backend=backend)
        k = ops.apply_rope(k, pe, backend=backend)
        x = ops.attention(q, k, v, backend=backend)
        return x.transpose(1, 2).flatten(2)  # "B H L D -> B L (H D)"

    attention.__wrapped_original__ = original
    return attention


def build_rope(original, backend):
    def rope(pos, dim, theta):
        return ops.rope_freqs(pos, dim, theta, form="bfl", backend=backend)

    rope.__wrapped_original__ = original
    return rope


def build_apply_rope(original, backend):
    def apply_rope(xq, xk, freqs_cis):
        return ops.apply_rope(xq, freqs_cis, backend=backend), ops.apply_rope(xk, freqs_cis, backend=backend)

    apply_rope.__wrapped_original__ = original
    return apply_rope


def build_rms_forward(original, backend):
    def forward(self, x):
        scale = getattr(self, "scale", None)
        if not isinstance(scale, torch.Tensor) or scale.dim() != 1 or scale.shape[0] != x.shape[-1]:
            return original(self, x)
        return ops.rms_norm(x, scale, RMS_EPS, out_dtype=torch.promote_types(x.dtype, scale.dtype), backend=backend)

    return forward


def build_qknorm_forward(original, backend):
    def forward(self, q, k, v):
        qs = getattr(getattr(self, "query_norm", None), "scale", None)
        ks = getattr(getattr(self, "key_norm", None), "scale", None)
        if not isinstance(qs, torch.Tensor) or not isinstance(ks, torch.Tensor):
            return original(self, q, k, v)
        return (
            ops.rms_norm(q, qs, RMS_EPS, out_dtype=v.dtype, backend=backend),
            ops.rms_norm(k, ks, RMS_EPS, out_dtype=v.dtype, backend=backend),
        )

    return forward


def build_embednd_forward(original, backend):
    def forward(self, ids):
        n_axes = ids.shape[-1]
        emb = torch.cat(
            [ops.rope_freqs(ids[..., i], self.axes_dim[i], self.theta, form="bfl", backend=backend) for i in range(n_axes)],
            dim=-3,
        )
        return emb.unsqueeze(1)

    return forward


MATH_MODULES = ("flux.math",)
LAYER_MODULES = ("flux.modules.layers", "flux.layers")

register_patch_set(
    PatchSet(
        target="bfl",
        matches=suffix_pattern(*MATH_MODULES),
        describe="*flux.math",
        specs=[
            Spec("attention", build_attention, "RoPE + attention -> ops.apply_rope + ops.attention",
                 params=("q", "k", "v", "pe"), rebind=True),
            Spec("rope", build_rope, "RoPE matrices -> ops.rope_freqs (float32 where no float64)",
                 params=("pos", "dim", "theta"), rebind=True),
            Spec("apply_rope", build_apply_rope, "RoPE application -> ops.apply_rope",
                 params=("xq", "xk", "freqs_cis"), rebind=True),
        ],
    )
)

register_patch_set(
    PatchSet(
        target="bfl",
        matches=suffix_pattern(*LAYER_MODULES),
        describe="*flux.modules.layers",
        specs=[
            Spec("RMSNorm.forward", build_rms_forward, "RMSNorm -> ops.rms_norm", params=("self", "x")),
            Spec("QKNorm.forward", build_qknorm_forward, "QK RMSNorm -> ops.rms_norm (rounded once to v's dtype)",
                 params=("self", "q", "k", "v")),
            Spec("EmbedND.forward", build_embednd_forward, "RoPE frequencies -> ops.rope_freqs", params=("self", "ids")),
        ],
    )
)
