"""attention: scaled dot-product attention, (B, H, S, D) or (B, S, H, D)."""

from __future__ import annotations

import math
import numbers

import torch

from ..precision import FLOAT_DTYPES
from ..precision import compute_dtype as accumulation_dtype
from ._info import OpInfo, broadcast, check_float, check_tensor, maker, same_device, tensor_bytes

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
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(cd)
        dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
        # finite scores in dead rows keep softmax and its backward free of NaN; zeroed below
        scores = scores.masked_fill(dead, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if dead is not None:
        probs = probs.masked_fill(dead, 0.0)
    out = torch.matmul(probs, vf).to(q.dtype)
    return out.transpose(1, 2) if layout == "BSHD" else out


def validate(q, k, v, mask, scale, layout):
    for n, t in (("q", q), ("k", k), ("v", v)):
        check_float("attention", n, t)
        if t.dim() != 4:
            raise ValueError(f"attention: {n} must be 4-D {layout}, got shape {tuple(t.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"attention: layout must be one of {LAYOUTS}, got {layout!r}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    h, s = (1, 2) if layout == "BHSD" else (2, 1)
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"attention: batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[s] != v.shape[s] or k.shape[h] != v.shape[h]:
        raise ValueError(
            f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} disagree on heads or sequence ({layout})"
        )
    if k.shape[h] == 0 or q.shape[h] == 0:
        raise ValueError(f"attention: q {tuple(q.shape)} / k {tuple(k.shape)} have 0 heads ({layout}): nothing to "
                         "attend with; check the head split")
    if q.shape[h] % k.shape[h]:
        raise ValueError(f"attention: q has {q.shape[h]} heads, not a multiple of k/v's {k.shape[h]} ({layout})")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")
    if mask is not None:
        check_tensor("mask", mask)
        target = (q.shape[0], q.shape[h], q.shape[s], k.shape[s])
        if mask.dim() > 4 or broadcast(mask.shape, target) != target:
            raise ValueError(
                f"attention: mask of shape {tuple(mask.shape)} does not broadcast to (B, H, Sq, Sk) = {target}"
            )
        if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
            raise TypeError(f"attention: mask must be bool (True = attend) or an additive float mask, got {mask.dtype}")
        if mask.dtype not in (torch.bool, torch.float32, q.dtype):
            # torch's SDPA (the cpu and cuda kernels' base) takes bool, float32 or q's dtype and refuses
            # others (a float64 mask with float32 q) with a message naming no fix
            raise TypeError(f"attention: an additive float mask must be float32 or q's dtype {q.dtype}, got "
                            f"{mask.dtype}; pass mask.to(q.dtype) (or a bool mask, True = attend)")
    same_device("attention", q=q, k=k, v=v, mask=mask)


def key(pk, q, k, v, mask, scale, layout):
    if mask is not None and mask.dtype is not torch.bool:
        # an additive mask's kernel choice may depend on its values (npu: only 0 / -inf maps
        # exactly onto the fused op's boolean mask), so it is decided per call
        raise TypeError
    # whether a backward will be needed is part of the signature: an inference-only kernel (npu's
    # npu_fused_infer_attention_score) may serve a no-grad call but never one that needs a backward
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return ("attention", pk, q.dtype, q.shape, q.device, k.dtype, k.shape, k.device, v.dtype, v.shape, v.device,
            None if mask is None else (mask.shape, mask.device), scale, layout, grad)


def sample_inputs(s, dtype, device="meta", gen=None):
    """diffusers' dispatcher call: (B, S, H, D) q, k, v, no mask."""
    t = maker(dtype, device, gen)
    return (t(s.batch, s.seq, s.heads, s.head_dim), t(s.batch, s.seq, s.heads, s.head_dim),
            t(s.batch, s.seq, s.heads, s.head_dim), None, None, "BSHD")


def _plain(shape, layout):
    """q, k, v (B, H, S, D) or (B, S, H, D), no mask."""

    def make(dtype, device="meta", gen=None):
        B, H, S, D = shape
        t = maker(dtype, device, gen)
        dims = (B, H, S, D) if layout == "BHSD" else (B, S, H, D)
        return (t(*dims), t(*dims), t(*dims), None, None, layout)

    return make


def _masked(kind):
    """GQA (4 query heads, 2 key heads, 9 queries, 11 keys) with a key mask, boolean (True keeps) or
    additive (0 / -1e4), or a (B, 1, S, S) boolean mask in (B, S, H, D); key 0 always kept."""

    def make(dtype, device="meta", gen=None):
        t = maker(dtype, device, gen)
        if kind == "bool-bshd":
            q, k, v, mshape, layout = t(2, 5, 2, 8), t(2, 5, 2, 8), t(2, 5, 2, 8), (2, 1, 5, 5), "BSHD"
        else:
            q, k, v, mshape, layout = t(2, 4, 9, 16), t(2, 2, 11, 16), t(2, 2, 11, 16), (2, 1, 1, 11), "BHSD"
        if str(device) == "meta" or gen is None:
            keep = torch.ones(mshape, dtype=torch.bool, device=device)
        else:
            keep = torch.rand(mshape, generator=gen) > 0.3
            keep[..., 0] = True
            keep = keep.to(device)
        mask = torch.where(keep, 0.0, -1e4).to(dtype) if kind == "additive" else keep
        return (q, k, v, mask, None, layout)

    return make


EXTRA_SAMPLES = {"bhsd-17": _plain((1, 3, 17, 16), "BHSD"), "bshd-33": _plain((2, 2, 33, 24), "BSHD"),
                 "gqa-bool-mask": _masked("bool"), "gqa-additive-mask": _masked("additive"),
                 "bool-mask-bshd": _masked("bool-bshd")}


def nbytes(q, k, v, mask=None, scale=None, layout="BHSD"):
    return tensor_bytes(q, k, v, mask) + tensor_bytes(q)


# -- the stock code the patches replace ----------------------------------------------------------

NATIVE_NPU = "diffusers _native_npu"


def diffusers_native_npu(backend, dtype):
    """(callable on (B, S, H, D) q, k, v, None) when diffusers' `_native_npu` attention backend can
    run here, else (None, the reason)."""
    if backend.device_type != "npu":
        return None, "diffusers' _native_npu attention runs on npu only"
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
    except ImportError as exc:
        return None, f"diffusers not importable ({exc})"
    name = getattr(AttentionBackendName, "_NATIVE_NPU", None)
    if name is None:
        return None, "this diffusers has no _native_npu attention backend"
    if dtype not in (torch.bfloat16, torch.float16):
        return None, "diffusers' _native_npu takes bf16/fp16 only"
    return (lambda q, k, v: dispatch_attention_fn(q, k, v, backend=name)), ""


def bench(s, dtype, device, backend, rnd):
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from ... import ops
    from ...kernels.cuda.attention import sdpa_choice

    B, S, H, D = s.batch, s.seq, s.heads, s.head_dim
    q, k, v = (rnd(B, S, H, D) for _ in range(3))
    chosen = sdpa_choice(*(t.transpose(1, 2) for t in (q, k, v)))
    impls = {"stock": lambda: dispatch_attention_fn(q, k, v),
             "patched": lambda: ops.attention(q, k, v, layout="BSHD", backend=backend)}
    native, why = diffusers_native_npu(backend, dtype)
    extra = {}
    if native is not None:
        impls[NATIVE_NPU] = lambda: native(q, k, v)
    else:
        extra[NATIVE_NPU] = why
    return dict(label=f"B{B} S{S} H{H} D{D}", impls=impls, reference=lambda: attention(q, k, v, layout="BSHD"),
                nbytes=4 * tensor_bytes(q), compile_target=lambda: dispatch_attention_fn(q, k, v),
                note=f"SDPA {chosen}; compute-bound: GB/s is nominal", skipped=extra)


INFO = OpInfo(
    "attention", validate, key, attention,
    arg_names=("q", "k", "v", "mask", "scale", "layout"), grads=("q", "k", "v"),
    sample_inputs=sample_inputs, nbytes=nbytes, bench={"attention": bench},
    extra_samples=EXTRA_SAMPLES,
    doc="scaled dot-product attention (BHSD or BSHD), bool or additive mask, GQA",
)
