# ruff: noqa: B006  (ComfyUI's own `transformer_options={}` defaults, kept as its layout has them)
"""comfy.ldm.flux.model layout (late 2025, layers built from `operations`): Flux.forward_orig
threads `transformer_options` (filled by the sampler, plus block_index / block_type per block) and
`attn_mask` through every block."""

from dataclasses import dataclass

import torch
from torch import nn

import comfy.ops

from .layers import DoubleStreamBlock, EmbedND, LastLayer, MLPEmbedder, SingleStreamBlock, timestep_embedding


@dataclass
class FluxParams:
    in_channels: int = 16
    vec_in_dim: int = 24
    context_in_dim: int = 40
    hidden_size: int = 64
    mlp_ratio: float = 4.0
    num_heads: int = 4
    depth: int = 2
    depth_single_blocks: int = 2
    axes_dim: tuple = (4, 6, 6)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True


class Flux(nn.Module):
    def __init__(self, params: FluxParams, operations=comfy.ops.disable_weight_init):
        super().__init__()
        self.params = params
        h = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=h // params.num_heads, theta=params.theta, axes_dim=list(params.axes_dim))
        self.img_in = operations.Linear(params.in_channels, h)
        self.time_in = MLPEmbedder(256, h, operations)
        self.vector_in = MLPEmbedder(params.vec_in_dim, h, operations)
        self.guidance_in = MLPEmbedder(256, h, operations)
        self.txt_in = operations.Linear(params.context_in_dim, h)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(h, params.num_heads, params.mlp_ratio, params.qkv_bias,
                                                              operations)
                                            for _ in range(params.depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(h, params.num_heads, params.mlp_ratio, operations)
                                            for _ in range(params.depth_single_blocks)])
        self.final_layer = LastLayer(h, 1, params.in_channels, operations)

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                     transformer_options={}, attn_mask=None):
        transformer_options = transformer_options.copy()
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256)) + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        transformer_options["total_blocks"] = len(self.double_blocks)
        transformer_options["block_type"] = "double"
        for i, block in enumerate(self.double_blocks):
            transformer_options["block_index"] = i
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask,
                             transformer_options=transformer_options)
        x = torch.cat((txt, img), 1)
        transformer_options["total_blocks"] = len(self.single_blocks)
        transformer_options["block_type"] = "single"
        for i, block in enumerate(self.single_blocks):
            transformer_options["block_index"] = i
            x = block(x, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)
        return self.final_layer(x[:, txt.shape[1]:, ...], vec)
