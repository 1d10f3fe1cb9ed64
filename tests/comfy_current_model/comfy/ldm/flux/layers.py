# ruff: noqa: B006  (ComfyUI's own `transformer_options={}` defaults, kept as its layout has them)
"""comfy.ldm.flux.layers layout (ComfyUI 2026-08, our own code in its shapes): every norm comes from
`operations` (`operations.LayerNorm` without affine for AdaLN, `operations.RMSNorm` with eps None =
torch's default for the QK norms; `layers.RMSNorm` is None); blocks call `attention(q, k, v, pe=...,
mask=..., transformer_options=...)` on plain tensors, run `transformer_options["patches"]`'
attn1_patch / attn1_output_patch around it, and write AdaLN and the gated residuals through
`apply_mod(tensor, m_mult, m_add, modulation_dims)`, the residuals as in-place `+=` on the block's
input; the last layer's AdaLN also goes through apply_mod. With `modulation=False` (FLUX.2's global
modulation) a block takes its ModulationOuts from the model as `vec`."""

import math as _math
from dataclasses import dataclass

import torch
from torch import nn

from .math import attention, rope

RMSNorm = None  # kept for custom nodes that import it; norms come from `operations`


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
    def __init__(self, in_dim, hidden_dim, bias=True, operations=None):
        super().__init__()
        self.in_layer, self.silu = operations.Linear(in_dim, hidden_dim, bias=bias), nn.SiLU()
        self.out_layer = operations.Linear(hidden_dim, hidden_dim, bias=bias)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


def build_mlp(hidden_size, mlp_hidden_dim, operations=None):
    return nn.Sequential(operations.Linear(hidden_size, mlp_hidden_dim, bias=True), nn.GELU(approximate="tanh"),
                         operations.Linear(mlp_hidden_dim, hidden_size, bias=True))


class QKNorm(nn.Module):
    def __init__(self, dim, operations=None):
        super().__init__()
        self.query_norm, self.key_norm = operations.RMSNorm(dim), operations.RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, operations=None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = operations.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads, operations=operations)
        self.proj = operations.Linear(dim, dim)


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    def __init__(self, dim, double, bias=True, operations=None):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = operations.Linear(dim, self.multiplier * dim, bias=bias)

    def forward(self, vec):
        if vec.ndim == 2:
            vec = vec[:, None, :]  # (B, 1, D); (B, n, D) rows are indexed by modulation_dims
        out = self.lin(nn.functional.silu(vec)).chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def apply_mod(tensor, m_mult, m_add=None, modulation_dims=None):
    if modulation_dims is None:
        return torch.addcmul(m_add, tensor, m_mult) if m_add is not None else tensor * m_mult
    for start, end, row in modulation_dims:  # token ranges modulated by row `row` (in place)
        tensor[:, start:end] *= m_mult[:, row:row + 1]
        if m_add is not None:
            tensor[:, start:end] += m_add[:, row:row + 1]
    return tensor


def _heads(qkv, heads):
    return qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, qkv_bias=False, modulation=True, operations=None):
        super().__init__()
        mlp = int(hidden_size * mlp_ratio)
        self.num_heads, self.hidden_size = num_heads, hidden_size
        self.modulation = modulation  # False (FLUX.2): the model hands its global modulations in as `vec`
        for side in ("img", "txt"):
            if modulation:
                setattr(self, f"{side}_mod", Modulation(hidden_size, double=True, operations=operations))
            setattr(self, f"{side}_norm1", operations.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_attn", SelfAttention(hidden_size, num_heads, qkv_bias, operations=operations))
            setattr(self, f"{side}_norm2", operations.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_mlp", build_mlp(hidden_size, mlp, operations=operations))

    def forward(self, img, txt, vec, pe, attn_mask=None, modulation_dims_img=None, modulation_dims_txt=None,
                transformer_options={}):
        if self.modulation:
            img_mod1, img_mod2 = self.img_mod(vec)
            txt_mod1, txt_mod2 = self.txt_mod(vec)
        else:
            (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec
        transformer_patches = transformer_options.get("patches", {})
        extra_options = transformer_options.copy()

        img_modulated = self.img_norm1(img)
        img_modulated = apply_mod(img_modulated, (1 + img_mod1.scale), img_mod1.shift, modulation_dims_img)
        img_qkv = self.img_attn.qkv(img_modulated)
        del img_modulated
        img_q, img_k, img_v = _heads(img_qkv, self.num_heads)
        del img_qkv
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)

        txt_modulated = self.txt_norm1(txt)
        txt_modulated = apply_mod(txt_modulated, (1 + txt_mod1.scale), txt_mod1.shift, modulation_dims_txt)
        txt_qkv = self.txt_attn.qkv(txt_modulated)
        del txt_modulated
        txt_q, txt_k, txt_v = _heads(txt_qkv, self.num_heads)
        del txt_qkv
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)

        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        del txt_q, img_q, txt_k, img_k, txt_v, img_v

        extra_options["img_slice"] = [txt.shape[1], q.shape[2]]
        for p in transformer_patches.get("attn1_patch", []):
            out = p(q, k, v, pe=pe, attn_mask=attn_mask, extra_options=extra_options)
            q, k, v = out.get("q", q), out.get("k", k), out.get("v", v)
            pe, attn_mask = out.get("pe", pe), out.get("attn_mask", attn_mask)

        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        del q, k, v
        for p in transformer_patches.get("attn1_output_patch", []):
            attn = p(attn, extra_options)

        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

        img += apply_mod(self.img_attn.proj(img_attn), img_mod1.gate, None, modulation_dims_img)
        del img_attn
        img += apply_mod(self.img_mlp(apply_mod(self.img_norm2(img), (1 + img_mod2.scale), img_mod2.shift,
                                                modulation_dims_img)), img_mod2.gate, None, modulation_dims_img)

        txt += apply_mod(self.txt_attn.proj(txt_attn), txt_mod1.gate, None, modulation_dims_txt)
        del txt_attn
        txt += apply_mod(self.txt_mlp(apply_mod(self.txt_norm2(txt), (1 + txt_mod2.scale), txt_mod2.shift,
                                                modulation_dims_txt)), txt_mod2.gate, None, modulation_dims_txt)

        if txt.dtype == torch.float16:
            txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, modulation=True, operations=None):
        super().__init__()
        self.hidden_dim = self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = self.mlp_hidden_dim_first = int(hidden_size * mlp_ratio)
        self.linear1 = operations.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim_first)
        self.linear2 = operations.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads, operations=operations)
        self.pre_norm = operations.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False, operations=operations) if modulation else None

    def forward(self, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={}):
        if self.modulation:
            mod, _ = self.modulation(vec)
        else:
            mod = vec
        transformer_patches = transformer_options.get("patches", {})
        extra_options = transformer_options.copy()

        qkv, mlp = torch.split(self.linear1(apply_mod(self.pre_norm(x), (1 + mod.scale), mod.shift, modulation_dims)),
                               [3 * self.hidden_size, self.mlp_hidden_dim_first], dim=-1)
        q, k, v = _heads(qkv, self.num_heads)
        del qkv
        q, k = self.norm(q, k, v)

        for p in transformer_patches.get("attn1_patch", []):
            out = p(q, k, v, pe=pe, attn_mask=attn_mask, extra_options=extra_options)
            q, k, v = out.get("q", q), out.get("k", k), out.get("v", v)
            pe, attn_mask = out.get("pe", pe), out.get("attn_mask", attn_mask)

        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        del q, k, v
        for p in transformer_patches.get("attn1_output_patch", []):
            attn = p(attn, extra_options)

        output = self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))
        x += apply_mod(output, mod.gate, None, modulation_dims)
        if x.dtype == torch.float16:
            x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
        return x


class LastLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels, bias=True, operations=None):
        super().__init__()
        self.norm_final = operations.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = operations.Linear(hidden_size, patch_size * patch_size * out_channels, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), operations.Linear(hidden_size, 2 * hidden_size, bias=bias))

    def forward(self, x, vec, modulation_dims=None):
        if vec.ndim == 2:
            vec = vec[:, None, :]
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        x = apply_mod(self.norm_final(x), (1 + scale), shift, modulation_dims)
        return self.linear(x)
