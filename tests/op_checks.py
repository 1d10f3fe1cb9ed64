"""One check per op, run on every backend, from the op catalogue (flux_npu/ops/catalogue).

`tests/ops/test_<op>.py` call `check_op(op, on, dtype, shape)`: the catalogue's sample inputs at a
named Flux shape (flux_npu.shapes), or one of the op's `extra_samples` (strided views, odd shapes,
other broadcasts: the inputs the per-backend op tests used to hold), drawn on the CPU from a
generator seeded by the case (and again on the device, so views stay views there), run
through `flux_npu.ops.<op>` on the backend, forward and backward (seeded random cotangents), and
compared with the catalogue's reference run in float64 on the CPU, relative-norm error per tensor
against the dtype's tolerance (NaN never passes). Backends (`on` fixture): cpu; cuda on the
`device` fixture (a GPU when present, else its code path on CPU tensors under Triton's
interpreter, its buffers NaN-poisoned); npu on the torch_npu contract emulator (or a real device
when present). Gradients must come back in their input's dtype. The check
also proves routing: where the backend registers a kernel for the op, that kernel served the call
(the dispatch counts), else the reference did.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from flux_npu import ops
from flux_npu.ops import catalogue
from flux_npu.shapes import SHAPES, FluxShape
from flux_npu.testing import assert_close

BACKENDS = ("cpu", "cuda", "npu")
# odd sizes next to the named Flux shapes: batch 2, 3 heads of 40, 13 tokens, hidden 48 (no power of two)
ODD = FluxShape("odd", heads=3, head_dim=40, img=9, txt=4, hidden=48, axes=(8, 16, 16), blocks=False, batch=2)
SHAPE_IDS = ["tiny", "width", "odd"]


@pytest.fixture(params=BACKENDS)
def on(request, device, monkeypatch):
    """(backend, tensor device) of the case; the cuda backend's Triton buffers NaN-poisoned."""
    if request.param == "cpu":
        from flux_npu.backends import cpu

        yield cpu.BACKEND, torch.device("cpu")
    elif request.param == "cuda":
        from flux_npu.backends import cuda
        from flux_npu.kernels.cuda import _checks

        if _checks.triton_import_error():
            pytest.skip("triton not installed")
        from flux_npu.kernels.cuda import _triton

        monkeypatch.setattr(_triton, "POISON", True)  # a kernel that skips a write cannot pass
        yield (cuda.BACKEND if device.type == "cuda" else cuda.BACKEND.with_device_type("cpu")), device
    else:
        from conftest import NPU

        if NPU:
            from flux_npu.backends import get_backend

            yield get_backend("npu"), torch.device("npu")
            return
        from npu_emulator.install import emulated_npu_backend

        with emulated_npu_backend() as backend:
            yield backend, torch.device("cpu")


def _leaves(info, args):
    names = dict(zip(info.arg_names, range(len(args)), strict=True))
    return [names[n] for n in info.grads if isinstance(args[names[n]], torch.Tensor)]


def _to(args, device, dtype=None, grad_at=()):
    out = []
    for i, a in enumerate(args):
        if isinstance(a, tuple):
            a = tuple(t.to(device=device, dtype=dtype or t.dtype) for t in a)
        elif isinstance(a, torch.Tensor):
            a = a.detach().to(device=device, dtype=dtype if dtype is not None and a.is_floating_point() else a.dtype)
            if i in grad_at:
                a.requires_grad_(True)
        out.append(a)
    return out


def _outs(o):
    return list(o) if isinstance(o, (tuple, list)) else [o]


def _samples(info, shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    if shape in info.extra_samples:
        return info.extra_samples[shape](dtype, device, gen), gen
    return info.sample_inputs(ODD if shape == "odd" else SHAPES[shape], dtype, device, gen), gen


def check_op(op: str, on, dtype: torch.dtype, shape: str = "tiny", grad_scale: float = 2.0):
    """shape: a name of flux_npu.shapes, "odd" (ODD) or one of the op's extra samples."""
    # forward and backward of `ops.<op>` on the backend against the float64 reference
    backend, dev = on
    info = catalogue.info(op)
    seed = zlib.crc32(f"{op}.{shape}.{dtype}".encode())
    args, gen = _samples(info, shape, dtype, "cpu", seed)
    leaves = _leaves(info, args)
    # drawn again on the device (same values) so strided views stay views there
    ours = _to(args if dev.type == "cpu" else _samples(info, shape, dtype, dev, seed)[0], dev, grad_at=leaves)
    ref = _to(args, "cpu", torch.float64, grad_at=leaves)
    if op == "rope_freqs":  # float32 positions, float32 tables: the reference keeps float64 maths
        ref = _to(args, "cpu")
    ops.reset_dispatch_stats()
    got = _outs(getattr(ops, op)(*ours, backend=backend))
    want = _outs(info.ref(backend, *ref) if info.bound else info.ref(*ref))
    for i, (o, r) in enumerate(zip(got, want, strict=True)):
        assert o.dtype == (torch.float32 if op == "rope_freqs" else dtype), (op, i, o.dtype)
        assert_close(o, r, dtype, what=f"{op} {backend.name} output {i}")
    # routing: the backend's registered kernel served it where it has one that takes the input
    served = {k: v for k, v in ops.dispatch_stats()["served"].items() if k[0] == op}
    name, _reasons = ops.explain(op, backend, *ours)
    assert served == {(op, backend.name, name or "reference"): 1}, served
    if not leaves:
        return
    cot = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in want]
    torch.autograd.backward([o.float() for o in got], [c.to(device=dev, dtype=torch.float32) for c in cot])
    torch.autograd.backward(want, cot)
    for i in leaves:
        assert ours[i].grad is not None and ours[i].grad.dtype == ours[i].dtype, (op, info.arg_names[i])
        assert_close(ours[i].grad, ref[i].grad, dtype, grad_scale, what=f"{op} {backend.name} d{info.arg_names[i]}")
