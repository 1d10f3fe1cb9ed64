"""The fused gated residual + AdaLN Triton kernel (`kernels/cuda/adaln_residual.py`, the cuda
kernel of ops.adaln_residual) against the float64 composition of the two references, forward and
backward, on the `device` fixture (CUDA when present, else the interpreter), with NaN-poisoned
buffers, directly and through the public op. Its custom ops are opchecked with the others
(test_triton_kernels.py's op-case table)."""

import zlib

import pytest
import torch

from flux_npu.ops import reference
from flux_npu.testing import assert_close

pytest.importorskip("triton")

from flux_npu.kernels.cuda import _triton  # noqa: E402
from flux_npu.kernels.cuda import adaln_residual as AR  # noqa: E402

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [
    # name, x shape, gate/shift/scale shape, modulation as chunks of one projection (AdaLayerNormZero)
    ("B1D-chunks", (2, 37, 200), (2, 1, 200), True),
    ("flux-hidden", (1, 5, 3072), (1, 1, 3072), True),
    ("D-only", (7, 64), (64,), False),
    ("many-rows", (2, 300, 32), (2, 1, 32), False),  # more row blocks than persistent programs
]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_triton, "POISON", True)


def _leaf(t):
    return t.detach().requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,xs,ms,chunks", CASES, ids=[c[0] for c in CASES])
def test_adaln_residual(case, xs, ms, chunks, dtype, device):
    torch.manual_seed(zlib.crc32(repr((case, dtype)).encode()))
    x = _leaf((torch.randn(xs, dtype=dtype) * 2).to(device))
    proj = torch.randn(*xs[:-1], 3 * xs[-1], dtype=dtype).to(device)  # y: a strided chunk of a projection
    y = _leaf(proj.chunk(3, dim=-1)[1])
    if chunks:
        emb = torch.randn(ms[0], 3 * ms[-1], dtype=dtype).to(device)
        leaves = [_leaf(c) for c in emb.chunk(3, dim=1)]
        gate, shift, scale = (c[:, None] for c in leaves)
    else:
        leaves = [_leaf(torch.randn(ms, dtype=dtype).to(device)) for _ in range(3)]
        gate, shift, scale = leaves
    h, n = AR.adaln_residual(x, gate, y, shift, scale, 1e-6)
    assert h.dtype == n.dtype == dtype and h.shape == n.shape == x.shape
    gh, gn = (torch.randn(xs, dtype=dtype).to(device) for _ in range(2))
    ((h.float() * gh.float()).sum() + (n.float() * gn.float()).sum()).backward()

    r = [t.detach().cpu().double().requires_grad_() for t in (x, gate, y, shift, scale)]
    rh = reference.gated_residual(r[0], r[1], r[2])
    rn = reference.layer_norm_modulate(rh, r[3], r[4], 1e-6)
    ((rh * gh.cpu().double()).sum() + (rn * gn.cpu().double()).sum()).backward()
    assert_close(h, rh, dtype, what="h = x + gate * y")
    assert_close(n, rn, dtype, what="n = AdaLN(h)")
    assert_close(x.grad, r[0].grad, dtype, what="grad x")
    assert_close(y.grad, r[2].grad, dtype, what="grad y")
    for name, leaf, ref in zip(("gate", "shift", "scale"), leaves, r[1:2] + r[3:], strict=False):
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        assert_close(leaf.grad, ref.grad.reshape(leaf.shape), dtype, what=f"grad {name}")


def test_adaln_residual_rejects_other_broadcasts(device):
    x = torch.randn(2, 5, 16).to(device)
    m = torch.randn(2, 1, 16).to(device)
    with pytest.raises(ValueError, match="same leading dims"):
        AR.adaln_residual(x, torch.randn(1, 5, 16).to(device), x, m, m)
    with pytest.raises(ValueError, match="must have x's shape"):
        AR.adaln_residual(x, m, x[:, :1], m, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_op_is_served_by_the_triton_kernel(dtype, device):
    """ops.adaln_residual on the cuda backend (its code path on CPU tensors without a GPU): the
    Triton kernel serves (counted, no fallback), and a broadcast it does not take is served by the
    reference with the kernel's reason, both against the float64 references."""
    from flux_npu import ops
    from flux_npu.backends import cuda as cuda_backend

    backend = cuda_backend.BACKEND if device.type == "cuda" else cuda_backend.BACKEND.with_device_type("cpu")
    torch.manual_seed(zlib.crc32(repr(("public", dtype)).encode()))
    x, y = (torch.randn(2, 9, 64, dtype=dtype).to(device) for _ in range(2))
    for gate_shape, kernel in (((2, 1, 64), "triton.adaln_residual"), ((1, 9, 64), "reference")):
        gate = torch.randn(gate_shape, dtype=dtype).to(device)
        shift, scale = (torch.randn(2, 1, 64, dtype=dtype).to(device) * 0.5 for _ in range(2))
        ops.reset_dispatch_stats()
        h, n = ops.adaln_residual(x, gate, y, shift, scale, 1e-6, backend=backend)
        stats = ops.dispatch_stats()
        assert stats["served"][("adaln_residual", "cuda", kernel)] == 1, stats["served"]
        reasons = [r for (op, _, r) in stats["fallback"] if op == "adaln_residual"]
        if kernel == "reference":
            assert len(reasons) == 1 and "same leading dims" in reasons[0], reasons
        else:
            assert not reasons, reasons
        rh, rn = reference.adaln_residual(*(t.cpu().double() for t in (x, gate, y, shift, scale)), 1e-6)
        assert_close(h, rh, dtype, what=f"h ({kernel})")
        assert_close(n, rn, dtype, what=f"n ({kernel})")
