# ruff: noqa: B006  (ComfyUI's own `transformer_options={}` defaults, kept as its layout has them)
"""comfy.ldm.flux.math layout (ComfyUI 2026-08): attention(q, k, v, pe, mask, transformer_options)
on plain tensors, RoPE applied inside it through `apply_rope`, which outside training goes to
comfy-kitchen (`comfy.quant_ops.ck.apply_rope`) and in training to plain torch (`_apply_rope`, which
calls the module's `apply_rope1` by name); `optimized_attention` imported by name."""

import torch

import comfy.model_management
import comfy.quant_ops
from comfy.ldm.modules.attention import optimized_attention


def attention(q, k, v, pe, mask=None, transformer_options={}):
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    return optimized_attention(q, k, v, q.shape[1], skip_reshape=True, mask=mask,
                               transformer_options=transformer_options)


def rope(pos, dim, theta):
    device = pos.device if comfy.model_management.supports_fp64(pos.device) else torch.device("cpu")
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=device)
    ang = pos.to(dtype=torch.float32, device=device)[..., None] * (1.0 / (theta ** scale))
    out = torch.stack([ang.cos(), -ang.sin(), ang.sin(), ang.cos()], dim=-1)
    return out.reshape(*ang.shape, 2, 2).to(dtype=torch.float32, device=pos.device)


def _apply_rope1(x, freqs_cis):
    pairs = x.to(freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    if pairs.shape[2] != 1 and freqs_cis.shape[2] != 1 and pairs.shape[2] != freqs_cis.shape[2]:
        freqs_cis = freqs_cis[:, :, :pairs.shape[2]]  # frequencies for more positions than x has
    out = freqs_cis[..., 0] * pairs[..., 0]
    out.addcmul_(freqs_cis[..., 1], pairs[..., 1])
    return out.reshape(*x.shape).type_as(x)


def _apply_rope(xq, xk, freqs_cis):
    return apply_rope1(xq, freqs_cis), apply_rope1(xk, freqs_cis)


def apply_rope(xq, xk, freqs_cis):
    if comfy.model_management.in_training:
        return _apply_rope(xq, xk, freqs_cis)
    return comfy.quant_ops.ck.apply_rope(xq, xk, freqs_cis)


def apply_rope1(x, freqs_cis):
    if comfy.model_management.in_training:
        return _apply_rope1(x, freqs_cis)
    return comfy.quant_ops.ck.apply_rope1(x, freqs_cis)
