"""Attention on CUDA: torch's scaled_dot_product_attention, which picks flash, memory-efficient,
cuDNN or math per input. Which one runs is reported by `sdpa_choice(q, k, v, mask)` and, for the
last call of each input kind, by `last_sdpa_choices()`.

Routing around known-bad SDPA backends (`flux_npu.backends.cuda.SDPA_FACTS`, each with its
source): when the running torch and device match a fact, e.g. torch >= 2.11's cuDNN SDPA backward
on sm_90, attention that records a graph (training) runs under
`torch.nn.attention.sdpa_kernel([flash, efficient, math], set_priority=True)`, which torch.compile
traces. FLUX_NPU_SDPA_BACKENDS="flash,efficient,cudnn,math" (or the backend option
`sdpa_backends`) replaces the routing with the given list, in priority order (cuDNN attention is
often the fastest on Hopper for inference; torch ranks it last by default). The route is decided
once per (device, training/inference) and cached; `sdpa_routing_line()` says it in one line.
flash-attn is not wired in: SDPA's flash backend is the same FlashAttention-2 algorithm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backends import cuda as _cuda
from ...ops.registry import register_kernel
from .._common import foreign_device

_CHOICES: dict = {}


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
    """torch.nn.functional.scaled_dot_product_attention (flash / efficient / cuDNN / math), routed
    around the SDPA backends known to be broken for this torch, device and mode."""
    if layout == "BSHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    route = _cuda.route_for(backend, q.device.index, training)
    if route.backends is None:
        out = _sdpa(q, k, v, mask, scale, gqa)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_cuda.sdpa_enums(route.backends), set_priority=True):
            out = _sdpa(q, k, v, mask, scale, gqa)
    return out.transpose(1, 2) if layout == "BSHD" else out


def _sdpa(q, k, v, mask, scale, gqa):
    if q.device.type != "meta" and not torch.compiler.is_compiling():
        key = (q.device.type, q.dtype, q.shape[-1], None if mask is None else str(mask.dtype), gqa)
        if key not in _CHOICES:  # asked once per input kind, under the active routing
            _CHOICES[key] = sdpa_choice(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
