"""A BFL-layout Flux written for flux-npu's tests.

Same module layout and call shapes as the reference Flux code that x-flux, FluxKits and ComfyUI
derive from (`flux.math.attention/rope/apply_rope`, `flux.modules.layers.RMSNorm/QKNorm/EmbedND`,
names imported by value into the layers module), written independently for these tests.
"""
