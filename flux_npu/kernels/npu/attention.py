"""NPU attention: torch_npu.npu_fusion_attention (FlashAttention with its own backward).

Contract facts this kernel relies on (from the torch_npu docstring):
- layout is named, not inferred: the caller's tensors go in as they are, (B, H, S, D) as "BNSD"
  and (B, S, H, D) as "BSND", so no transpose or copy is made for either Flux layout;
- `head_num` is required and `scale` defaults to 1.0, so both are passed explicitly
  (scale = 1/sqrt(D) unless the caller gave one);
- `atten_mask` True means *masked out*, the opposite of SDPA's boolean mask: we pass `~mask`,
  shaped as one of the accepted forms (B,N,Sq,Sk), (B,1,Sq,Sk), (1,1,Sq,Sk) or (Sq,Sk);
- the result is a 7-tuple whose element 0 is the output;
- limits: float16/bfloat16/float32 only, one dtype for q, k, v; head dim 1..768 with Dq == Dk and
  key/value of identical shape; Nq 1..256 and a whole multiple of Nkv (GQA is native);
  S up to 1M, B up to 2M.

Masks: a bool mask (True = attend) is inverted into the op's mask. An additive float mask whose
values are only 0 and -inf (Chroma builds such masks) is exactly the boolean mask `mask == 0`, so
it is mapped to one; checking that reads the mask's values (one host sync per call, only for
float masks; attention with a float mask is dispatched per call, not cached). Any other additive
mask is declined: through `pse` it would be scaled by `scale` and rounded, not exact. Under
torch.compile float masks are declined too (a value check cannot live in a graph).
Fully masked query rows give zeros, as the reference defines: such rows are unmasked before the
call (so the op never sees an all-masked row, whatever it would do with one) and their output
rows are zeroed after it, which also zeroes their gradients.
"""

from __future__ import annotations

import math

import torch

from ...backends.npu import soc_declines
from ...ops.registry import register_kernel
from ._support import TORCH_NPU, torch_npu

CAPS = TORCH_NPU.using(vendor_op="npu_fusion_attention")

MAX_HEAD_DIM = 768
MAX_HEADS = 256
MAX_SEQ = 1 << 20
MAX_BATCH = 2 << 20
ACCEPTED_MASK_FORMS = "(B,N,Sq,Sk), (B,1,Sq,Sk), (1,1,Sq,Sk) or (Sq,Sk)"


def _dims(q, k, layout):
    h, s = (1, 2) if layout == "BHSD" else (2, 1)
    return q.shape[0], q.shape[h], k.shape[h], q.shape[s], k.shape[s], q.shape[-1]


def _check(backend, q, k, v, mask, scale, layout):
    why = CAPS.reason(backend, q, k, v, mask)
    if why:
        return why
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype} (the op needs one dtype)"
    B, Nq, Nkv, Sq, Sk, D = _dims(q, k, layout)
    if D > MAX_HEAD_DIM:
        return f"head dim {D} > {MAX_HEAD_DIM} (npu_fusion_attention limit)"
    if Nq > MAX_HEADS:
        return f"{Nq} query heads > {MAX_HEADS} (npu_fusion_attention limit)"
    if Nq % Nkv:
        return f"query heads {Nq} not a multiple of key/value heads {Nkv}"
    if tuple(k.shape) != tuple(v.shape):
        return f"key {tuple(k.shape)} and value {tuple(v.shape)} shapes differ (the op needs them identical)"
    if max(Sq, Sk) > MAX_SEQ or B > MAX_BATCH:
        return f"sequence {max(Sq, Sk)} or batch {B} beyond the op's range (S <= 1M, B <= 2M)"
    if mask is not None:
        if mask.dim() > 4:
            return f"{mask.dim()}-D mask; the op takes {ACCEPTED_MASK_FORMS}"
        if mask.dtype != torch.bool:
            why = _additive_mask_reason(mask)
            if why:
                return why
    return soc_declines(q.dtype, "fusion_attention")


def _additive_mask_reason(mask):
    """None when the float mask holds only 0 and -inf (exactly a boolean mask), else the reason."""
    if torch.compiler.is_compiling():
        return (f"additive {mask.dtype} mask under torch.compile: whether it holds only 0 and -inf cannot be "
                "checked inside a graph (pass a bool mask, True = attend)")
    if mask.device.type == "meta":
        return (f"additive {mask.dtype} mask: served only when its values are all 0 or -inf (checked per call); "
                "pass a bool mask, True = attend")
    if not bool(((mask == 0) | torch.isneginf(mask)).all()):
        return (f"additive {mask.dtype} mask with values other than 0 and -inf: npu_fusion_attention takes boolean "
                "masks only (an additive mask through pse would be scaled and rounded)")
    return None


def _atten_mask(mask, B, N, Sq, Sk):
    """SDPA mask (bool, True = attend; or float 0 / -inf), broadcastable to (B,N,Sq,Sk) -> (the op's
    mask, True = masked out, in an accepted shape with no fully masked row; the fully masked rows,
    (b, n, Sq, 1) with b in (1, B), n in (1, N))."""
    masked_out = ~mask if mask.dtype == torch.bool else (mask != 0)
    while masked_out.dim() < 4:
        masked_out = masked_out.unsqueeze(0)
    dead = masked_out.all(dim=-1, keepdim=True)
    masked_out = (masked_out & ~dead).expand(masked_out.shape[0], masked_out.shape[1], Sq, Sk)
    if masked_out.shape[:2] == (1, 1):
        return masked_out[0, 0].contiguous(), dead
    b = 1 if masked_out.shape[0] == 1 else B
    n = 1 if masked_out.shape[1] == 1 else N
    if b == 1 and n != 1:
        b = B  # (1,N,Sq,Sk) is not an accepted form: widen to (B,N,Sq,Sk)
    return masked_out.expand(b, n, Sq, Sk).contiguous(), dead


@register_kernel("attention", "npu", "torch_npu.npu_fusion_attention", check=_check, caps=CAPS)
def fusion_attention(backend, q, k, v, mask, scale, layout):
    """torch_npu.npu_fusion_attention in the caller's layout (BNSD / BSND), output [0]."""
    B, Nq, _, Sq, Sk, D = _dims(q, k, layout)
    atten_mask, dead = (None, None) if mask is None else _atten_mask(mask, B, Nq, Sq, Sk)
    out = torch_npu().npu_fusion_attention(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        head_num=Nq,
        input_layout="BNSD" if layout == "BHSD" else "BSND",
        atten_mask=atten_mask,
        scale=float(1.0 / math.sqrt(D) if scale is None else scale),
        keep_prob=1.0,
    )[0]
    if dead is not None:
        out = out.masked_fill(dead if layout == "BHSD" else dead.transpose(1, 2), 0.0)
    return out
