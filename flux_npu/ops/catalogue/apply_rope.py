"""apply_rope: rotate adjacent pairs of the last dim by BFL matrices or diffusers' (cos, sin)."""

from __future__ import annotations

import torch

from ..precision import compute_dtype as accumulation_dtype
from ._info import OpInfo, broadcast, check_float, maker, same_device, tensor_bytes
from .rope_freqs import rope_freqs

Freqs = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


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


def validate(x, freqs, sequence_dim, op="apply_rope"):
    check_float(op, "x", x)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"{op}: the last dim of x must be even, got {tuple(x.shape)}")
    if isinstance(freqs, torch.Tensor):
        check_float(op, "freqs", freqs)
        if freqs.dim() < 3 or tuple(freqs.shape[-2:]) != (2, 2) or freqs.shape[-3] * 2 != x.shape[-1]:
            raise ValueError(
                f"{op}: BFL freqs must be (..., S, D/2, 2, 2) with D/2 = {x.shape[-1] // 2}, got {tuple(freqs.shape)}"
            )
        lead = tuple(x.shape[:-1])
        if broadcast(freqs.shape[:-3], lead) != lead:
            raise ValueError(
                f"{op}: freqs {tuple(freqs.shape)} must broadcast to x {tuple(x.shape)} without enlarging it "
                f"(leading dims 1 or equal to x's, e.g. (B or 1, 1, S, D/2, 2, 2) for x (B, H, S, D))"
            )
        same_device(op, x=x, freqs=freqs)
    elif isinstance(freqs, tuple) and len(freqs) == 2:
        cos, sin = freqs
        check_float(op, "cos", cos)
        check_float(op, "sin", sin)
        if sequence_dim not in (1, 2) or x.dim() != 4:
            raise ValueError(
                f"{op}: (cos, sin) form needs a 4-D x and sequence_dim 1 or 2, got {x.dim()}-D, {sequence_dim}"
            )
        want = (x.shape[sequence_dim], x.shape[-1])
        if tuple(cos.shape) != want or tuple(sin.shape) != want:
            raise ValueError(f"{op}: cos/sin must be (S, D) = {want}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
        same_device(op, x=x, cos=cos, sin=sin)
    else:
        raise TypeError(f"{op}: freqs must be a BFL rotation tensor (..., S, D/2, 2, 2) or a (cos, sin) pair")
    if x.numel() == 0:
        return "empty"


def freqs_key(freqs):
    if freqs.__class__ is tuple:
        c, s = freqs  # ValueError when it is not a pair
        return (c.dtype, c.shape, c.device, s.dtype, s.shape, s.device)
    return (freqs.dtype, freqs.shape, freqs.device)


def key(pk, x, freqs, sd):
    return ("apply_rope", pk, x.dtype, x.shape, x.device, freqs_key(freqs), sd)


def sample_cos_sin(s, device="meta", gen=None):
    """diffusers' (cos, sin) for the shape's tokens (float32, (S, D)); real values off meta."""
    if str(device) == "meta" or gen is None:
        t = maker(torch.float32, device)
        return (t(s.seq, s.head_dim), t(s.seq, s.head_dim))
    cos, sin = rope_freqs(torch.arange(s.seq, dtype=torch.float32), s.head_dim, form="cos_sin")
    return (cos.to(device), sin.to(device))


def sample_inputs(s, dtype, device="meta", gen=None):
    """diffusers' apply_rotary_emb call: x (B, S, H, D), (cos, sin), sequence_dim 1."""
    return (maker(dtype, device, gen)(s.batch, s.seq, s.heads, s.head_dim), sample_cos_sin(s, device, gen), 1)


def _bfl_strided(dtype, device="meta", gen=None):
    """BFL's k: a strided view of the (B, S, 3, H, D) qkv, per-sample integer positions."""
    B, H, S, D = 2, 3, 11, 20
    x = maker(dtype, device, gen)(B, S, 3, H, D).permute(2, 0, 3, 1, 4)[1]
    if str(device) == "meta" or gen is None:
        return (x, maker(torch.float32, device)(B, 1, S, D // 2, 2, 2), 2)
    pos = torch.randint(0, 50, (B, S), generator=gen).float()
    return (x, rope_freqs(pos, D, 10000.0, form="bfl").unsqueeze(1).float().to(device), 2)


def _general_matrices(dtype, device="meta", gen=None):
    """Any 2x2 matrices, not rotations (BFL's apply_rope applies them as given)."""
    return (maker(dtype, device, gen)(2, 3, 7, 12), maker(torch.float32, device, gen)(2, 1, 7, 6, 2, 2), 2)


def rope_case(form, sequence_dim, dims):
    """(x, freqs, sequence_dim) at (B, S, H, D): x a strided (B, S, H, D) view of a fused qkv
    projection (sequence_dim 1) or a (B, H, S, D) tensor; freqs (cos, sin) of scattered positions,
    BFL matrices per sample (B, 1, S, D/2, 2, 2), or "bfl-nobatch" (S, D/2, 2, 2) broadcast over all."""

    def make(dtype, device="meta", gen=None):
        B, S, H, D = dims
        t = maker(dtype, device, gen)
        x = t(B, S, 3 * H * D).chunk(3, dim=-1)[0].unflatten(-1, (H, D)) if sequence_dim == 1 else t(B, H, S, D)
        meta = str(device) == "meta" or gen is None
        if form == "cos_sin":
            if meta:
                return (x, (maker(torch.float32, device)(S, D), maker(torch.float32, device)(S, D)), sequence_dim)
            pos = torch.randperm(4 * S, generator=gen)[:S].float()  # scattered positions, not 0..S-1
            return (x, tuple(f.float().to(device) for f in rope_freqs(pos, D, form="cos_sin")), sequence_dim)
        lead = (B, 1) if form == "bfl" else ()
        if meta:
            return (x, maker(torch.float32, device)(*lead, S, D // 2, 2, 2), sequence_dim)
        pe = rope_freqs(torch.rand(B if form == "bfl" else 1, S, generator=gen) * 64, D, form="bfl").float()
        return (x, (pe.unsqueeze(1) if form == "bfl" else pe[0]).to(device), sequence_dim)

    return make


# the Triton kernel's layouts: a strided BSHD view, D 128, per-sample and broadcast BFL matrices, 3 pairs
ROPE_CASES = {"bshd-view": ("cos_sin", 1, (2, 37, 3, 24)), "bhsd-d128": ("cos_sin", 2, (1, 19, 2, 128)),
              "bfl-d56": ("bfl", 2, (2, 13, 3, 56)), "bfl-broadcast": ("bfl-nobatch", 2, (3, 9, 2, 16)),
              "bfl-d128": ("bfl", 2, (1, 11, 2, 128)), "odd-pairs": ("cos_sin", 1, (1, 7, 1, 6))}
EXTRA_SAMPLES = {"bfl-strided": _bfl_strided,
                 "general-matrices": _general_matrices, **{n: rope_case(*c) for n, c in ROPE_CASES.items()}}


def nbytes(x, freqs, sequence_dim=2):
    return 2 * tensor_bytes(x) + tensor_bytes(freqs)


# -- the stock code the patches replace ----------------------------------------------------------


def unpatched(fn):
    while hasattr(fn, "__wrapped_original__"):
        fn = fn.__wrapped_original__
    return fn


def diffusers_apply_rotary_emb():
    from diffusers.models import embeddings

    return unpatched(embeddings.apply_rotary_emb)


def bfl_rotate(x, freqs_cis):
    """BFL `apply_rope`'s rotation of one tensor (flux.math)."""
    xr = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    y = freqs_cis[..., 0] * xr[..., 0] + freqs_cis[..., 1] * xr[..., 1]
    return y.reshape(*x.shape).type_as(x)


def bench_cos_sin(S, D, device):
    pos = torch.arange(S, dtype=torch.float32)
    cs = rope_freqs(pos, D, form="cos_sin")
    return tuple(t.to(device) for t in cs)


def bench_bfl_pe(B, S, D, device):
    pos = torch.arange(S, dtype=torch.float32)[None].expand(B, S)
    return rope_freqs(pos, D, form="bfl").unsqueeze(1).to(device)  # (B, 1, S, D/2, 2, 2)


def bench_diffusers(s, dtype, device, backend, rnd):
    from ... import ops

    B, S, H, D = s.batch, s.seq, s.heads, s.head_dim
    x = rnd(B, S, H * D).unflatten(-1, (H, D))
    cs = bench_cos_sin(S, D, device)
    stock = diffusers_apply_rotary_emb()
    return dict(label=f"B{B} S{S} H{H} D{D}",
                impls={"stock": lambda: stock(x, cs, sequence_dim=1),
                       "patched": lambda: ops.apply_rope(x, cs, 1, backend=backend)},
                reference=lambda: apply_rope(x, cs, 1), nbytes=2 * tensor_bytes(x) + tensor_bytes(cs),
                compile_target=lambda: stock(x, cs, sequence_dim=1), note="diffusers apply_rotary_emb (cos, sin)")


def bench_bfl(s, dtype, device, backend, rnd):
    from ... import ops

    B, S, H, D = s.batch, s.seq, s.heads, s.head_dim
    x = rnd(B, H, S, D)
    pe = bench_bfl_pe(B, S, D, device)
    return dict(label=f"B{B} S{S} H{H} D{D}",
                impls={"stock": lambda: bfl_rotate(x, pe), "patched": lambda: ops.apply_rope(x, pe, backend=backend)},
                reference=lambda: apply_rope(x, pe), nbytes=2 * tensor_bytes(x) + tensor_bytes(pe),
                compile_target=lambda: bfl_rotate(x, pe), note="BFL apply_rope, one tensor")


INFO = OpInfo(
    "apply_rope", validate, key, apply_rope,
    arg_names=("x", "freqs", "sequence_dim"), grads=("x",),
    sample_inputs=sample_inputs, nbytes=nbytes,
    bench={"apply_rope": bench_diffusers, "apply_rope/bfl": bench_bfl},
    extra_samples=EXTRA_SAMPLES,
    doc="rotate adjacent pairs of the last dim (BFL matrices or diffusers' cos, sin)",
)
