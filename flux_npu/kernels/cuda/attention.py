"""Attention on CUDA: torch's scaled_dot_product_attention, which picks flash, memory-efficient,
cuDNN or math per input. Which one runs is reported by `sdpa_choice(q, k, v, mask)` and, for the
last call of each input kind, by `last_sdpa_choices()`.

The priority order is torch's default unless FLUX_NPU_SDPA_PRIORITY names one, e.g.
"cudnn,flash,efficient,math" (cuDNN attention is often the fastest on Hopper; torch ranks it
last by default). flash-attn is not wired in: SDPA's flash backend is the same FlashAttention-2
algorithm, and FlashAttention-3 (Hopper) could not be measured in this project so far.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from ...ops.registry import register_kernel
from .._common import foreign_device

_NAMES = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
_CHOICES: dict = {}


def _priority():
    spec = os.environ.get("FLUX_NPU_SDPA_PRIORITY", "").strip()
    if not spec:
        return None
    from torch.nn.attention import SDPBackend

    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in _NAMES]
    if unknown:
        raise ValueError(f"FLUX_NPU_SDPA_PRIORITY: unknown SDPA backends {unknown}; use {', '.join(_NAMES)}")
    return [getattr(SDPBackend, _NAMES[n]) for n in names]


def sdpa_choice(q, k, v, mask=None, scale=None) -> str:
    """The SDPA backend torch would run for these (B, H, S, D) inputs, e.g. 'FLASH_ATTENTION'."""
    try:
        from torch.nn.attention import SDPBackend

        gqa = q.shape[1] != k.shape[1]
        return SDPBackend(torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=scale, enable_gqa=gqa)).name
    except Exception as exc:  # private API: a report must not crash on it
        return f"unknown ({type(exc).__name__})"


def last_sdpa_choices() -> dict:
    """{(device, dtype, head_dim, mask kind, gqa): SDPA backend} for the inputs seen so far."""
    return dict(_CHOICES)


def _check(backend, q, k, v, mask, scale, layout):
    return foreign_device(backend, q, k, v, mask)


@register_kernel("attention", "cuda", "torch.sdpa", check=_check)
def sdpa_attention(backend, q, k, v, mask, scale, layout):
    """torch.nn.functional.scaled_dot_product_attention (flash / efficient / cuDNN / math)."""
    if layout == "BSHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    key = (q.device.type, q.dtype, q.shape[-1], None if mask is None else str(mask.dtype), gqa)
    prio = _priority()
    ctx = contextlib.nullcontext()
    if prio is not None:
        from torch.nn.attention import sdpa_kernel

        ctx = sdpa_kernel(prio, set_priority=True)
    with ctx:
        if key not in _CHOICES and q.device.type != "meta":  # asked once per input kind, under the same priority
            _CHOICES[key] = sdpa_choice(q, k, v, mask, scale)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2) if layout == "BSHD" else out
