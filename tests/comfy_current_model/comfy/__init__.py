"""A test layout shaped like current ComfyUI: our own code, not a copy of theirs.

Checked call by call against ComfyUI master 783545f689a0af730065994b46b382ae24844c99 (2026-08-22;
the newest snapshot reachable, via a fork that mirrors master: comfy/ldm/flux/{math,layers,model}.py,
comfy/ldm/modules/attention.py, comfy/ops.py, comfy/quant_ops.py, comfy/model_management.py,
comfy_extras/nodes_train.py; comfy-kitchen pinned there at 0.2.31, tested here with 0.2.40). What it
has, so what this layout has: norms from `operations` (LayerNorm without affine for AdaLN, RMSNorm
with eps None for the QK norms; their forward runs the interrupt check first), attention on plain
tensors through `optimized_attention` (picked at import from the command line), RoPE through
comfy-kitchen outside training, `apply_mod` with in-place `+=` residuals, the last layer's AdaLN
through `apply_mod` (no comfy-kitchen `adaln` call anywhere in it), FLUX.2's global modulation with
`timestep_zero_index` -> `modulation_dims`, and training only with the trainer's non-reentrant block
checkpointing.

Not verified (no snapshot newer than 2026-08-22 could be fetched): the later forms third-party code
quotes — Flux blocks passing AttentionTensorContainers and `preferred_attention=self.comfy_attention`
(a `ComfyAttention`); in 2026-08 only ComfyUI's MiniMax model uses containers. Simplified here:
weights are initialised by torch (ComfyUI leaves them empty for the checkpoint), no dynamic VRAM /
offload streams in the weight cast, no yak/SiLU MLP variants (FLUX.2's MLPs) and no
`patches_replace` around single blocks, `post_input` patches or ControlNet adds."""
