"""Open torch_npu questions that only a device can settle, asked by `flux-npu verify --backend npu`.

The torch_npu documentation leaves a few things open that decide how the npu kernels should call
their ops (issue 17 item 5). Each question here calls the op directly on the device with Flux-like
inputs, compares what comes back with a float64 plain-torch reference of the same inputs, and
records the answer: accepted or rejected (with the error), output dtype, relative error. The
kernels keep the documented (strict) calls until a device answers; the report asks for the answer
to be sent back with the command line that produced it.

1. rope_fp32_cos_sin: does `npu_rotary_mul` (interleave) take a bf16 x with float32 cos/sin, and is
   it then more accurate than with cos/sin rounded to bf16 (what flux-npu passes today)? With bf16
   cos/sin the npu RoPE breaks the 10x max-relative part of Ascend's rule at outputs near zero
   (parity, emulated npu).
2. rms_norm_fp32_gamma: does `npu_rms_norm` take a bf16 x with a float32 gamma (other Ascend pages
   allow it on A2; the shipped docstring says same dtype), which output dtype comes back, and
   which dtype does gamma's gradient have?
3. fia_vs_fa: for inference, does `npu_fused_infer_attention_score` agree with
   `npu_fusion_attention` (and with float64) on Flux-shaped bf16 inputs, and does FIA read a bool
   mask as True = masked out (the convention flux-npu assumes, as for FA)?
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable

import torch

from .testing import rel_err


def _rand(shape, seed, dtype, device, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def _row(question: str, asked: str, fn: Callable[[], dict]) -> dict:
    row = {"question": question, "asked": asked}
    try:
        row.update(fn())
    except Exception as exc:  # a rejected call is an answer, not a crash of the phase
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row.update(answer="error", error=f"{type(exc).__name__}: {first}", traceback=traceback.format_exc(limit=3))
    return row


def _rope_cos_sin(S, D, device):
    pos = torch.arange(S, dtype=torch.float64)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = pos[:, None] * inv[None, :]
    cos = torch.cos(ang).repeat_interleave(2, -1)
    sin = torch.sin(ang).repeat_interleave(2, -1)
    return cos, sin


def _rope64(x, cos, sin):
    x = x.double()
    rot = torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)
    return x * cos + rot * sin


def q_rope_fp32_cos_sin(tnp, device) -> dict:
    B, N, S, D = 1, 4, 64, 128
    x = _rand((B, N, S, D), 1, torch.bfloat16, device)
    cos64, sin64 = _rope_cos_sin(S, D, device)
    ref = _rope64(x.cpu(), cos64[None, None], sin64[None, None])
    shape = (1, 1, S, D)
    c32, s32 = cos64.float().reshape(shape).to(device), sin64.float().reshape(shape).to(device)
    low = tnp.npu_rotary_mul(x, c32.to(torch.bfloat16), s32.to(torch.bfloat16), rotary_mode="interleave")
    out = {"bf16 cos/sin": {"rel_err": rel_err(low.cpu(), ref)}}
    try:
        mixed = tnp.npu_rotary_mul(x, c32, s32, rotary_mode="interleave")
    except Exception as exc:
        return dict(answer="rejected", detail=out, error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
                    verdict="keep rounding cos/sin to x's dtype (the op rejects float32 cos/sin with a bf16 x)")
    out["fp32 cos/sin"] = {"rel_err": rel_err(mixed.cpu(), ref), "dtype": str(mixed.dtype)}
    better = out["fp32 cos/sin"]["rel_err"] < out["bf16 cos/sin"]["rel_err"]
    return dict(answer="accepted", detail=out,
                verdict=("pass float32 cos/sin with a bf16 x: more accurate" if better else
                         "accepted, but not more accurate than bf16 cos/sin"))


def q_rms_norm_fp32_gamma(tnp, device) -> dict:
    x = _rand((2, 24, 64, 128), 2, torch.bfloat16, device, 3.0).requires_grad_()
    gamma = (1 + 0.1 * _rand((128,), 3, torch.float32, device)).requires_grad_()
    try:
        y = tnp.npu_rms_norm(x, gamma, epsilon=1e-6)[0]
    except Exception as exc:
        return dict(answer="rejected", error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
                    verdict="keep casting gamma to x's dtype (flux-npu forms the float32 weight gradient itself)")
    x64, g64 = x.detach().cpu().double(), gamma.detach().cpu().double()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * g64
    dy = _rand(tuple(y.shape), 4, y.dtype, device)
    dx, dg = torch.autograd.grad(y, (x, gamma), dy)
    dg64 = (dy.cpu().double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)).sum((0, 1, 2))
    return dict(answer="accepted", detail={"out_dtype": str(y.dtype), "rel_err": rel_err(y.cpu(), ref),
                                           "dgamma_dtype": str(dg.dtype), "dgamma_rel_err": rel_err(dg.cpu(), dg64)},
                verdict="accepted: gamma could be passed in float32 (compare dgamma_rel_err with the float32 path)")


def q_fia_vs_fa(tnp, device) -> dict:
    B, N, S, D = 1, 24, 256, 128
    q, k, v = (_rand((B, N, S, D), s, torch.bfloat16, device) for s in (5, 6, 7))
    g = torch.Generator().manual_seed(8)
    keep = torch.rand(1, 1, S, S, generator=g) > 0.3
    keep[..., 0] = True
    scale = 1.0 / math.sqrt(D)
    q64, k64, v64 = (t.cpu().double() for t in (q, k, v))
    s64 = (q64 @ k64.transpose(-1, -2)) * scale
    ref_nomask = torch.softmax(s64, -1) @ v64
    ref_mask = torch.softmax(s64.masked_fill(~keep, float("-inf")), -1) @ v64
    with torch.no_grad():
        fa = tnp.npu_fusion_attention(q, k, v, N, "BNSD", scale=scale, keep_prob=1.0)[0]
        fia = tnp.npu_fused_infer_attention_score(q, k, v, num_heads=N, num_key_value_heads=N, scale=scale,
                                                  input_layout="BNSD")[0]
        fia_m = tnp.npu_fused_infer_attention_score(q, k, v, atten_mask=(~keep).to(device), num_heads=N,
                                                    num_key_value_heads=N, scale=scale, input_layout="BNSD")[0]
    e_mask_out, e_mask_in = rel_err(fia_m.cpu(), ref_mask), rel_err(fia_m.cpu(), torch.softmax(
        s64.masked_fill(keep, float("-inf")), -1).nan_to_num() @ v64)
    detail = {"fa_rel_err": rel_err(fa.cpu(), ref_nomask), "fia_rel_err": rel_err(fia.cpu(), ref_nomask),
              "fia_vs_fa_rel": rel_err(fia.cpu(), fa.cpu()), "fia_mask_true_is_masked_out_rel_err": e_mask_out,
              "fia_mask_true_is_attend_rel_err": e_mask_in}
    convention = "True = masked out (as assumed)" if e_mask_out < e_mask_in else "True = attend: FIX the FIA kernel"
    return dict(answer="ran", detail=detail, verdict=f"FIA mask convention: {convention}")


QUESTIONS = (
    ("rope_fp32_cos_sin", "npu_rotary_mul(x bf16, cos/sin float32, interleave): accepted? more accurate?",
     q_rope_fp32_cos_sin),
    ("rms_norm_fp32_gamma", "npu_rms_norm(x bf16, gamma float32): accepted? output and dgamma dtypes?",
     q_rms_norm_fp32_gamma),
    ("fia_vs_fa", "inference: FIA vs FA vs float64 at 24 heads x 128, S=256; FIA's bool-mask convention",
     q_fia_vs_fa),
)


def ask(backend) -> list[dict]:
    """Ask every question on `backend`'s device (torch_npu must import). Rows: question, asked,
    answer ('accepted' / 'rejected' / 'ran' / 'error'), detail, verdict, error."""
    from .backends import npu as _npu

    mod, why = _npu.torch_npu_or_reason()
    if mod is None:
        return [{"question": q, "asked": asked, "answer": "not asked", "error": why} for q, asked, _ in QUESTIONS]
    device = backend.device()
    return [_row(q, asked, lambda fn=fn: fn(mod, device)) for q, asked, fn in QUESTIONS]
