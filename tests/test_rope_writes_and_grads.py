"""RoPE operands follow every write a user can make to the frequencies (no cache keyed on the
tensor), and the gradient with respect to the frequencies (learnable RoPE) equals the float64
reference's on the cpu and npu kernels, both frequency forms (issue 18 item 7)."""

import numpy as np
import pytest
import torch

from flux_npu import ops
from flux_npu.ops import reference


def _freqs(form, seed, scale=1.0):
    pos = torch.arange(6, dtype=torch.float64) * scale + seed
    f = reference.rope_freqs(pos, 8, form=form)
    return tuple(t.float().contiguous() for t in f) if form == "cos_sin" else f.float()[None, None].contiguous()


def _x(seed):
    return torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())  # NaN compares False


WRITES = {
    "data_copy": lambda t, new: t.data.copy_(new),
    "numpy": lambda t, new: np.copyto(t.numpy(), new.numpy()),
    "dlpack": lambda t, new: torch.from_dlpack(t).copy_(new),
}


@pytest.mark.parametrize("form", ["cos_sin", "bfl"])
@pytest.mark.parametrize("how", sorted(WRITES))
def test_cpu_rope_sees_writes_that_bump_no_version(form, how):
    x = _x(0)
    freqs = _freqs(form, 0)
    first = ops.apply_rope(x, freqs, backend="cpu")
    assert _rel(first, reference.apply_rope(x.double(), _dbl(freqs))) < 1e-6
    new = _freqs(form, 5, scale=3.0)
    for t, n in zip(_tup(freqs), _tup(new), strict=True):
        WRITES[how](t, n)
    got = ops.apply_rope(x, freqs, backend="cpu")
    assert _rel(got, reference.apply_rope(x.double(), _dbl(new))) < 1e-6


def _tup(f):
    return f if isinstance(f, tuple) else (f,)


def _dbl(f):
    return tuple(t.double() for t in f) if isinstance(f, tuple) else f.double()


def _freq_grads(backend, form, seed=0):
    x = _x(seed).requires_grad_()
    leaves = tuple(t.clone().requires_grad_() for t in _tup(_freqs(form, seed)))
    freqs = leaves if form == "cos_sin" else leaves[0]
    out = ops.apply_rope(x, freqs, backend=backend)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 9))
    grads = torch.autograd.grad(out, (x, *leaves), cot)
    xr = x.detach().double().requires_grad_()
    lr = tuple(t.detach().double().requires_grad_() for t in leaves)
    ref = reference.apply_rope(xr, lr if form == "cos_sin" else lr[0])
    want = torch.autograd.grad(ref, (xr, *lr), cot.double())
    return grads, want


@pytest.mark.parametrize("form", ["cos_sin", "bfl"])
def test_cpu_frequency_gradients_equal_the_reference(form):
    got, want = _freq_grads("cpu", form)
    for g, w in zip(got, want, strict=True):
        assert _rel(g, w) < 1e-5


@pytest.mark.parametrize("form", ["cos_sin", "bfl"])
def test_npu_frequency_gradients_equal_the_reference(npu_emulated, form):
    got, want = _freq_grads(npu_emulated, form)
    for g, w in zip(got, want, strict=True):
        assert _rel(g, w) < 1e-5
