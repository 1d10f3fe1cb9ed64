"""Patches for the other Flux-family models in diffusers: FLUX.2 (`transformer_flux2`), Chroma
(`transformer_chroma`) and the Flux IP-adapter processor (`transformer_flux`).

FLUX.2:  Flux2AttnProcessor / Flux2ParallelSelfAttnProcessor `__call__`: QK RMSNorms ->
         ops.rms_norm and attention -> ops.attention (the user's diffusers attention backend when
         one is chosen); their RoPE goes through the patched `apply_rotary_emb`.
         Flux2TransformerBlock / Flux2SingleTransformerBlock forwards: every LayerNorm+modulate ->
         ops.layer_norm_modulate, gated residuals -> ops.gated_residual. Flux2PosEmbed ->
         ops.rope_freqs (1-D or 2-D position ids). norm_out is diffusers' AdaLayerNormContinuous
         (patched in diffusers_flux).
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

import torch

from .. import ops
from .engine import PatchSet, Spec, exact, handback, register_patch_set
from .rewrite import build_rewrite

FLUX2_MODULE = "diffusers.models.transformers.transformer_flux2"
FLUX3_MODULE = "diffusers.models.transformers.transformer_flux3"
CHROMA_MODULE = "diffusers.models.transformers.transformer_chroma"
FLUX_MODULE = "diffusers.models.transformers.transformer_flux"

ADALN_OPS = ("layer_norm_modulate", "gated_residual")
PROCESSOR_OPS = ("rms_norm", "attention")


def build_flux2_pos_embed_forward(original, backend):
    def forward(self, ids):
        if ids.dim() != 2:  # batched ids: ops.rope_freqs takes 1-D positions per axis
            handback("rope_freqs", backend, "FLUX.2 Flux2PosEmbed: batched (3-D) position ids")
            return original(self, ids)
        pos = ids.float()
        cos_out, sin_out = [], []
        for i in range(len(self.axes_dim)):
            cos, sin = ops.rope_freqs(pos[:, i], self.axes_dim[i], self.theta, form="cos_sin", backend=backend)
            cos_out.append(cos)
            sin_out.append(sin)
        return torch.cat(cos_out, dim=-1).to(ids.device), torch.cat(sin_out, dim=-1).to(ids.device)

    return forward


def _processor(symbol, where):
    return Spec(symbol, build_rewrite(where, ("processor",)), "QK norms + attention", ops=PROCESSOR_OPS,
                params=("self", "attn", "hidden_states"))


def _block(symbol, where):
    return Spec(symbol, build_rewrite(where, ("adaln",)), "AdaLN + gated residuals", ops=ADALN_OPS)


register_patch_set(
    PatchSet(
        target="diffusers",
        matches=exact(FLUX2_MODULE),
        import_names=(FLUX2_MODULE,),
        specs=[
            _processor("Flux2AttnProcessor.__call__", "diffusers FLUX.2 Flux2AttnProcessor"),
            _processor("Flux2ParallelSelfAttnProcessor.__call__", "diffusers FLUX.2 Flux2ParallelSelfAttnProcessor"),
            _block("Flux2TransformerBlock.forward", "diffusers FLUX.2 Flux2TransformerBlock"),
            _block("Flux2SingleTransformerBlock.forward", "diffusers FLUX.2 Flux2SingleTransformerBlock"),
            Spec("Flux2PosEmbed.forward", build_flux2_pos_embed_forward, "RoPE frequencies -> ops.rope_freqs",
                 params=("self", "ids"), ops=("rope_freqs",)),
        ],
    )
)

register_patch_set(
    PatchSet(
        target="diffusers",
        matches=exact(FLUX3_MODULE),
        import_names=(FLUX3_MODULE,),
        specs=[
            _processor("Flux3AttnProcessor.__call__", "diffusers FLUX.3 Flux3AttnProcessor"),
            _block("Flux3ModeTransformerBlock.forward", "diffusers FLUX.3 Flux3ModeTransformerBlock"),
            _block("Flux3SingleTransformerBlock.forward", "diffusers FLUX.3 Flux3SingleTransformerBlock"),
            _block("Flux3AdaLayerNorm.forward", "diffusers FLUX.3 Flux3AdaLayerNorm"),
        ],
    )
)

register_patch_set(
    PatchSet(
        target="diffusers",
        matches=exact(CHROMA_MODULE),
        import_names=(CHROMA_MODULE,),
        specs=[
            _block("ChromaAdaLayerNormZeroPruned.forward", "diffusers Chroma AdaLayerNormZeroPruned"),
            _block("ChromaAdaLayerNormZeroSinglePruned.forward", "diffusers Chroma AdaLayerNormZeroSinglePruned"),
            _block("ChromaTransformerBlock.forward", "diffusers ChromaTransformerBlock"),
            _block("ChromaSingleTransformerBlock.forward", "diffusers ChromaSingleTransformerBlock"),
        ],
    )
)

register_patch_set(
    PatchSet(
        target="diffusers",
        matches=exact(FLUX_MODULE),
        specs=[_processor("FluxIPAdapterAttnProcessor.__call__", "diffusers FluxIPAdapterAttnProcessor")],
    )
)
