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
values are only 0 and -inf (Chroma's text masks) is exactly the boolean mask `mask == 0`, so
it is mapped to one; checking that reads the mask's values (one host sync per call, only for
float masks; attention with a float mask is dispatched per call, not cached). Any other additive
mask (a bias: ChromaPipeline's 0/1 mask, ComfyUI Redux's `attn_bias`) goes through the op's `pse`
input: its -inf entries become the boolean `atten_mask`, the finite rest the bias, in q's dtype and
in a pse form the op takes (BNSS, BN1S or 1NSS). The docstring is ambiguous about whether `pse` is
scaled: its formula reads `scale * (pse + q @ k^T)`, its pse example's reference
`scale * q @ k^T + pse`. So the convention is probed once per device type and dtype with a 2-key
call whose two readings differ by far (`_pse_convention`), and the bias is divided by `scale` where
the op scales it; a device that matches neither reading declines bias masks with that reason.
Under torch.compile float masks are declined (a value check cannot live in a graph).
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
            why = _additive_mask_reason(mask, q)
            if why:
                return why
    return soc_declines(q.dtype, "fusion_attention")


def _additive_mask_reason(mask, q):
    """None when the float mask can be served (only 0 and -inf: a boolean mask; else a bias through
    `pse`, where the device's pse convention is known), else the reason."""
    if torch.compiler.is_compiling():
        return (f"additive {mask.dtype} mask under torch.compile: whether it holds only 0 and -inf cannot be "
                "checked inside a graph (pass a bool mask, True = attend)")
    if mask.device.type == "meta":
        return None  # 0/-inf as a boolean mask, any other bias through pse: decided per call
    if _zero_or_neginf(mask):
        return None
    convention = _pse_convention(q)
    if convention not in ("scaled", "unscaled"):
        return f"additive {mask.dtype} bias mask: {convention}"
    return None


def _zero_or_neginf(mask) -> bool:
    return bool(((mask == 0) | torch.isneginf(mask)).all())


_PSE: dict[tuple, str] = {}  # (device type, dtype) -> "scaled" | "unscaled" | the reason neither holds


def _pse_convention(q) -> str:
    """How this device's npu_fusion_attention applies `pse`, probed once per (device type, dtype):
    with q = k = 0 the scores are the bias alone, so a 2-key call with pse (0, 2) and scale 0.5
    gives softmax((0, 1)) = (0.27, 0.73) if the op computes scale * (pse + q @ k^T) ("scaled",
    the docstring's formula) and softmax((0, 2)) = (0.12, 0.88) if scale * q @ k^T + pse
    ("unscaled", its example's reference)."""
    key = (q.device.type, q.dtype)
    if key not in _PSE:
        try:
            with torch.no_grad():
                z = torch.zeros(1, 1, 1, 2, dtype=q.dtype, device=q.device)
                k0 = torch.zeros(1, 1, 2, 2, dtype=q.dtype, device=q.device)
                v0 = torch.eye(2, dtype=q.dtype, device=q.device).view(1, 1, 2, 2)
                pse = torch.tensor([0.0, 2.0], dtype=q.dtype, device=q.device).view(1, 1, 1, 2)
                out = torch_npu().npu_fusion_attention(z, k0, v0, head_num=1, input_layout="BNSD", pse=pse,
                                                       scale=0.5, keep_prob=1.0)[0].float().cpu().flatten()
            readings = {"scaled": torch.softmax(torch.tensor([0.0, 1.0]), 0),
                        "unscaled": torch.softmax(torch.tensor([0.0, 2.0]), 0)}
            hit = [name for name, ref in readings.items() if (out - ref).abs().max() <= 0.02]
            _PSE[key] = hit[0] if hit else (f"the op's pse probe gave {out.tolist()}, neither scale * (pse + qk) "
                                            "nor scale * qk + pse: bias masks are not sent through pse")
        except Exception as exc:  # a build without pse support: decline bias masks, say why
            _PSE[key] = f"pse probe failed ({type(exc).__name__}: {exc})"
    return _PSE[key]


def _pse(bias, B, N, Sq, Sk, q_dtype):
    """An additive bias broadcastable to (B, N, Sq, Sk) in a pse form the op takes: (B,N,Sq,Sk),
    (B,N,1,Sk) or (1,N,Sq,Sk)."""
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    b, _, sq, _ = bias.shape
    if sq == 1 and b != 1:
        shape = (B, N, 1, Sk)
    elif b == 1:
        shape = (1, N, Sq, Sk)
    else:
        shape = (B, N, Sq, Sk)
    return bias.to(q_dtype).expand(shape).contiguous()


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
    scale = float(1.0 / math.sqrt(D) if scale is None else scale)
    pse = None
    if mask is not None and mask.dtype != torch.bool and not _zero_or_neginf(mask):
        # a bias: -inf entries are the boolean mask, the finite rest goes in as pse
        neg = torch.isneginf(mask)
        bias = mask.masked_fill(neg, 0.0)
        if _pse_convention(q) == "scaled":  # the op computes scale * (pse + q @ k^T)
            bias = bias / scale
        pse = _pse(bias, B, Nq, Sq, Sk, q.dtype)
        mask = ~neg
    atten_mask, dead = (None, None) if mask is None else _atten_mask(mask, B, Nq, Sq, Sk)
    out = torch_npu().npu_fusion_attention(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        head_num=Nq,
        input_layout="BNSD" if layout == "BHSD" else "BSND",
        pse=pse,
        atten_mask=atten_mask,
        scale=scale,
        keep_prob=1.0,
    )[0]
    if dead is not None:
        out = out.masked_fill(dead if layout == "BHSD" else dead.transpose(1, 2), 0.0)
    return out
