"""x-flux's math module: attention of (B, H, L, D) q, k, v after RoPE with pe (B, 1, L, D/2, 2, 2)."""

import torch
import torch.nn.functional as F


def attention(q, k, v, pe):
    q, k = apply_rope(q, k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def rope(pos, dim, theta):
    inv = theta ** -(torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    ang = pos.to(torch.float64)[..., None] * inv
    cos, sin = ang.cos(), ang.sin()
    return torch.stack((cos, -sin, sin, cos), dim=-1).reshape(*ang.shape, 2, 2).float()


def apply_rope(xq, xk, freqs_cis):
    def turn(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        out = freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]
        return out.reshape(x.shape).type_as(x)

    return turn(xq), turn(xk)
