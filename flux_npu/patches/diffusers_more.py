"""Patches for the other Flux-family models in diffusers: FLUX.2 (`transformer_flux2`), FLUX.3
(`transformer_flux3`), Chroma (`transformer_chroma`) and the Flux IP-adapter processor
(`transformer_flux`). The position-embedding builder and the set registration are shared with
diffusers_flux.

FLUX.2:  Flux2AttnProcessor / Flux2ParallelSelfAttnProcessor `__call__`: QK RMSNorms ->
         ops.rms_norm and attention -> ops.attention (the user's diffusers attention backend when
         one is chosen); their RoPE goes through the patched `apply_rotary_emb`.
         Flux2TransformerBlock / Flux2SingleTransformerBlock forwards: every LayerNorm+modulate ->
         ops.layer_norm_modulate, gated residuals -> ops.gated_residual. Flux2PosEmbed ->
         ops.rope_freqs (2-D position ids; batched 3-D ids go back to the original). norm_out is
         diffusers' AdaLayerNormContinuous (patched in diffusers_flux).
Chroma:  its attention is FluxAttnProcessor (patched in diffusers_flux; its float mask goes to
         ops.attention as an additive mask, as diffusers' native SDPA treats it); its pruned AdaLN
         norms and its block forwards -> ops.layer_norm_modulate / ops.gated_residual.
FLUX.3:  Flux3AttnProcessor `__call__` (its float32 QK norms -> ops.rms_norm, attention), the
         mode / single block forwards and Flux3AdaLayerNorm (per-token modulation) on our ops;
         RoPE through the patched `apply_rotary_emb`.
IP-adapter: FluxIPAdapterAttnProcessor `__call__`: QK norms and both attention calls (text/image
         and the IP branch) on our ops.
All of these rewrite only the named expressions in the installed source (rewrite.py) and are
skipped with the reason when the source has none of them.
"""

from __future__ import annotations

from .diffusers_flux import FLUX_MODULE, pos_embed_spec, register_diffusers_set
from .rewrite import build_rewrite
from .spec import Spec

FLUX2_MODULE = "diffusers.models.transformers.transformer_flux2"
FLUX3_MODULE = "diffusers.models.transformers.transformer_flux3"
CHROMA_MODULE = "diffusers.models.transformers.transformer_chroma"

ADALN_OPS = ("layer_norm_modulate", "gated_residual")
PROCESSOR_OPS = ("rms_norm", "attention")


# `model` prefixes the class name in rows and errors where the class name alone does not say it
def _processor(cls, model=""):
    return Spec(f"{cls}.__call__", build_rewrite(f"diffusers {model}{cls}", ("processor",)), "QK norms + attention",
                ops=PROCESSOR_OPS, params=("self", "attn", "hidden_states"))


def _block(cls, model=""):
    return Spec(f"{cls}.forward", build_rewrite(f"diffusers {model}{cls}", ("adaln",)), "AdaLN + gated residuals",
                ops=ADALN_OPS)


register_diffusers_set(FLUX2_MODULE, [
    _processor("Flux2AttnProcessor", "FLUX.2 "),
    _processor("Flux2ParallelSelfAttnProcessor", "FLUX.2 "),
    _block("Flux2TransformerBlock", "FLUX.2 "),
    _block("Flux2SingleTransformerBlock", "FLUX.2 "),
    pos_embed_spec("Flux2PosEmbed.forward", "diffusers FLUX.2 Flux2PosEmbed", axes_from_ids=False),
])

register_diffusers_set(FLUX3_MODULE, [
    _processor("Flux3AttnProcessor", "FLUX.3 "),
    *(_block(cls, "FLUX.3 ") for cls in ("Flux3ModeTransformerBlock", "Flux3SingleTransformerBlock",
                                          "Flux3AdaLayerNorm")),
])

register_diffusers_set(CHROMA_MODULE, [
    *(_block(cls) for cls in ("ChromaAdaLayerNormZeroPruned", "ChromaAdaLayerNormZeroSinglePruned",
                              "ChromaTransformerBlock", "ChromaSingleTransformerBlock")),
])

# the FLUX.1 module is imported by diffusers_flux's own set; this one only adds the IP-adapter processor
register_diffusers_set(FLUX_MODULE, [_processor("FluxIPAdapterAttnProcessor")], import_module=False)
