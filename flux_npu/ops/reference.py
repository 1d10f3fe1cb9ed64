"""Plain-torch references: what "correct" means for every op.

Each reference is written for clarity, not speed, computes in float32 (float64 for float64 inputs,
so a float64 call is the high-precision oracle of the tests) and returns the input's dtype unless
stated. They are the fallback when a backend declines an input,
the oracle of the tests and the baseline of the benchmarks. No backend kernel is imported here.

Conventions shared with Flux code:
- attention tensors are (B, H, S, D) ("BHSD"); diffusers' dispatcher hands (B, S, H, D) ("BSHD").
- RoPE rotates *adjacent* pairs (x[2i], x[2i+1]) by angle pos * theta^(-2i/dim).
  BFL form: `freqs` are rotation matrices (..., S, D/2, 2, 2) = [[cos, -sin], [sin, cos]].
  diffusers form: `freqs` is a (cos, sin) pair, each (S, D), every value repeated for its pair.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch

from .precision import compute_dtype as accumulation_dtype

Freqs = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

LAYOUTS = ("BHSD", "BSHD")


def attention(q, k, v, mask=None, scale=None, layout="BHSD"):
    """softmax(scale * q @ k^T + mask) @ v, in float32; output dtype = q.dtype.

    mask: None, a bool tensor (True = attend, the `scaled_dot_product_attention` meaning) or an
    additive float tensor, broadcastable to (B, H, Sq, Sk). scale defaults to 1/sqrt(D).
    Grouped-query attention: H of q a multiple of H of k/v.

    Fully masked rows: a query whose every key is masked out (all False, or all -inf) gets a zero
    output row and contributes zero gradients, as torch's SDPA kernels and the fused kernels do
    (the literal formula would give 0/0 = NaN). Every backend follows this.
    """
    if layout == "BSHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    cd = accumulation_dtype(q.dtype)
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    if kf.shape[1] != qf.shape[1]:
        rep = qf.shape[1] // kf.shape[1]
        kf, vf = kf.repeat_interleave(rep, dim=1), vf.repeat_interleave(rep, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    dead = None
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(cd)
        dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
        # finite scores in dead rows keep softmax and its backward free of NaN; zeroed below
        scores = scores.masked_fill(dead, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if dead is not None:
        probs = probs.masked_fill(dead, 0.0)
    out = torch.matmul(probs, vf).to(q.dtype)
    return out.transpose(1, 2) if layout == "BSHD" else out


def rope_freqs(pos, dim, theta=10000.0, form="bfl", compute_dtype=torch.float64):
    """RoPE frequencies for positions `pos` (..., S), head-dim slice `dim` (even).

    angle[..., s, i] = pos[..., s] * theta ** (-2i / dim), computed in `compute_dtype` (float64 as
    the BFL reference does; float32 where the device lacks float64), returned as float32:
      form="bfl":     (..., S, dim/2, 2, 2) rotation matrices [[cos, -sin], [sin, cos]];
      form="cos_sin": (cos, sin), each (S, dim), values repeated per pair (pos must be 1-D).
    """
    omega = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=compute_dtype, device=pos.device) / dim))
    angle = pos.to(compute_dtype).unsqueeze(-1) * omega
    cos, sin = torch.cos(angle), torch.sin(angle)
    if form == "bfl":
        mats = torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*angle.shape, 2, 2)
        return mats.float()
    if form == "cos_sin":
        return cos.repeat_interleave(2, dim=-1).float(), sin.repeat_interleave(2, dim=-1).float()
    raise ValueError(f"rope_freqs: form must be 'bfl' or 'cos_sin', got {form!r}")


def apply_rope(x, freqs: Freqs, sequence_dim: int = 2):
    """Rotate adjacent pairs of the last dim of x by `freqs`, in float32; output dtype = x.dtype.

    freqs a tensor: BFL matrices (..., S, D/2, 2, 2) broadcastable against x's (B, H, S) dims
      (x is (B, H, S, D)); `sequence_dim` is ignored. Any 2x2 matrix is applied as given,
      out = M @ (x[2i], x[2i+1]), rotation or not (BFL's `apply_rope` does the same).
    freqs a (cos, sin) pair: each (S, D); x's sequence axis is `sequence_dim` (1: BSHD, 2: BHSD).
    """
    cd = accumulation_dtype(x.dtype)
    pairs = x.to(cd).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)  # (..., D/2, 2); explicit: x may be empty
    if isinstance(freqs, torch.Tensor):
        m = freqs.to(cd)
        out0 = m[..., 0, 0] * pairs[..., 0] + m[..., 0, 1] * pairs[..., 1]
        out1 = m[..., 1, 0] * pairs[..., 0] + m[..., 1, 1] * pairs[..., 1]
    else:
        cos, sin = (t.to(cd) for t in freqs)
        shape = [1] * x.dim()
        shape[sequence_dim] = cos.shape[0]
        shape[-1] = cos.shape[-1]
        c = cos.reshape(shape)[..., 0::2]
        s = sin.reshape(shape)[..., 0::2]
        out0 = pairs[..., 0] * c - pairs[..., 1] * s
        out1 = pairs[..., 1] * c + pairs[..., 0] * s
    return torch.stack([out0, out1], dim=-1).reshape(x.shape).to(x.dtype)


def rms_norm(x, weight=None, eps=1e-6, out_dtype=None):
    """x * rsqrt(mean(x^2, -1) + eps) * weight over the last dim, in float32; one rounding at the
    end to `out_dtype` (default x.dtype). weight None means no affine scale."""
    cd = accumulation_dtype(x.dtype)
    xf = x.to(cd)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(cd)
    return y.to(out_dtype or x.dtype)


def layer_norm_modulate(x, shift, scale, eps=1e-6):
    """AdaLN: (1 + scale) * LayerNorm(x) + shift (LayerNorm without affine, over the last dim),
    in float32; output dtype = x.dtype. shift and scale broadcast against x, e.g. (B, 1, D)."""
    cd = accumulation_dtype(x.dtype)
    xf = x.to(cd)
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    return (y * (1.0 + scale.to(cd)) + shift.to(cd)).to(x.dtype)


def gated_residual(x, gate, y):
    """x + gate * y in float32; output dtype = x.dtype (Flux's `x + gate * attn_out`)."""
    cd = accumulation_dtype(x.dtype)
    return (x.to(cd) + gate.to(cd) * y.to(cd)).to(x.dtype)


def qk_norm_rope(q, k, q_weight, k_weight, freqs: Freqs, eps=1e-6, sequence_dim: int = 2):
    """RMSNorm of q and k (each with its own weight) followed by RoPE: the composition of the two
    references, rounded to the input dtype between them as unfused Flux code does."""
    qn = rms_norm(q, q_weight, eps)
    kn = rms_norm(k, k_weight, eps)
    return apply_rope(qn, freqs, sequence_dim), apply_rope(kn, freqs, sequence_dim)


def adaln_residual(x, gate, y, shift, scale, eps=1e-6):
    """(h, n): h = x + gate * y rounded to x's dtype, n = layer_norm_modulate(h, shift, scale, eps);
    the composition of the two references, as the unfused Flux code computes it (the norm reads the
    stored h)."""
    h = gated_residual(x, gate, y)
    return h, layer_norm_modulate(h, shift, scale, eps)


REFERENCES = {
    "attention": attention,
    "rope_freqs": rope_freqs,
    "apply_rope": apply_rope,
    "rms_norm": rms_norm,
    "layer_norm_modulate": layer_norm_modulate,
    "gated_residual": gated_residual,
    "qk_norm_rope": qk_norm_rope,
    "adaln_residual": adaln_residual,
}
