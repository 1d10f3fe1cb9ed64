"""adaln_residual: gated residual, then AdaLN of its result (a Flux double block's middle)."""

from __future__ import annotations

import torch

from . import gated_residual as _gr
from . import layer_norm_modulate as _lnm
from ._info import OpInfo, maker, tensor_bytes
from .gated_residual import gated_residual
from .layer_norm_modulate import layer_norm_modulate


def adaln_residual(x, gate, y, shift, scale, eps=1e-6):
    """(h, n): h = x + gate * y rounded to x's dtype, n = layer_norm_modulate(h, shift, scale, eps);
    the composition of the two references, as the unfused Flux code computes it (the norm reads the
    stored h)."""
    h = gated_residual(x, gate, y)
    return h, layer_norm_modulate(h, shift, scale, eps)


def validate(x, gate, y, shift, scale, eps):
    _gr.validate(x, gate, y, "adaln_residual")
    _lnm.validate(x, shift, scale, eps, "adaln_residual")


def key(pk, x, g, y, sh, sc, eps):
    return ("adaln_residual", pk, x.dtype, x.shape, x.device, g.dtype, g.shape, g.device, y.dtype, y.shape, y.device,
            sh.dtype, sh.shape, sh.device, sc.dtype, sc.shape, sc.device, eps)


def sample_inputs(s, dtype, device="meta", gen=None):
    """FluxTransformerBlock: x, y (B, S, hidden); gate, shift, scale (B, 1, hidden)."""
    t = maker(dtype, device, gen)
    B, S, hidden = s.batch, s.hidden_seq, s.hidden
    x, gate, y = t(B, S, hidden), t(B, 1, hidden, scale=0.1), t(B, S, hidden)
    return (x, gate, y, t(B, 1, hidden, scale=0.1), t(B, 1, hidden, scale=0.1), 1e-6)


def _strided(xs, ms, chunks):
    """x (xs); y a strided third of one (..., 3 D) projection; gate, shift, scale (ms), or with
    chunks the three (B, 1, D) thirds of one (B, 3 D) embedding (AdaLayerNormZero's chunk(3))."""

    def make(dtype, device="meta", gen=None):
        t = maker(dtype, device, gen)
        x, y = t(*xs, scale=2.0), t(*xs[:-1], 3 * xs[-1]).chunk(3, dim=-1)[1]
        if chunks:
            gate, shift, scale = (c[:, None] for c in t(ms[0], 3 * ms[-1]).chunk(3, dim=1))
        else:
            gate, shift, scale = t(*ms), t(*ms), t(*ms)
        return (x, gate, y, shift, scale, 1e-6)

    return make


# inputs the named shapes lack: strided operands, D-only modulation, more row blocks than programs
EXTRA_SAMPLES = {
    "chunks": _strided((2, 37, 200), (2, 1, 200), True),
    "hidden-chunks": _strided((1, 5, 3072), (1, 1, 3072), True),
    "d-only": _strided((7, 64), (64,), False),
    "many-rows": _strided((2, 300, 32), (2, 1, 32), False),
}


def nbytes(x, gate, y, shift, scale, eps=1e-6):
    return 4 * tensor_bytes(x) + tensor_bytes(gate, shift, scale)


def bench(s, dtype, device, backend, rnd):
    from ... import ops

    B, S, hidden = s.batch, s.seq, s.hidden
    x, y = rnd(B, S, hidden), rnd(B, S, hidden)
    gate, shift, scale = (rnd(B, 1, hidden, scale=0.1) for _ in range(3))
    norm = torch.nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)

    def stock_fn():  # diffusers FluxTransformerBlock: residual, then norm2 and the MLP modulation
        h = x + gate * y
        return h, norm(h) * (1 + scale) + shift

    return dict(label=f"B{B} S{S} D{hidden}",
                impls={"stock": stock_fn,
                       "patched": lambda: ops.adaln_residual(x, gate, y, shift, scale, 1e-6, backend=backend)},
                reference=lambda: adaln_residual(x, gate, y, shift, scale, 1e-6),
                nbytes=4 * tensor_bytes(x) + 3 * tensor_bytes(gate), compile_target=stock_fn,
                note="gated residual + norm2 modulate of a double block")


INFO = OpInfo(
    "adaln_residual", validate, key, adaln_residual,
    arg_names=("x", "gate", "y", "shift", "scale", "eps"), grads=("x", "gate", "y", "shift", "scale"),
    sample_inputs=sample_inputs, nbytes=nbytes, switchable=False, bench={"adaln_residual": bench},
    extra_samples=EXTRA_SAMPLES,
    doc="x + gate * y, then AdaLN of it: (h, n)",
)
