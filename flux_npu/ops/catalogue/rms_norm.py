"""rms_norm: RMSNorm over the last dim with an optional weight (Flux's QK-norm)."""

from __future__ import annotations

import numbers

import torch

from ..precision import FLOAT_DTYPES
from ..precision import compute_dtype as accumulation_dtype
from ._info import OpInfo, check_float, maker, same_device, sig, tensor_bytes


def rms_norm(x, weight=None, eps=1e-6, out_dtype=None):
    """x * rsqrt(mean(x^2, -1) + eps) * weight over the last dim, in float32; one rounding at the
    end to `out_dtype` (default x.dtype). weight None means no affine scale."""
    cd = accumulation_dtype(x.dtype)
    xf = x.to(cd)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(cd)
    return y.to(out_dtype or x.dtype)


def validate(x, weight, eps, out_dtype, op="rms_norm", name="weight"):
    check_float(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dim, got a 0-D tensor")
    if weight is not None:
        check_float(op, name, weight)
        if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(f"{op}: {name} must be ({x.shape[-1]},) for x {tuple(x.shape)}, got {tuple(weight.shape)}")
        same_device(op, x=x, weight=weight)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a number >= 0, got {eps!r}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be None or a float dtype (float32, bfloat16, float16, float64), "
                        f"got {out_dtype!r}")


def key(pk, x, w, eps, od):
    return ("rms_norm", pk, x.dtype, x.shape, x.device, sig(w), eps, od)


def sample_inputs(s, dtype, device="meta", gen=None):
    """diffusers' norm_q on the processor's (B, S, H, D) view."""
    t = maker(dtype, device, gen)
    return (t(s.batch, s.seq, s.heads, s.head_dim), t(s.head_dim, scale=0.2), 1e-6, None)


def _rows(shape, weight=True, view=None):
    """x of `shape` (view "qkv": a strided third of one fused (B, S, 3 H D) projection, unflattened;
    "transposed": the transpose of a contiguous tensor, last dim not unit-stride), weight or None."""

    def make(dtype, device="meta", gen=None):
        t = maker(dtype, device, gen)
        if view == "qkv":
            B, S, H, D = shape
            x = t(B, S, 3 * H * D).chunk(3, dim=-1)[1].unflatten(-1, (H, D))
        elif view == "transposed":
            x = t(*shape[::-1]).t()
        else:
            x = t(*shape)
        return (x, t(shape[-1], scale=0.2) if weight else None, 1e-6, None)

    return make


# inputs other than the processor's view: strided and transposed rows, odd and 4096-wide rows,
# more than 4 dims, a single row, no weight
EXTRA_SAMPLES = {"odd-2d": _rows((5, 131)),
                 "qkv-view": _rows((2, 37, 3, 128), view="qkv"), "hidden-3072": _rows((3, 5, 3072)),
                 "odd-row-no-weight": _rows((7, 100), False), "one-row": _rows((1, 1, 1, 64)),
                 "5d": _rows((2, 3, 2, 5, 24)), "row-4096": _rows((2, 3, 4096)),
                 "transposed-no-weight": _rows((5, 72), False, "transposed")}


def nbytes(x, weight=None, eps=1e-6, out_dtype=None):
    return 2 * tensor_bytes(x) + tensor_bytes(weight)


# -- the stock code the patches replace ----------------------------------------------------------


def bfl_rms_norm(x, scale):
    """BFL `RMSNorm.forward` (flux.modules.layers), eps 1e-6."""
    dt = x.dtype
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype=dt) * scale


def bench_diffusers(s, dtype, device, backend, rnd):
    from ... import ops

    B, S, H, D = s.batch, s.seq, s.heads, s.head_dim
    x = rnd(B, S, H * D).unflatten(-1, (H, D))  # the processor's unflatten view
    norm = torch.nn.RMSNorm(D, eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(rnd(D, scale=0.2) + 1)
    w = norm.weight.detach()
    return dict(label=f"B{B} S{S} H{H} D{D}",
                impls={"stock": lambda: norm(x), "patched": lambda: ops.rms_norm(x, w, 1e-6, backend=backend)},
                reference=lambda: rms_norm(x, w, 1e-6), nbytes=2 * tensor_bytes(x) + tensor_bytes(w),
                compile_target=lambda: norm(x))


def bench_bfl(s, dtype, device, backend, rnd):
    from ... import ops

    B, S, H, D = s.batch, s.seq, s.heads, s.head_dim
    x = rnd(B, H, S, D)
    scale = rnd(D, dt=dtype, scale=0.2) + 1
    return dict(label=f"B{B} S{S} H{H} D{D}",
                impls={"stock": lambda: bfl_rms_norm(x, scale),
                       "patched": lambda: ops.rms_norm(x, scale, 1e-6, out_dtype=dtype, backend=backend)},
                reference=lambda: rms_norm(x, scale, 1e-6), nbytes=2 * tensor_bytes(x) + tensor_bytes(scale),
                compile_target=lambda: bfl_rms_norm(x, scale))


INFO = OpInfo(
    "rms_norm", validate, key, rms_norm,
    arg_names=("x", "weight", "eps", "out_dtype"), grads=("x", "weight"),
    sample_inputs=sample_inputs, nbytes=nbytes, bench={"rms_norm": bench_diffusers, "rms_norm/bfl": bench_bfl},
    extra_samples=EXTRA_SAMPLES,
    doc="RMSNorm over the last dim, float32 accumulation, output dtype out_dtype or x's",
)
