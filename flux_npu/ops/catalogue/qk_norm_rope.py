"""qk_norm_rope: RMSNorm of q and k (own weights), then RoPE on both."""

from __future__ import annotations

import torch

from . import apply_rope as _rope
from . import rms_norm as _rms
from ._info import OpInfo, check_float, maker, same_device, sig, tensor_bytes
from .apply_rope import Freqs, apply_rope, freqs_key
from .rms_norm import rms_norm


def qk_norm_rope(q, k, q_weight, k_weight, freqs: Freqs, eps=1e-6, sequence_dim: int = 2):
    """RMSNorm of q and k (each with its own weight) followed by RoPE: the composition of the two
    references, rounded to the input dtype between them as unfused Flux code does."""
    qn = rms_norm(q, q_weight, eps)
    kn = rms_norm(k, k_weight, eps)
    return apply_rope(qn, freqs, sequence_dim), apply_rope(kn, freqs, sequence_dim)


def validate(q, k, q_weight, k_weight, freqs, eps, sequence_dim):
    for n, t in (("q", q), ("k", k)):
        check_float("qk_norm_rope", n, t)
    if q.shape != k.shape:
        raise ValueError(f"qk_norm_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must have one shape")
    # the same checks rms_norm and apply_rope make: wrong-shaped weights or freqs must not
    # broadcast into garbage inside a fused kernel
    _rms.validate(q, q_weight, eps, None, "qk_norm_rope", "q_weight")
    _rms.validate(k, k_weight, eps, None, "qk_norm_rope", "k_weight")
    same_device("qk_norm_rope", q=q, k=k)
    return _rope.validate(q, freqs, sequence_dim, "qk_norm_rope")


def key(pk, q, k, qw, kw, freqs, eps, sd):
    return ("qk_norm_rope", pk, q.dtype, q.shape, q.device, k.dtype, k.shape, k.device, sig(qw), sig(kw),
            freqs_key(freqs), eps, sd)


def sample_inputs(s, dtype, device="meta", gen=None):
    """diffusers' processor: q, k (B, S, H, D), norm_q / norm_k weights, (cos, sin), sequence_dim 1."""
    t = maker(dtype, device, gen)
    q, k = t(s.batch, s.seq, s.heads, s.head_dim), t(s.batch, s.seq, s.heads, s.head_dim)
    return (q, k, t(s.head_dim, scale=0.2), t(s.head_dim, scale=0.2), _rope.sample_cos_sin(s, device, gen), 1e-6, 1)


def _rope_case(name, weight):
    """apply_rope's Triton case `name` for q; k three times larger; q and k weights, or none."""
    make_q = _rope.rope_case(*_rope.ROPE_CASES[name])

    def make(dtype, device="meta", gen=None):
        q, freqs, sequence_dim = make_q(dtype, device, gen)
        t = maker(dtype, device, gen)
        k, D = t(*q.shape, scale=3.0), q.shape[-1]
        qw, kw = (t(D), t(D, scale=0.5)) if weight else (None, None)
        return (q, k, qw, kw, freqs, 1e-6, sequence_dim)

    return make


# apply_rope's Triton cases (q a strided third of a fused projection in BSHD, D 128, BFL matrices per
# sample and broadcast), with and without weights
EXTRA_SAMPLES = {f"{n}{'' if w else '-no-weight'}": _rope_case(n, w)
                 for n in ("bshd-view", "bhsd-d128", "bfl-d56", "bfl-broadcast", "bfl-d128") for w in (True, False)}


def nbytes(q, k, q_weight, k_weight, freqs, eps=1e-6, sequence_dim=2):
    return 4 * tensor_bytes(q) + tensor_bytes(q_weight, k_weight, freqs)


def bench(s, dtype, device, backend, rnd):
    from ... import ops

    B, S, H, D = s.batch, s.seq, s.heads, s.head_dim
    q = rnd(B, S, H * D).unflatten(-1, (H, D))
    k = rnd(B, S, H * D).unflatten(-1, (H, D))
    nq = torch.nn.RMSNorm(D, eps=1e-6).to(device=device, dtype=dtype)
    nk = torch.nn.RMSNorm(D, eps=1e-6).to(device=device, dtype=dtype)
    cs = _rope.bench_cos_sin(S, D, device)
    stock = _rope.diffusers_apply_rotary_emb()

    def stock_fn():
        return stock(nq(q), cs, sequence_dim=1), stock(nk(k), cs, sequence_dim=1)

    wq, wk = nq.weight.detach(), nk.weight.detach()
    return dict(label=f"B{B} S{S} H{H} D{D}",
                impls={"stock": stock_fn,
                       "patched": lambda: ops.qk_norm_rope(q, k, wq, wk, cs, 1e-6, 1, backend=backend)},
                reference=lambda: qk_norm_rope(q, k, wq, wk, cs, 1e-6, 1),
                nbytes=4 * tensor_bytes(q) + tensor_bytes(cs), compile_target=stock_fn,
                note="RMSNorm q, k + diffusers RoPE")


INFO = OpInfo(
    "qk_norm_rope", validate, key, qk_norm_rope,
    arg_names=("q", "k", "q_weight", "k_weight", "freqs", "eps", "sequence_dim"),
    grads=("q", "k", "q_weight", "k_weight"),
    sample_inputs=sample_inputs, nbytes=nbytes, switchable=False, bench={"qk_norm_rope": bench},
    extra_samples=EXTRA_SAMPLES,
    doc="RMSNorm(q), RMSNorm(k) then RoPE on both (routed where rms_norm and apply_rope both are)",
)
