"""RoPE and attention in the BFL layout: q, k, v are (B, H, L, D); pe is (B, 1, L, D/2, 2, 2)."""

import torch
import torch.nn.functional as F


def attention(q, k, v, pe):
    q, k = apply_rope(q, k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    b, h, n, d = out.shape
    return out.permute(0, 2, 1, 3).reshape(b, n, h * d)


def rope(pos, dim, theta):
    if dim % 2:
        raise ValueError("rope: dim must be even")
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    ang = pos.to(torch.float64)[..., None] * inv  # (..., n, dim/2)
    c, s = ang.cos(), ang.sin()
    rot = torch.stack((c, -s, s, c), dim=-1)
    return rot.view(*ang.shape, 2, 2).float()


def apply_rope(xq, xk, freqs_cis):
    def rotate(x):
        xr = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        y = freqs_cis[..., 0] * xr[..., 0] + freqs_cis[..., 1] * xr[..., 1]
        return y.reshape(*x.shape).type_as(x)

    return rotate(xq), rotate(xk)
