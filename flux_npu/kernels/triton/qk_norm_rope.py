"""Fused QK-norm + RoPE in Triton: RoPE(RMSNorm(q) * q_weight), RoPE(RMSNorm(k) * k_weight).

Flux normalises q and k over the head dim and rotates them right after; fused, each of q and k is
read once and written once (the unfused path reads and writes each twice). The kernel is the RoPE
kernel with its RMSNorm prologue (rope.py, NORM=True); this file is the op's entry point.
"""

from __future__ import annotations

from .rope import norm_rope


def qk_norm_rope(q, k, q_weight, k_weight, freqs, eps: float = 1e-6, sequence_dim: int = 2):
    """(RoPE(RMSNorm(q)), RoPE(RMSNorm(k))) as `flux_npu.ops.reference.qk_norm_rope`;
    differentiable in q, k and both weights."""
    return norm_rope(q, q_weight, freqs, eps, sequence_dim), norm_rope(k, k_weight, freqs, eps, sequence_dim)
