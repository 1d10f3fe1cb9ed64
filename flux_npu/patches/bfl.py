"""Patches for the reference BFL Flux layout (`flux.math`, `flux.modules.layers`) and the code
derived from it: x-flux and FluxKits (same names), ComfyUI (`comfy.ldm.flux.math` / `.layers`,
whose `attention` takes `mask` and `transformer_options`), kohya sd-scripts (`library.flux_models`,
the whole layout in one module, `attention(..., attn_mask)`), and forks under any name: a module
that *defines* `attention(q, k, v, pe, ...)` and `apply_rope(xq, xk, freqs_cis)` (math), or the
`QKNorm` / `EmbedND` modules (layers), is recognised by structure; each of its symbols is then
replaced only if it has BFL's signature and computes what BFL's does on a small float64 probe
(`structural`), else it stays with a skipped row saying why (a causal decoder's attention, a
Gemma-style RMSNorm share the names).

math:   attention(q, k, v, pe, [mask | attn_mask], [transformer_options], [preferred_attention]) ->
        ops.apply_rope + ops.attention. q/k/v may be ComfyUI AttentionTensorContainers (taken, as
        ComfyUI's attention takes them). Masks are served (bool True = attend, or additive float):
        ComfyUI's with its own broadcasting (2-D (L, S), 3-D (B, L, S)), kohya's as SDPA does.
        Hand-backs to the original, each counted by ops.record_fallback with its reason: an
        `optimized_attention_override` in transformer_options, a module `optimized_attention` other
        than ComfyUI's defaults (picked by --use-sage-attention & co.), or a `preferred_attention`
        whose `function` is set (an attention the user or the model chose), keyword arguments we do not
        know, positional encodings of another shape (frequencies for more positions than q or k are
        trimmed to their first L where the module's own RoPE does so: ComfyUI, its KV cache). With
        patch(exclude=["attention"]) RoPE is still served here and the original attention runs with
        pe=None (ComfyUI applies RoPE inside it).
        rope(pos, dim, theta) -> ops.rope_freqs; apply_rope / apply_rope1 -> ops.apply_rope.
        All are rebound where imported by name (`from flux.math import ...`).
layers: RMSNorm.forward -> ops.rms_norm (output dtype probed from the original once: BFL promotes
        with the scale's dtype, kohya keeps x's); QKNorm.forward -> ops.rms_norm of q and k rounded
        once to v's dtype, its norms either BFL RMSNorms (`scale`, eps 1e-6) or, in current ComfyUI
        (where layers.RMSNorm is None), `operations.RMSNorm` modules (`weight`, eps None = torch's
        finfo eps); EmbedND.forward -> ops.rope_freqs per axis. Weights stored in another dtype are
        cast as the replaced code casts them (kohya: scale.float(); ComfyUI comfy_cast_weights: to
        x's dtype) or handed back (a scale BFL uses as stored, weights on another device, ComfyUI
        weight_function patches).
blocks: DoubleStreamBlock / SingleStreamBlock / LastLayer forwards (kohya: their `_forward`): the
        inline LayerNorm+modulate expressions (4 per double block, 1 per single block, 1 in the
        last layer) -> ops.layer_norm_modulate and the gated residuals -> ops.gated_residual, by
        rewriting those expressions in the forward's own source (rewrite.py; ComfyUI's norms are
        `operations.LayerNorm`, fused when without affine), including ComfyUI's
        `apply_mod(self.N(x), (1 + scale), shift, modulation_dims)` / `x + apply_mod(y, gate, None,
        modulation_dims)` form (fused where modulation_dims is None, per range where its ranges tile
        the tokens in order, else handed back, counted).
"""

from __future__ import annotations

from .bfl_layers import build_embednd_forward, build_qknorm_forward, build_rms_forward
from .bfl_math import build_apply_rope, build_apply_rope1, build_attention, build_rope
from .bfl_structural import LAYER_MODULES, MATH_MODULES, looks_like_bfl_layers, looks_like_bfl_math, structural
from .registry import register_patch_set
from .rewrite import build_block_forward
from .spec import PatchSet, Spec, suffix_pattern

# the replacements live in bfl_math.py (flux.math) and bfl_layers.py (flux.modules.layers), the
# recognition of forks and its probes in bfl_structural.py; this module registers the patch sets

# (class, method, optional): kohya runs the block body in `_forward` (behind checkpointing)
BLOCK_FORWARDS = (("DoubleStreamBlock", "forward", False), ("DoubleStreamBlock", "_forward", True),
                  ("SingleStreamBlock", "forward", False), ("SingleStreamBlock", "_forward", True),
                  ("LastLayer", "forward", False))


register_patch_set(
    PatchSet(
        target="bfl",
        matches=suffix_pattern(*MATH_MODULES),
        recognise=looks_like_bfl_math,
        describe="*flux.math",
        specs=[
            Spec("attention", structural(build_attention, "attention"),
                 "RoPE + attention (masks too) -> ops.apply_rope + ops.attention",
                 params=("q", "k", "v", "pe"), rebind=True, ops=("attention", "apply_rope")),
            Spec("rope", structural(build_rope, "rope"),
                 "RoPE matrices -> ops.rope_freqs (float32 where no float64)",
                 params=("pos", "dim", "theta"), rebind=True, ops=("rope_freqs",)),
            Spec("apply_rope", structural(build_apply_rope, "apply_rope"), "RoPE application -> ops.apply_rope",
                 params=("xq", "xk", "freqs_cis"), rebind=True, ops=("apply_rope",)),
            Spec("apply_rope1", structural(build_apply_rope1, "apply_rope1"),
                 "RoPE application (one tensor) -> ops.apply_rope",
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
            Spec("RMSNorm.forward", structural(build_rms_forward, "RMSNorm"), "RMSNorm -> ops.rms_norm",
                 params=("self", "x"), ops=("rms_norm",)),
            Spec("QKNorm.forward", structural(build_qknorm_forward, "QKNorm"),
                 "QK RMSNorm -> ops.rms_norm (rounded once to v's dtype)",
                 params=("self", "q", "k", "v"), ops=("rms_norm",)),
            Spec("EmbedND.forward", structural(build_embednd_forward, "EmbedND"),
                 "RoPE frequencies -> ops.rope_freqs", params=("self", "ids"), ops=("rope_freqs",)),
            *[Spec(f"{cls}.{meth}", build_block_forward(f"BFL {cls}"), "AdaLN + gated residuals",
                   ops=("layer_norm_modulate", "gated_residual"), optional=optional)
              for cls, meth, optional in BLOCK_FORWARDS],
        ],
    )
)
