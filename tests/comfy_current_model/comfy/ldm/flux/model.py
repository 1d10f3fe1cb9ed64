# ruff: noqa: B006  (ComfyUI's own `transformer_options={}` defaults, kept as its layout has them)
"""comfy.ldm.flux.model layout (ComfyUI 2026-08, layers built from `operations`): Flux.forward_orig
threads `transformer_options` (filled by the sampler, plus block_index / block_type per block) and
`attn_mask` through every block, lets `patches_replace["dit"]` wrap a block, and with
`timestep_zero_index` (reference images at timestep zero; with FLUX.2's `global_modulation`) modulates
token ranges of the image with a second modulation row (`modulation_dims`) instead of one row for
all tokens."""

from dataclasses import dataclass

import torch
from torch import nn

import comfy.ops

from .layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    Modulation,
    SingleStreamBlock,
    timestep_embedding,
)


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
    global_modulation: bool = False  # FLUX.2: one modulation per stream for all blocks, no bias


def invert_slices(slices, length):
    """The token ranges of [0, length) that none of `slices` covers."""
    out, at = [], 0
    for start, end in sorted(slices):
        if at < start:
            out.append((at, start))
        at = max(at, end)
    return out + [(at, length)] if at < length else out


class Flux(nn.Module):
    def __init__(self, params: FluxParams, operations=comfy.ops.disable_weight_init):
        super().__init__()
        self.params = params
        h = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=h // params.num_heads, theta=params.theta, axes_dim=list(params.axes_dim))
        self.img_in = operations.Linear(params.in_channels, h)
        self.time_in = MLPEmbedder(256, h, operations=operations)
        self.vector_in = MLPEmbedder(params.vec_in_dim, h, operations=operations)
        self.guidance_in = MLPEmbedder(256, h, operations=operations)
        self.txt_in = operations.Linear(params.context_in_dim, h)
        per_block = not params.global_modulation
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(h, params.num_heads, params.mlp_ratio, params.qkv_bias,
                                                              modulation=per_block, operations=operations)
                                            for _ in range(params.depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(h, params.num_heads, params.mlp_ratio,
                                                              modulation=per_block, operations=operations)
                                            for _ in range(params.depth_single_blocks)])
        self.final_layer = LastLayer(h, 1, params.in_channels, operations=operations)
        if params.global_modulation:
            self.double_stream_modulation_img = Modulation(h, double=True, bias=False, operations=operations)
            self.double_stream_modulation_txt = Modulation(h, double=True, bias=False, operations=operations)
            self.single_stream_modulation = Modulation(h, double=False, bias=False, operations=operations)

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                     timestep_zero_index=None, transformer_options={}, attn_mask=None):
        transformer_options = transformer_options.copy()
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        vec_orig = txt_vec = vec
        extra = {}
        if timestep_zero_index is not None:  # vec holds (normal, zero-timestep) halves of the batch
            batch = vec.shape[0] // 2
            vec_orig = vec.reshape(2, batch, vec.shape[1]).movedim(0, 1)  # (B, 2, D): modulation rows 0 / 1
            dims = [(s, e, 0) for s, e in invert_slices(timestep_zero_index, img.shape[1])]
            dims += [(s, e, 1) for s, e in timestep_zero_index]
            extra["modulation_dims_img"] = dims
            txt_vec = vec[:batch]
        if self.params.global_modulation:
            vec = (self.double_stream_modulation_img(vec_orig), self.double_stream_modulation_txt(txt_vec))

        transformer_options["total_blocks"] = len(self.double_blocks)
        transformer_options["block_type"] = "double"
        for i, block in enumerate(self.double_blocks):
            transformer_options["block_index"] = i
            if ("double_block", i) in blocks_replace:
                def wrap(args, block=block):
                    out = {}
                    out["img"], out["txt"] = block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                                                   attn_mask=args.get("attn_mask"),
                                                   transformer_options=args.get("transformer_options"), **extra)
                    return out

                out = blocks_replace[("double_block", i)]({"img": img, "txt": txt, "vec": vec, "pe": pe,
                                                           "attn_mask": attn_mask,
                                                           "transformer_options": transformer_options},
                                                          {"original_block": wrap})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask,
                                 transformer_options=transformer_options, **extra)

        img = torch.cat((txt, img), 1)
        if self.params.global_modulation:
            vec, _ = self.single_stream_modulation(vec_orig)
        single = {}
        if timestep_zero_index is not None:  # the img ranges shifted past txt; the first one takes txt in too
            n = txt.shape[1]
            single["modulation_dims"] = [(0 if s == 0 else s + n, e + n, r) for s, e, r in extra["modulation_dims_img"]]
        transformer_options["total_blocks"] = len(self.single_blocks)
        transformer_options["block_type"] = "single"
        for i, block in enumerate(self.single_blocks):
            transformer_options["block_index"] = i
            img = block(img, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options, **single)

        img = img[:, txt.shape[1]:, ...]
        last = {"modulation_dims": extra["modulation_dims_img"]} if timestep_zero_index is not None else {}
        return self.final_layer(img, vec_orig, **last)
