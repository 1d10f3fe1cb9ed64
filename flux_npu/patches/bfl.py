"""Patches for the reference BFL Flux layout (`flux.math`, `flux.modules.layers`) and the code
derived from it: x-flux and FluxKits (same names), ComfyUI (`comfy.ldm.flux.math` / `.layers`,
whose `attention` takes `mask` and `transformer_options`), kohya sd-scripts (`library.flux_models`,
the whole layout in one module, `attention(..., attn_mask)`), and forks under any name: a module
that *defines* `attention(q, k, v, pe, ...)` and `apply_rope(xq, xk, freqs_cis)` (math), or the
`QKNorm` / `EmbedND` modules (layers), is recognised by structure.

math:   attention(q, k, v, pe, [mask | attn_mask], [transformer_options]) -> ops.apply_rope +
        ops.attention. Masks are served (bool True = attend, or additive float): ComfyUI's with its
        own broadcasting (2-D (L, S), 3-D (B, L, S)), kohya's as SDPA does. Hand-backs to the
        original, each counted by ops.record_fallback with its reason: an
        `optimized_attention_override` in transformer_options (the user's own attention), keyword
        arguments we do not know, positional encodings of another shape.
        rope(pos, dim, theta) -> ops.rope_freqs; apply_rope / apply_rope1 -> ops.apply_rope.
        All are rebound where imported by name (`from flux.math import ...`).
layers: RMSNorm.forward -> ops.rms_norm (output dtype probed from the original once: BFL promotes
        with the scale's dtype, kohya keeps x's); QKNorm.forward -> ops.rms_norm of q and k rounded
        once to v's dtype; EmbedND.forward -> ops.rope_freqs per axis.
blocks: DoubleStreamBlock / SingleStreamBlock / LastLayer forwards (kohya: their `_forward`): the
        inline LayerNorm+modulate expressions (4 per double block, 1 per single block, 1 in the
        last layer) -> ops.layer_norm_modulate and the gated residuals -> ops.gated_residual, by
        rewriting those expressions in the forward's own source (rewrite.py); a forward written
        another way (e.g. ComfyUI's apply_mod helper) is reported as skipped.
"""

from __future__ import annotations

import inspect
import types

import torch

from .. import ops
from .registry import register_patch_set
from .rewrite import build_block_forward
from .routes import handback
from .spec import PatchSet, Spec, signature_drift, suffix_pattern

RMS_EPS = 1e-6  # the BFL RMSNorm's hard-coded epsilon

# transformer_options keys that change how ComfyUI computes attention: with one of these set the
# call goes to the original (ComfyUI's optimized_attention honours them); every other key
# (block_index, sigmas, patches, ...) is metadata the attention itself never reads.
COMFY_ATTENTION_KEYS = ("optimized_attention_override",)


def _pe_fits(pe, q) -> bool:
    """pe is BFL (..., L, D/2, 2, 2) for q (B, H, L, D): what ops.apply_rope takes."""
    return (
        isinstance(pe, torch.Tensor)
        and pe.dim() >= 4
        and tuple(pe.shape[-2:]) == (2, 2)
        and pe.shape[-3] * 2 == q.shape[-1]
        and pe.shape[-4] == q.shape[-2]
    )


def build_attention(original, backend, enabled=None):
    names = list(inspect.signature(original).parameters)[4:]  # after (q, k, v, pe)
    mask_name = next((n for n in names if n in ("mask", "attn_mask")), None)
    comfy_mask = mask_name == "mask"  # ComfyUI's optimized_attention broadcasting (2-D, 3-D = batch)
    known = set(names)

    def attention(q, k, v, pe, *args, **kwargs):
        if len(args) > len(names):
            handback("attention", backend, "BFL attention: more positional arguments than the original takes")
            return original(q, k, v, pe, *args, **kwargs)
        kw = dict(zip(names, args))
        kw.update(kwargs)
        mask = kw.get(mask_name) if mask_name else None
        opts = kw.get("transformer_options")
        why = None
        if set(kw) - known:
            why = f"BFL attention: unknown keyword argument(s) {sorted(set(kw) - known)}"
        elif any(n not in (mask_name, "transformer_options") and kw[n] is not None for n in kw):
            why = "BFL attention: an argument besides the mask and transformer_options is set"
        elif isinstance(opts, dict) and any(opts.get(key) is not None for key in COMFY_ATTENTION_KEYS):
            why = "ComfyUI attention: transformer_options sets optimized_attention_override (the user's attention)"
        elif pe is not None and not _pe_fits(pe, q):
            why = "BFL attention: positional encoding shape is not (..., L, D/2, 2, 2) for q"
        elif mask is not None and not isinstance(mask, torch.Tensor):
            why = "BFL attention: mask is not a tensor"
        if why is not None:
            handback("attention", backend, why)
            return original(q, k, v, pe, *args, **kwargs)
        if mask is not None and comfy_mask:
            if mask.dim() == 2:  # (L, S)
                mask = mask[None, None]
            elif mask.dim() == 3:  # (B, L, S)
                mask = mask[:, None]
        if pe is not None:
            q = ops.apply_rope(q, pe, backend=backend)
            k = ops.apply_rope(k, pe, backend=backend)
        x = ops.attention(q, k, v, mask=mask, backend=backend)
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
        if not (_pe_fits(freqs_cis, xq) and _pe_fits(freqs_cis, xk)):
            handback("apply_rope", backend, "BFL apply_rope: freqs_cis shape does not fit q/k")
            return original(xq, xk, freqs_cis)
        return ops.apply_rope(xq, freqs_cis, backend=backend), ops.apply_rope(xk, freqs_cis, backend=backend)

    apply_rope.__wrapped_original__ = original
    return apply_rope


def build_apply_rope1(original, backend):
    def apply_rope1(x, freqs_cis):
        if not _pe_fits(freqs_cis, x):
            handback("apply_rope", backend, "ComfyUI apply_rope1: freqs_cis shape does not fit x")
            return original(x, freqs_cis)
        return ops.apply_rope(x, freqs_cis, backend=backend)

    apply_rope1.__wrapped_original__ = original
    return apply_rope1


def _rms_keeps_x_dtype(original) -> bool:
    """Whether the original RMSNorm returns x's dtype for a bf16 x and a float32 scale (kohya)
    rather than the promoted dtype (BFL). Probed once on a 1x2 tensor when the patch is built."""
    try:
        out = original(types.SimpleNamespace(scale=torch.ones(2)), torch.ones(1, 2, dtype=torch.bfloat16))
        return out.dtype == torch.bfloat16
    except Exception:
        return False


def build_rms_forward(original, backend):
    keeps_x = _rms_keeps_x_dtype(original)

    def forward(self, x):
        scale = getattr(self, "scale", None)
        if not isinstance(scale, torch.Tensor) or scale.dim() != 1 or scale.shape[0] != x.shape[-1]:
            handback("rms_norm", backend, "BFL RMSNorm: no 1-D `scale` of x's last dim")
            return original(self, x)
        if scale.device != x.device:  # weights streamed in by the original (ComfyUI low-VRAM casting)
            handback("rms_norm", backend, "BFL RMSNorm: scale on another device than x")
            return original(self, x)
        out = x.dtype if keeps_x else torch.promote_types(x.dtype, scale.dtype)
        return ops.rms_norm(x, scale, RMS_EPS, out_dtype=out, backend=backend)

    return forward


def build_qknorm_forward(original, backend):
    def forward(self, q, k, v):
        qs = getattr(getattr(self, "query_norm", None), "scale", None)
        ks = getattr(getattr(self, "key_norm", None), "scale", None)
        if not isinstance(qs, torch.Tensor) or not isinstance(ks, torch.Tensor):
            handback("rms_norm", backend, "BFL QKNorm: query_norm/key_norm without a `scale`")
            return original(self, q, k, v)
        if qs.device != q.device or ks.device != k.device:
            handback("rms_norm", backend, "BFL QKNorm: scales on another device than q/k")
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
            [ops.rope_freqs(ids[..., i], self.axes_dim[i], self.theta, form="bfl", backend=backend)
             for i in range(n_axes)],
            dim=-3,
        )
        return emb.unsqueeze(1)

    return forward


MATH_MODULES = ("flux.math",)
# (class, method, optional): kohya runs the block body in `_forward` (behind checkpointing)
BLOCK_FORWARDS = (("DoubleStreamBlock", "forward", False), ("DoubleStreamBlock", "_forward", True),
                  ("SingleStreamBlock", "forward", False), ("SingleStreamBlock", "_forward", True),
                  ("LastLayer", "forward", False))
LAYER_MODULES = ("flux.modules.layers", "flux.layers")

MATH_SIGNATURES = {"attention": ("q", "k", "v", "pe"), "apply_rope": ("xq", "xk", "freqs_cis"),
                   "rope": ("pos", "dim", "theta")}
LAYER_SIGNATURES = {"QKNorm": ("self", "q", "k", "v"), "EmbedND": ("self", "ids"), "RMSNorm": ("self", "x")}


def _defined_function(module, name, params):
    fn = vars(module).get(name)
    return (
        isinstance(fn, types.FunctionType)
        and fn.__module__ == module.__name__
        and signature_drift(fn, params) is None
    )


def _defined_module_class(module, name, params):
    cls = vars(module).get(name)
    return (
        isinstance(cls, type)
        and cls.__module__ == module.__name__
        and issubclass(cls, torch.nn.Module)
        and signature_drift(cls.__dict__.get("forward"), params) is None
    )


def looks_like_bfl_math(module) -> bool:
    """Defines (not imports) attention(q, k, v, pe, ...) and apply_rope(xq, xk, freqs_cis)."""
    d = vars(module)
    if "attention" not in d or "apply_rope" not in d:
        return False
    return all(_defined_function(module, n, MATH_SIGNATURES[n]) for n in ("attention", "apply_rope"))


def looks_like_bfl_layers(module) -> bool:
    """Defines the nn.Modules QKNorm(q, k, v) and EmbedND(ids)."""
    d = vars(module)
    if "QKNorm" not in d or "EmbedND" not in d:
        return False
    return all(_defined_module_class(module, n, LAYER_SIGNATURES[n]) for n in ("QKNorm", "EmbedND"))


register_patch_set(
    PatchSet(
        target="bfl",
        matches=suffix_pattern(*MATH_MODULES),
        recognise=looks_like_bfl_math,
        describe="*flux.math",
        specs=[
            Spec("attention", build_attention, "RoPE + attention (masks too) -> ops.apply_rope + ops.attention",
                 params=("q", "k", "v", "pe"), rebind=True, ops=("attention",)),
            Spec("rope", build_rope, "RoPE matrices -> ops.rope_freqs (float32 where no float64)",
                 params=("pos", "dim", "theta"), rebind=True, ops=("rope_freqs",)),
            Spec("apply_rope", build_apply_rope, "RoPE application -> ops.apply_rope",
                 params=("xq", "xk", "freqs_cis"), rebind=True, ops=("apply_rope",)),
            Spec("apply_rope1", build_apply_rope1, "RoPE application (one tensor) -> ops.apply_rope",
                 params=("x", "freqs_cis"), rebind=True, ops=("apply_rope",), optional=True),
        ],
    )
)

register_patch_set(
    PatchSet(
        target="bfl",
        matches=suffix_pattern(*LAYER_MODULES),
        recognise=looks_like_bfl_layers,
        describe="*flux.modules.layers",
        specs=[
            Spec("RMSNorm.forward", build_rms_forward, "RMSNorm -> ops.rms_norm", params=("self", "x"),
                 ops=("rms_norm",)),
            Spec("QKNorm.forward", build_qknorm_forward, "QK RMSNorm -> ops.rms_norm (rounded once to v's dtype)",
                 params=("self", "q", "k", "v"), ops=("rms_norm",)),
            Spec("EmbedND.forward", build_embednd_forward, "RoPE frequencies -> ops.rope_freqs", params=("self", "ids"),
                 ops=("rope_freqs",)),
            *[Spec(f"{cls}.{meth}", build_block_forward(f"BFL {cls}"), "AdaLN + gated residuals",
                   ops=("layer_norm_modulate", "gated_residual"), optional=optional)
              for cls, meth, optional in BLOCK_FORWARDS],
        ],
    )
)
