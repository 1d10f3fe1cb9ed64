# ruff: noqa: B006  (ComfyUI's own `transformer_options={}` defaults, kept as its layout has them)
"""comfy.ldm.flux.math layout (late 2025): attention takes q/k/v (tensors or containers) and a
`preferred_attention`; outside training RoPE goes through comfy-kitchen (comfy.quant_ops.ck)."""

import torch

import comfy.model_management
import comfy.quant_ops
from comfy.ldm.modules.attention import AttentionTensorContainer, optimized_attention


def attention(q, k, v, pe, mask=None, transformer_options={}, preferred_attention=None):
    if pe is not None:
        q, k = apply_rope(_tensor(q), _tensor(k), pe)
        q, k = AttentionTensorContainer(q), AttentionTensorContainer(k)
    heads = (q.peek() if isinstance(q, AttentionTensorContainer) else q).shape[1]
    return optimized_attention(q, k, v, heads, skip_reshape=True, mask=mask, transformer_options=transformer_options,
                               preferred_attention=preferred_attention)


def _tensor(x):
    return x.take() if isinstance(x, AttentionTensorContainer) else x


def rope(pos, dim, theta):
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=pos.device)
    ang = pos.to(torch.float64)[..., None] * (1.0 / (theta ** scale))
    out = torch.stack([ang.cos(), -ang.sin(), ang.sin(), ang.cos()], dim=-1)
    return out.reshape(*ang.shape, 2, 2).to(torch.float32)


def _rope1(x, freqs_cis):
    x_ = x.to(freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    return (freqs_cis[..., 0] * x_[..., 0] + freqs_cis[..., 1] * x_[..., 1]).reshape(*x.shape).type_as(x)


def apply_rope1(x, freqs_cis):
    if comfy.model_management.in_training:
        return _rope1(x, freqs_cis)
    return comfy.quant_ops.ck.apply_rope1(x, freqs_cis)


def apply_rope(xq, xk, freqs_cis):
    if comfy.model_management.in_training:
        return _rope1(xq, freqs_cis), _rope1(xk, freqs_cis)
    return comfy.quant_ops.ck.apply_rope(xq, xk, freqs_cis)
