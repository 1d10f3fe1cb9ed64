"""gated_residual: x + gate * y, Flux's gated residual."""

from __future__ import annotations

from ..precision import compute_dtype as accumulation_dtype
from ._info import OpInfo, broadcast, check_float, maker, same_device, tensor_bytes


def gated_residual(x, gate, y):
    """x + gate * y in float32; output dtype = x.dtype (Flux's `x + gate * attn_out`)."""
    cd = accumulation_dtype(x.dtype)
    return (x.to(cd) + gate.to(cd) * y.to(cd)).to(x.dtype)


def validate(x, gate, y, op="gated_residual"):
    for n, t in (("x", x), ("gate", gate), ("y", y)):
        check_float(op, n, t)
    if y.shape != x.shape:
        raise ValueError(f"{op}: y {tuple(y.shape)} must have x's shape {tuple(x.shape)}")
    if broadcast(gate.shape, x.shape) != tuple(x.shape):
        raise ValueError(
            f"{op}: gate {tuple(gate.shape)} must broadcast to x {tuple(x.shape)} without enlarging it "
            f"(e.g. (B, 1, D) for a (B, S, D) x)"
        )
    same_device(op, x=x, gate=gate, y=y)


def key(pk, x, g, y):
    return ("gated_residual", pk, x.dtype, x.shape, x.device, g.dtype, g.shape, g.device, y.dtype, y.shape, y.device)


def sample_inputs(s, dtype, device="meta", gen=None):
    """diffusers' `hidden_states + gate_msa.unsqueeze(1) * attn_output`."""
    t = maker(dtype, device, gen)
    return (t(s.batch, s.hidden_seq, s.hidden), t(s.batch, 1, s.hidden, scale=0.1), t(s.batch, s.hidden_seq, s.hidden))


def _rows(dtype, device="meta", gen=None):
    t = maker(dtype, device, gen)
    return (t(2, 7, 48), t(2, 1, 48), t(2, 7, 48))


def nbytes(x, gate, y):
    return 3 * tensor_bytes(x) + tensor_bytes(gate)


def bench(s, dtype, device, backend, rnd):
    from ... import ops

    B, S, hidden = s.batch, s.seq, s.hidden
    x, y = rnd(B, S, hidden), rnd(B, S, hidden)
    gate = rnd(B, hidden, scale=0.1)

    def stock_fn():  # diffusers: hidden_states + gate_msa.unsqueeze(1) * attn_output
        return x + gate.unsqueeze(1) * y

    return dict(label=f"B{B} S{S} D{hidden}",
                impls={"stock": stock_fn,
                       "patched": lambda: ops.gated_residual(x, gate.unsqueeze(1), y, backend=backend)},
                reference=lambda: gated_residual(x, gate.unsqueeze(1), y),
                nbytes=3 * tensor_bytes(x) + tensor_bytes(gate), compile_target=stock_fn)


INFO = OpInfo(
    "gated_residual", validate, key, gated_residual,
    arg_names=("x", "gate", "y"), grads=("x", "gate", "y"),
    sample_inputs=sample_inputs, nbytes=nbytes, bench={"gated_residual": bench},
    extra_samples={"rows-48": _rows},
    doc="x + gate * y, output dtype x's",
)
