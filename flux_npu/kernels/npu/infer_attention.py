"""NPU inference attention: torch_npu.npu_fused_infer_attention_score (FIA), for calls that need
no backward. Registered before npu_fusion_attention, which serves everything this one declines.

Why: npu_fusion_attention's docstring (torch_npu 2.14.0) says it is meant for training only and
supports neither graph mode nor aclgraph; for inference Ascend documents FIA (inference, graph
mode, no backward). Whether a call needs a backward (grad mode on and an input requiring grad)
is part of the attention signature, so a plan made for a no-grad call never serves a training
step.

Documented limits this check holds (FIA docstring, 2.14.0; Q_S is the query sequence length):
- query/key/value float16 or bfloat16 (int8/int4 are quantised modes we do not use): float32
  goes to npu_fusion_attention; one dtype for the three;
- contiguous inputs (passed `.contiguous()`), key and value of one shape;
- B <= 65536, N <= 256, num_heads / num_key_value_heads a whole number <= 64;
- D <= 512 and a multiple of 16 for float16/bfloat16 (Q_S > 1), N * D < 65535 in BSND;
- sequence: Q_S <= 20M (Q_S > 1), KV_S <= 262144 when Q_S == 1;
- atten_mask bool, shapes (1,1,Q_S,KV_S) or (B,1,Q_S,KV_S) in sparse_mode 0: no per-head mask
  (those go to npu_fusion_attention), True = masked out as in npu_fusion_attention; additive
  float masks go to npu_fusion_attention too (its 0/-inf mapping reads values per call);
- Atlas A2 / Atlas 800I A2 / A3 (the SoC rule shared with npu_fusion_attention).
Fully masked query rows are unmasked before the call and zeroed after it, as for the training op
(the reference defines zeros; FIA's own "row invalid" correction, inner_precise 2/3, costs speed).
"""

from __future__ import annotations

import math

import torch

from ...backends.npu import soc_declines
from ...ops.registry import register_kernel
from ._support import TORCH_NPU, prelude, torch_npu

OP = "npu_fused_infer_attention_score"
FIA_DTYPES = (torch.float16, torch.bfloat16)
CAPS = TORCH_NPU.using(vendor_op=OP, dtypes=FIA_DTYPES, dtype_note=f" ({OP} takes float16 and bfloat16)")
MAX_HEAD_DIM = 512
MAX_HEADS = 256
MAX_GROUP = 64
MAX_BATCH = 65536
MAX_SEQ = 20 * 1024 * 1024
MAX_KV_SEQ_DECODE = 262144
MAX_ND_BSND = 65535


def _dims(q, k, layout):
    h, s = (1, 2) if layout == "BHSD" else (2, 1)
    return q.shape[0], q.shape[h], k.shape[h], q.shape[s], k.shape[s], q.shape[-1]


def needs_backward(q, k, v) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _check(backend, q, k, v, mask, scale, layout):
    why = prelude(backend, OP, q, k, v, mask)
    if why:
        return why
    if needs_backward(q, k, v):
        return f"a backward is needed ({OP} is inference-only, no backward)"
    why = CAPS.reason(backend, q, k, v)  # after the backward test: a grad-needing call is told that first
    if why:
        return why
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if tuple(k.shape) != tuple(v.shape):
        return f"key {tuple(k.shape)} and value {tuple(v.shape)} shapes differ"
    B, Nq, Nkv, Sq, Sk, D = _dims(q, k, layout)
    if D > MAX_HEAD_DIM or D % 16:
        return f"head dim {D} ({OP} needs D <= {MAX_HEAD_DIM} and a multiple of 16 for float16/bfloat16)"
    if Nq > MAX_HEADS:
        return f"{Nq} query heads > {MAX_HEADS}"
    if Nq % Nkv or Nq // Nkv > MAX_GROUP:
        return f"query heads {Nq} / key-value heads {Nkv}: must be a whole number <= {MAX_GROUP}"
    if B > MAX_BATCH:
        return f"batch {B} > {MAX_BATCH}"
    if layout == "BSHD" and Nq * D >= MAX_ND_BSND:
        return f"N*D = {Nq * D} >= {MAX_ND_BSND} in BSND"
    if Sq > MAX_SEQ or (Sq == 1 and Sk > MAX_KV_SEQ_DECODE):
        return f"sequence q {Sq} / kv {Sk} beyond {OP}'s range"
    if mask is not None:
        if mask.dtype != torch.bool:
            return f"additive {mask.dtype} mask (npu_fusion_attention maps a 0/-inf mask; {OP} takes bool masks here)"
        if mask.dim() > 4:
            return f"{mask.dim()}-D mask"
        shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
        if shape[1] != 1:
            return f"per-head mask {tuple(mask.shape)} ({OP} takes (1,1,Sq,Sk) or (B,1,Sq,Sk))"
    return soc_declines(q.dtype, "fusion_attention")


def _infer_mask(mask, Sq, Sk):
    """SDPA bool mask (True = attend), broadcastable to (B,1,Sq,Sk) -> (the op's mask, True =
    masked out, (1,1,Sq,Sk) or (B,1,Sq,Sk), no fully masked row; the fully masked rows)."""
    masked_out = ~mask
    while masked_out.dim() < 4:
        masked_out = masked_out.unsqueeze(0)
    dead = masked_out.all(dim=-1, keepdim=True)
    masked_out = masked_out & ~dead
    return masked_out.expand(masked_out.shape[0], 1, Sq, Sk).contiguous(), dead


@register_kernel("attention", "npu", f"torch_npu.{OP}", check=_check, caps=CAPS)
def fused_infer_attention(backend, q, k, v, mask, scale, layout):
    """torch_npu.npu_fused_infer_attention_score in the caller's layout (BNSD / BSND), output [0]."""
    B, Nq, Nkv, Sq, Sk, D = _dims(q, k, layout)
    atten_mask, dead = (None, None) if mask is None else _infer_mask(mask, Sq, Sk)
    out = torch_npu().npu_fused_infer_attention_score(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        atten_mask=atten_mask,
        num_heads=Nq,
        num_key_value_heads=Nkv,
        scale=float(1.0 / math.sqrt(D) if scale is None else scale),
        input_layout="BNSD" if layout == "BHSD" else "BSND",
    )[0]
    if dead is not None:
        out = out.masked_fill(dead if layout == "BHSD" else dead.transpose(1, 2), 0.0)
    return out
