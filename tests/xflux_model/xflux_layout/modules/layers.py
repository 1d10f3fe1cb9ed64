"""x-flux's layers in miniature: the double block delegates its body to a processor, and the
IP-adapter processor adds an image-prompt attention (inline scaled_dot_product_attention) of the
block's normalised image queries over projected image-prompt tokens."""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..math import attention, rope


def heads(t, n_heads, parts):
    """(B, L, parts*H*D) -> parts x (B, H, L, D) (a tuple when parts > 1)."""
    b, n, _ = t.shape
    out = t.reshape(b, n, parts, n_heads, -1).permute(2, 0, 3, 1, 4)
    return tuple(out) if parts > 1 else out[0]


class EmbedND(nn.Module):
    def __init__(self, dim, theta, axes_dim):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids):
        parts = [rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])]
        return torch.cat(parts, dim=-3).unsqueeze(1)


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return normed.to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    def __init__(self, dim, double=True):
        super().__init__()
        self.n = 6 if double else 3
        self.lin = nn.Linear(dim, self.n * dim)

    def forward(self, vec):
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1)
        return ModulationOut(*chunks[:3]), ModulationOut(*chunks[3:]) if self.n == 6 else None


def _block_body(attn, img, txt, vec, pe):
    """The double block written once, for the fork in ip_normed.py (whose AdaLN thus stays in a helper
    function no processor rewrite reaches); returns (img, txt, normalised img_q)."""
    img_mod1, img_mod2 = attn.img_mod(vec)
    txt_mod1, txt_mod2 = attn.txt_mod(vec)
    img_q, img_k, img_v = heads(attn.img_attn.qkv((1 + img_mod1.scale) * attn.img_norm1(img) + img_mod1.shift),
                                attn.num_heads, 3)
    img_q, img_k = attn.img_attn.norm(img_q, img_k, img_v)
    txt_q, txt_k, txt_v = heads(attn.txt_attn.qkv((1 + txt_mod1.scale) * attn.txt_norm1(txt) + txt_mod1.shift),
                                attn.num_heads, 3)
    txt_q, txt_k = attn.txt_attn.norm(txt_q, txt_k, txt_v)
    joint = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2), pe=pe)
    txt_out, img_out = joint[:, : txt.shape[1]], joint[:, txt.shape[1]:]
    img = img + img_mod1.gate * attn.img_attn.proj(img_out)
    img = img + img_mod2.gate * attn.img_mlp((1 + img_mod2.scale) * attn.img_norm2(img) + img_mod2.shift)
    txt = txt + txt_mod1.gate * attn.txt_attn.proj(txt_out)
    txt = txt + txt_mod2.gate * attn.txt_mlp((1 + txt_mod2.scale) * attn.txt_norm2(txt) + txt_mod2.shift)
    return img, txt, img_q


class DoubleStreamBlockProcessor:
    def __call__(self, attn, img, txt, vec, pe, **attention_kwargs):
        img_mod1, img_mod2 = attn.img_mod(vec)
        txt_mod1, txt_mod2 = attn.txt_mod(vec)
        img_modulated = attn.img_norm1(img)
        img_modulated = (1 + img_mod1.scale) * img_modulated + img_mod1.shift
        img_q, img_k, img_v = heads(attn.img_attn.qkv(img_modulated), attn.num_heads, 3)
        img_q, img_k = attn.img_attn.norm(img_q, img_k, img_v)
        txt_modulated = attn.txt_norm1(txt)
        txt_modulated = (1 + txt_mod1.scale) * txt_modulated + txt_mod1.shift
        txt_q, txt_k, txt_v = heads(attn.txt_attn.qkv(txt_modulated), attn.num_heads, 3)
        txt_q, txt_k = attn.txt_attn.norm(txt_q, txt_k, txt_v)
        joint = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2),
                          pe=pe)
        txt_out, img_out = joint[:, : txt.shape[1]], joint[:, txt.shape[1]:]
        img = img + img_mod1.gate * attn.img_attn.proj(img_out)
        img = img + img_mod2.gate * attn.img_mlp((1 + img_mod2.scale) * attn.img_norm2(img) + img_mod2.shift)
        txt = txt + txt_mod1.gate * attn.txt_attn.proj(txt_out)
        txt = txt + txt_mod2.gate * attn.txt_mlp((1 + txt_mod2.scale) * attn.txt_norm2(txt) + txt_mod2.shift)
        return img, txt


class IPDoubleStreamBlockProcessor(nn.Module):
    """The block, then `ip_scale` times the attention of its image queries over image-prompt tokens."""

    def __init__(self, context_dim, hidden_dim):
        super().__init__()
        self.context_dim, self.hidden_dim = context_dim, hidden_dim
        self.ip_adapter_double_stream_k_proj = nn.Linear(context_dim, hidden_dim, bias=True)
        self.ip_adapter_double_stream_v_proj = nn.Linear(context_dim, hidden_dim, bias=True)

    def __call__(self, attn, img, txt, vec, pe, image_proj, ip_scale=1.0, **attention_kwargs):
        img_mod1, img_mod2 = attn.img_mod(vec)
        txt_mod1, txt_mod2 = attn.txt_mod(vec)
        img_modulated = attn.img_norm1(img)
        img_modulated = (1 + img_mod1.scale) * img_modulated + img_mod1.shift
        img_q, img_k, img_v = heads(attn.img_attn.qkv(img_modulated), attn.num_heads, 3)
        img_q, img_k = attn.img_attn.norm(img_q, img_k, img_v)
        txt_modulated = attn.txt_norm1(txt)
        txt_modulated = (1 + txt_mod1.scale) * txt_modulated + txt_mod1.shift
        txt_q, txt_k, txt_v = heads(attn.txt_attn.qkv(txt_modulated), attn.num_heads, 3)
        txt_q, txt_k = attn.txt_attn.norm(txt_q, txt_k, txt_v)
        joint = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2),
                          pe=pe)
        txt_out, img_out = joint[:, : txt.shape[1]], joint[:, txt.shape[1]:]
        img = img + img_mod1.gate * attn.img_attn.proj(img_out)
        img = img + img_mod2.gate * attn.img_mlp((1 + img_mod2.scale) * attn.img_norm2(img) + img_mod2.shift)
        txt = txt + txt_mod1.gate * attn.txt_attn.proj(txt_out)
        txt = txt + txt_mod2.gate * attn.txt_mlp((1 + txt_mod2.scale) * attn.txt_norm2(txt) + txt_mod2.shift)

        # the image-prompt branch: the normalised image queries (before RoPE) over the prompt tokens
        ip_key = heads(self.ip_adapter_double_stream_k_proj(image_proj), attn.num_heads, 1)
        ip_value = heads(self.ip_adapter_double_stream_v_proj(image_proj), attn.num_heads, 1)
        ip_out = F.scaled_dot_product_attention(img_q, ip_key, ip_value, dropout_p=0.0, is_causal=False)
        img = img + ip_scale * ip_out.transpose(1, 2).flatten(2)
        return img, txt


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=2.0):
        super().__init__()
        mlp = int(hidden_size * mlp_ratio)
        self.num_heads, self.hidden_size = num_heads, hidden_size
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(hidden_size))
            setattr(self, f"{side}_norm1", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_attn", SelfAttention(hidden_size, num_heads))
            setattr(self, f"{side}_norm2", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_mlp", nn.Sequential(nn.Linear(hidden_size, mlp), nn.GELU(approximate="tanh"),
                                                        nn.Linear(mlp, hidden_size)))
        self.set_processor(DoubleStreamBlockProcessor())

    def set_processor(self, processor):
        self.processor = processor

    def forward(self, img, txt, vec, pe, image_proj=None, ip_scale=1.0):
        if image_proj is None:
            return self.processor(self, img, txt, vec, pe)
        return self.processor(self, img, txt, vec, pe, image_proj, ip_scale)


class SingleStreamBlockProcessor:
    def __call__(self, attn, x, vec, pe):
        mod, _ = attn.modulation(vec)
        x_mod = (1 + mod.scale) * attn.pre_norm(x) + mod.shift
        qkv, mlp = torch.split(attn.linear1(x_mod), [3 * attn.hidden_size, attn.mlp_hidden_dim], dim=-1)
        q, k, v = heads(qkv, attn.num_heads, 3)
        q, k = attn.norm(q, k, v)
        out = attention(q, k, v, pe=pe)
        output = attn.linear2(torch.cat((out, attn.mlp_act(mlp)), 2))
        return x + mod.gate * output


class IPSingleStreamBlockProcessor(nn.Module):
    """The single block with `ip_scale` times the attention of its queries over image-prompt tokens
    added to its attention output."""

    def __init__(self, context_dim, hidden_dim):
        super().__init__()
        self.ip_adapter_single_stream_k_proj = nn.Linear(context_dim, hidden_dim, bias=False)
        self.ip_adapter_single_stream_v_proj = nn.Linear(context_dim, hidden_dim, bias=False)

    def __call__(self, attn, x, vec, pe, image_proj=None, ip_scale=1.0):
        mod, _ = attn.modulation(vec)
        x_mod = (1 + mod.scale) * attn.pre_norm(x) + mod.shift
        qkv, mlp = torch.split(attn.linear1(x_mod), [3 * attn.hidden_size, attn.mlp_hidden_dim], dim=-1)
        q, k, v = heads(qkv, attn.num_heads, 3)
        q, k = attn.norm(q, k, v)
        out = attention(q, k, v, pe=pe)
        ip_key = heads(self.ip_adapter_single_stream_k_proj(image_proj), attn.num_heads, 1)
        ip_value = heads(self.ip_adapter_single_stream_v_proj(image_proj), attn.num_heads, 1)
        ip_out = F.scaled_dot_product_attention(q, ip_key, ip_value)
        out = out + ip_scale * ip_out.transpose(1, 2).flatten(2)
        output = attn.linear2(torch.cat((out, attn.mlp_act(mlp)), 2))
        return x + mod.gate * output


class LoRALinearLayer(nn.Module):
    def __init__(self, in_features, out_features, rank=4):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x):
        return self.up(self.down(x))


class DoubleStreamBlockLoraProcessor(nn.Module):
    """x-flux's LoRA processor layout: an nn.Module whose `forward` runs the block with LoRA deltas
    added to the qkv and proj outputs (what its training script and `set_lora` install)."""

    def __init__(self, dim, rank=4, lora_weight=1.0):
        super().__init__()
        self.qkv_lora1, self.proj_lora1 = LoRALinearLayer(dim, 3 * dim, rank), LoRALinearLayer(dim, dim, rank)
        self.qkv_lora2, self.proj_lora2 = LoRALinearLayer(dim, 3 * dim, rank), LoRALinearLayer(dim, dim, rank)
        self.lora_weight = lora_weight

    def forward(self, attn, img, txt, vec, pe, **attention_kwargs):
        img_mod1, img_mod2 = attn.img_mod(vec)
        txt_mod1, txt_mod2 = attn.txt_mod(vec)
        img_modulated = attn.img_norm1(img)
        img_modulated = (1 + img_mod1.scale) * img_modulated + img_mod1.shift
        img_qkv = attn.img_attn.qkv(img_modulated) + self.qkv_lora1(img_modulated) * self.lora_weight
        img_q, img_k, img_v = heads(img_qkv, attn.num_heads, 3)
        img_q, img_k = attn.img_attn.norm(img_q, img_k, img_v)
        txt_modulated = attn.txt_norm1(txt)
        txt_modulated = (1 + txt_mod1.scale) * txt_modulated + txt_mod1.shift
        txt_qkv = attn.txt_attn.qkv(txt_modulated) + self.qkv_lora2(txt_modulated) * self.lora_weight
        txt_q, txt_k, txt_v = heads(txt_qkv, attn.num_heads, 3)
        txt_q, txt_k = attn.txt_attn.norm(txt_q, txt_k, txt_v)
        joint = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2),
                          pe=pe)
        txt_out, img_out = joint[:, : txt.shape[1]], joint[:, txt.shape[1]:]
        img = (img + img_mod1.gate * attn.img_attn.proj(img_out)
               + img_mod1.gate * self.proj_lora1(img_out) * self.lora_weight)
        img = img + img_mod2.gate * attn.img_mlp((1 + img_mod2.scale) * attn.img_norm2(img) + img_mod2.shift)
        txt = (txt + txt_mod1.gate * attn.txt_attn.proj(txt_out)
               + txt_mod1.gate * self.proj_lora2(txt_out) * self.lora_weight)
        txt = txt + txt_mod2.gate * attn.txt_mlp((1 + txt_mod2.scale) * attn.txt_norm2(txt) + txt_mod2.shift)
        return img, txt


class SingleStreamBlockLoraProcessor(nn.Module):
    def __init__(self, dim, rank=4, lora_weight=1.0):
        super().__init__()
        self.qkv_lora, self.proj_lora = LoRALinearLayer(dim, 3 * dim, rank), LoRALinearLayer(dim, dim, rank)
        self.lora_weight = lora_weight

    def forward(self, attn, x, vec, pe):
        mod, _ = attn.modulation(vec)
        x_mod = (1 + mod.scale) * attn.pre_norm(x) + mod.shift
        qkv, mlp = torch.split(attn.linear1(x_mod), [3 * attn.hidden_size, attn.mlp_hidden_dim], dim=-1)
        qkv = qkv + self.qkv_lora(x_mod) * self.lora_weight
        q, k, v = heads(qkv, attn.num_heads, 3)
        q, k = attn.norm(q, k, v)
        out = attention(q, k, v, pe=pe)
        output = attn.linear2(torch.cat((out, attn.mlp_act(mlp)), 2)) + self.proj_lora(out) * self.lora_weight
        return x + mod.gate * output


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=2.0):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)
        self.set_processor(SingleStreamBlockProcessor())

    def set_processor(self, processor):
        self.processor = processor

    def forward(self, x, vec, pe, image_proj=None, ip_scale=1.0):
        if image_proj is None:
            return self.processor(self, x, vec, pe)
        return self.processor(self, x, vec, pe, image_proj, ip_scale)
