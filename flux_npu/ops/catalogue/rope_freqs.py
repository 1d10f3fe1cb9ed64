"""rope_freqs: RoPE frequencies for positions, as BFL rotation matrices or diffusers' (cos, sin)."""

from __future__ import annotations

import math
import numbers

import torch

from ..precision import rope_compute_dtype
from ._info import OpInfo, check_tensor, maker, tensor_bytes


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


def validate(pos, dim, theta, form):
    check_tensor("pos", pos)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim <= 0 or dim % 2:
        raise ValueError(f"rope_freqs: dim must be a positive even number, got {dim}")
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not math.isfinite(theta) or theta <= 0:
        raise ValueError(f"rope_freqs: theta must be a finite number > 0 (Flux uses 10000), got {theta!r}")
    if form not in ("bfl", "cos_sin"):
        raise ValueError(f"rope_freqs: form must be 'bfl' or 'cos_sin', got {form!r}")
    if form == "cos_sin" and pos.dim() != 1:
        raise ValueError(f"rope_freqs: form='cos_sin' takes 1-D positions (S,), got shape {tuple(pos.shape)}")


def key(pk, pos, dim, theta, form):
    return ("rope_freqs", pk, pos.dtype, pos.shape, pos.device, dim, theta, form)


def fallback(b, pos, dim, theta, form):
    """The reference, in float64 where the backend computes it and in float32 where it does not."""
    return rope_freqs(pos, dim, theta, form, compute_dtype=rope_compute_dtype(b, pos.device))


def sample_inputs(s, dtype, device="meta", gen=None):
    """diffusers' FluxPosEmbed call: one axis of float32 positions, cos/sin form."""
    if str(device) == "meta" or gen is None:
        pos = maker(torch.float32, device)(s.seq)
    else:
        pos = torch.arange(s.seq, dtype=torch.float32, device=device)
    return (pos, s.axes[-1], 10000.0, "cos_sin")


def nbytes(pos, dim, theta=10000.0, form="bfl"):
    return tensor_bytes(pos) + pos.numel() * dim * 2 * 4  # float32 out: dim/2 2x2 matrices, or cos and sin


# -- the stock code the patches replace ----------------------------------------------------------


def bfl_rope(pos, dim, theta):
    """BFL `rope` (flux.math): rotation matrices built in float64."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def bench_bfl(s, dtype, device, backend, rnd):
    from ... import ops

    B, S = s.batch, s.seq
    pos = (torch.arange(S, dtype=torch.float32)[None].expand(B, S)).to(device)
    dim = 56
    return dict(label=f"B{B} S{S} dim{dim}", dtype_name="fp32", tol_dtype=torch.float32,
                impls={"stock": lambda: bfl_rope(pos, dim, 10000.0),
                       "patched": lambda: ops.rope_freqs(pos, dim, 10000.0, form="bfl", backend=backend)},
                reference=lambda: rope_freqs(pos, dim, 10000.0, form="bfl"),
                nbytes=tensor_bytes(pos) + B * S * dim * 2 * 4,
                compile_target=lambda: bfl_rope(pos, dim, 10000.0), note="BFL rope (float64 maths)")


INFO = OpInfo(
    "rope_freqs", validate, key, fallback,
    arg_names=("pos", "dim", "theta", "form"), grads=(),
    sample_inputs=sample_inputs, nbytes=nbytes, bench={"rope_freqs/bfl": bench_bfl}, bound=True,
    doc="RoPE frequencies: BFL rotation matrices or diffusers' (cos, sin), float64 maths where available",
)
