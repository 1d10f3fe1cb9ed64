"""comfy.ldm.flux.math layout: attention(q, k, v, pe, mask=None, transformer_options={}), rope,
apply_rope and the one-tensor apply_rope1."""

import torch

from comfy.ldm.modules.attention import optimized_attention


def attention(q, k, v, pe, mask=None, transformer_options={}):
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    heads = q.shape[1]
    return optimized_attention(q, k, v, heads, skip_reshape=True, mask=mask, transformer_options=transformer_options)


def rope(pos, dim, theta):
    assert dim % 2 == 0
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / (theta ** scale)
    ang = pos.to(torch.float64)[..., None] * omega
    out = torch.stack([ang.cos(), -ang.sin(), ang.sin(), ang.cos()], dim=-1)
    return out.reshape(*ang.shape, 2, 2).to(torch.float32)


def apply_rope1(x, freqs_cis):
    x_ = x.to(freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs_cis[..., 0] * x_[..., 0] + freqs_cis[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def apply_rope(xq, xk, freqs_cis):
    return apply_rope1(xq, freqs_cis), apply_rope1(xk, freqs_cis)
