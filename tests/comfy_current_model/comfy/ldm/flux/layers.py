# ruff: noqa: B006  (ComfyUI's own `transformer_options={}` defaults, kept as its layout has them)
"""comfy.ldm.flux.layers layout (late 2025): QKNorm holds `operations.RMSNorm` modules (`weight`,
eps None = torch's default) and `layers.RMSNorm` is None; blocks wrap q/k/v in
AttentionTensorContainer and pass their ComfyAttention as `preferred_attention`; the AdaLN
modulation and gated residuals go through `apply_mod(tensor, m_mult, m_add, modulation_dims)`; the
last layer's AdaLN goes through comfy-kitchen outside training."""

import math as _math
from dataclasses import dataclass

import torch
from torch import nn

import comfy.model_management
import comfy.quant_ops
from comfy.ldm.modules.attention import AttentionTensorContainer, ComfyAttention

from .math import attention, rope

RMSNorm = None  # gone: norms come from `operations`


def apply_mod(tensor, m_mult, m_add=None, modulation_dims=None):
    if modulation_dims is None:
        if m_add is not None:
            return torch.addcmul(m_add, tensor, m_mult)
        return tensor * m_mult
    for start, end, idx in modulation_dims:  # per-segment modulation rows (Kontext / Chroma style)
        tensor[:, start:end] *= m_mult[:, idx:idx + 1]
        if m_add is not None:
            tensor[:, start:end] += m_add[:, idx:idx + 1]
    return tensor


class EmbedND(nn.Module):
    def __init__(self, dim, theta, axes_dim):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids):
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)


def timestep_embedding(t, dim, max_period=10000, time_factor=1000.0):
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-_math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t) if torch.is_floating_point(t) else emb


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden_dim, operations):
        super().__init__()
        self.in_layer, self.silu = operations.Linear(in_dim, hidden_dim), nn.SiLU()
        self.out_layer = operations.Linear(hidden_dim, hidden_dim)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class QKNorm(nn.Module):
    def __init__(self, dim, operations):
        super().__init__()
        self.query_norm, self.key_norm = operations.RMSNorm(dim), operations.RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias, operations):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = operations.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads, operations)
        self.proj = operations.Linear(dim, dim)


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    def __init__(self, dim, double, operations):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = operations.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec):
        out = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def _split_qkv(qkv, heads):
    return qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, qkv_bias, operations):
        super().__init__()
        mlp = int(hidden_size * mlp_ratio)
        self.num_heads, self.hidden_size = num_heads, hidden_size
        self.comfy_attention = ComfyAttention()
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(hidden_size, True, operations))
            setattr(self, f"{side}_norm1", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_attn", SelfAttention(hidden_size, num_heads, qkv_bias, operations))
            setattr(self, f"{side}_norm2", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_mlp", nn.Sequential(operations.Linear(hidden_size, mlp), nn.GELU(approximate="tanh"),
                                                       operations.Linear(mlp, hidden_size)))

    def forward(self, img, txt, vec, pe, attn_mask=None, modulation_dims_img=None, modulation_dims_txt=None,
                transformer_options={}):
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_modulated = self.img_norm1(img)
        img_modulated = apply_mod(img_modulated, (1 + img_mod1.scale), img_mod1.shift, modulation_dims_img)
        img_q, img_k, img_v = _split_qkv(self.img_attn.qkv(img_modulated), self.num_heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
        txt_modulated = self.txt_norm1(txt)
        txt_modulated = apply_mod(txt_modulated, (1 + txt_mod1.scale), txt_mod1.shift, modulation_dims_txt)
        txt_q, txt_k, txt_v = _split_qkv(self.txt_attn.qkv(txt_modulated), self.num_heads)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)
        q = AttentionTensorContainer(torch.cat((txt_q, img_q), dim=2))
        k = AttentionTensorContainer(torch.cat((txt_k, img_k), dim=2))
        v = AttentionTensorContainer(torch.cat((txt_v, img_v), dim=2))
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options,
                         preferred_attention=self.comfy_attention)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + apply_mod(self.img_attn.proj(img_attn), img_mod1.gate, None, modulation_dims_img)
        img = img + apply_mod(self.img_mlp(apply_mod(self.img_norm2(img), (1 + img_mod2.scale), img_mod2.shift,
                                                      modulation_dims_img)), img_mod2.gate, None, modulation_dims_img)
        txt = txt + apply_mod(self.txt_attn.proj(txt_attn), txt_mod1.gate, None, modulation_dims_txt)
        txt = txt + apply_mod(self.txt_mlp(apply_mod(self.txt_norm2(txt), (1 + txt_mod2.scale), txt_mod2.shift,
                                                      modulation_dims_txt)), txt_mod2.gate, None, modulation_dims_txt)
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, operations):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = operations.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = operations.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads, operations)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, False, operations)
        self.comfy_attention = ComfyAttention()

    def forward(self, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={}):
        mod, _ = self.modulation(vec)
        x_mod = apply_mod(self.pre_norm(x), (1 + mod.scale), mod.shift, modulation_dims)
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = _split_qkv(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(AttentionTensorContainer(q), AttentionTensorContainer(k), AttentionTensorContainer(v),
                         pe=pe, mask=attn_mask, transformer_options=transformer_options,
                         preferred_attention=self.comfy_attention)
        output = self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))
        return x + apply_mod(output, mod.gate, None, modulation_dims)


class LastLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels, operations):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = operations.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), operations.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, vec, modulation_dims=None):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        if comfy.model_management.in_training or modulation_dims is not None:
            return self.linear(apply_mod(self.norm_final(x), (1 + scale), shift, modulation_dims))
        return self.linear(comfy.quant_ops.ck.adaln(x, scale, shift, self.norm_final.eps))
