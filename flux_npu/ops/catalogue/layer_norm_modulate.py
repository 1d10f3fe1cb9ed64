"""layer_norm_modulate: AdaLN, (1 + scale) * LayerNorm(x) + shift."""

from __future__ import annotations

import numbers

import torch

from ..precision import compute_dtype as accumulation_dtype
from ._info import OpInfo, broadcast, check_float, maker, same_device, tensor_bytes


def layer_norm_modulate(x, shift, scale, eps=1e-6):
    """AdaLN: (1 + scale) * LayerNorm(x) + shift (LayerNorm without affine, over the last dim),
    in float32; output dtype = x.dtype. shift and scale broadcast against x, e.g. (B, 1, D)."""
    cd = accumulation_dtype(x.dtype)
    xf = x.to(cd)
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    return (y * (1.0 + scale.to(cd)) + shift.to(cd)).to(x.dtype)


def validate(x, shift, scale, eps, op="layer_norm_modulate"):
    check_float(op, "x", x)
    for n, t in (("shift", shift), ("scale", scale)):
        check_float(op, n, t)
        if t.dim() < 1 or t.shape[-1] != x.shape[-1]:
            raise ValueError(f"{op}: {n} last dim {tuple(t.shape)[-1:]} != x's {x.shape[-1]}")
        if broadcast(t.shape, x.shape) != tuple(x.shape):
            raise ValueError(
                f"{op}: {n} of shape {tuple(t.shape)} does not broadcast to x {tuple(x.shape)} "
                f"(pass (B, 1, D) for a (B, S, D) x)"
            )
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a number >= 0, got {eps!r}")
    same_device(op, x=x, shift=shift, scale=scale)


def key(pk, x, sh, sc, eps):
    return ("layer_norm_modulate", pk, x.dtype, x.shape, x.device, sh.dtype, sh.shape, sh.device, sc.dtype, sc.shape,
            sc.device, eps)


def sample_inputs(s, dtype, device="meta", gen=None):
    """AdaLayerNormZero: x (B, S, hidden), shift and scale (B, 1, hidden)."""
    t = maker(dtype, device, gen)
    return (t(s.batch, s.hidden_seq, s.hidden), t(s.batch, 1, s.hidden, scale=0.1), t(s.batch, 1, s.hidden, scale=0.1),
            1e-6)


def _emb_chunks(dtype, device="meta", gen=None):
    """Odd width, shift and scale the strided (B, 1, D) halves of one (B, 2 D) embedding."""
    t = maker(dtype, device, gen)
    shift, scale = (c[:, None] for c in t(1, 2 * 96).chunk(2, dim=1))
    return (t(1, 17, 96), shift, scale, 1e-6)


def _case(xs, ms, chunks):
    """x (xs), rows off zero (2 x + 0.5); shift, scale (ms), or with chunks the first and last thirds
    of one (B, 3 D) embedding, [:, None] (AdaLayerNormZero)."""

    def make(dtype, device="meta", gen=None):
        t = maker(dtype, device, gen)
        x = t(*xs, scale=2.0) + 0.5
        if chunks:
            emb = t(ms[0], 3 * ms[-1]).chunk(3, dim=1)
            return (x, emb[0][:, None], emb[2][:, None], 1e-6)
        return (x, t(*ms), t(*ms), 1e-6)

    return make


def nbytes(x, shift, scale, eps=1e-6):
    return 2 * tensor_bytes(x) + tensor_bytes(shift, scale)


def bench(s, dtype, device, backend, rnd):
    from ... import ops

    B, S, hidden = s.batch, s.seq, s.hidden
    x = rnd(B, S, hidden)
    emb = rnd(B, 6 * hidden, scale=0.1)
    shift, scale = emb.chunk(6, dim=1)[0], emb.chunk(6, dim=1)[1]
    norm = torch.nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)

    def stock_fn():  # diffusers AdaLayerNormZero: self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return norm(x) * (1 + scale[:, None]) + shift[:, None]

    return dict(label=f"B{B} S{S} D{hidden}",
                impls={"stock": stock_fn,
                       "patched": lambda: ops.layer_norm_modulate(x, shift[:, None], scale[:, None], 1e-6,
                                                                  backend=backend)},
                reference=lambda: layer_norm_modulate(x, shift[:, None], scale[:, None], 1e-6),
                nbytes=2 * tensor_bytes(x) + 2 * tensor_bytes(shift), compile_target=stock_fn,
                note="AdaLayerNormZero norm+modulate")


INFO = OpInfo(
    "layer_norm_modulate", validate, key, layer_norm_modulate,
    arg_names=("x", "shift", "scale", "eps"), grads=("x", "shift", "scale"),
    sample_inputs=sample_inputs, nbytes=nbytes, bench={"layer_norm_modulate": bench},
    extra_samples={"emb-chunks": _emb_chunks, "chunks-200": _case((2, 37, 200), (2, 1, 200), True),
                   "chunks-3072": _case((3, 5, 3072), (3, 1, 3072), True), "d-only": _case((5, 64), (64,), False),
                   "full": _case((2, 7, 48), (2, 7, 48), False), "4d": _case((2, 3, 4, 40), (2, 1, 1, 40), False),
                   "many-rows": _case((1, 300, 32), (1, 1, 32), False)},
    doc="AdaLN modulation: (1 + scale) * LayerNorm(x) + shift",
)
