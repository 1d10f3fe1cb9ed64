"""adaln_residual on every backend (cpu, cuda via the `device` fixture, npu on the emulator) against the
catalogue's float64 reference, forward and backward (tests/op_checks.py): the named shapes, and the
catalogue's extra samples (strided thirds of one projection, D-only modulation, more row blocks than
the Triton kernel's persistent programs) in float16 too. Then the cuda kernel's own broadcast rules
and its counted fallback through the public op."""

import zlib

import pytest
import torch
from op_checks import SHAPE_IDS, check_op, on  # noqa: F401  (the backend fixture)

from flux_npu import ops
from flux_npu.ops import catalogue, reference
from flux_npu.testing import assert_close


@pytest.mark.parametrize("shape", SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adaln_residual(on, dtype, shape):  # noqa: F811
    check_op("adaln_residual", on, dtype, shape)


@pytest.mark.parametrize("shape", list(catalogue.info("adaln_residual").extra_samples))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_adaln_residual_extra(on, dtype, shape):  # noqa: F811
    check_op("adaln_residual", on, dtype, shape, grad_scale=1.0)  # the old per-backend tests' tolerance
    if on[0].name == "cuda":  # the fused Triton kernel takes every one of these (no fallback)
        assert ("adaln_residual", "cuda", "triton.adaln_residual") in ops.dispatch_stats()["served"]


@pytest.fixture
def cuda_kernel():
    pytest.importorskip("triton")
    from flux_npu.kernels.cuda import adaln_residual

    return adaln_residual


def test_cuda_kernel_rejects_other_broadcasts(cuda_kernel, device):
    x = torch.randn(2, 5, 16).to(device)
    m = torch.randn(2, 1, 16).to(device)
    with pytest.raises(ValueError, match="same leading dims"):
        cuda_kernel.adaln_residual(x, torch.randn(1, 5, 16).to(device), x, m, m)
    with pytest.raises(ValueError, match="must have x's shape"):
        cuda_kernel.adaln_residual(x, m, x[:, :1], m, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_public_op_falls_back_with_the_kernels_reason(cuda_kernel, dtype, device):
    """ops.adaln_residual on the cuda backend (its code path on CPU tensors without a GPU): the
    Triton kernel serves (counted, no fallback), and a broadcast it does not take is served by the
    reference with the kernel's reason, both against the float64 references."""
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


def _leaf(t, dtype):
    return t.to(dtype).detach().requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mod_shape", [(2, 1, 48), (48,)], ids=["B1D", "D"])
def test_adaln_residual_composes_the_cpu_kernels(dtype, mod_shape, seed):
    """h and n against the float64 references composed, forward and every gradient; the cpu
    backend serves it with its own gated_residual and layer_norm_modulate kernels (counted)."""
    x, y = torch.randn(2, 7, 48) * 2, torch.randn(2, 7, 48)
    gate, shift, scale = torch.randn(mod_shape), torch.randn(mod_shape) * 0.5, torch.randn(mod_shape) * 0.5
    low = [_leaf(t, dtype) for t in (x, gate, y, shift, scale)]
    high = [_leaf(t, torch.float64) for t in (x, gate, y, shift, scale)]
    ops.reset_dispatch_stats()
    h, n = ops.adaln_residual(*low, 1e-6)
    served = ops.dispatch_stats()["served"]
    rh, rn = reference.adaln_residual(*high, 1e-6)
    assert h.dtype == n.dtype == dtype
    assert_close(h, rh, dtype, what="h")
    assert_close(n, rn, dtype, 2.0, what="n")
    gh, gn = torch.randn_like(rh), torch.randn_like(rn)  # both outputs carry gradient, as in a block
    ((h * gh.to(dtype)).sum() + (n * gn.to(dtype)).sum()).backward()
    ((rh * gh).sum() + (rn * gn).sum()).backward()
    for name, a, b in zip(("x", "gate", "y", "shift", "scale"), low, high, strict=False):
        assert_close(a.grad, b.grad, dtype, 2.0, f"grad {name}")
    assert served[("adaln_residual", "cpu", "composed(gated_residual, layer_norm_modulate)")] == 1
    assert served[("gated_residual", "cpu", "torch.addcmul")] == 1
    assert served[("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul")] == 1


def test_adaln_residual_reference_is_the_unfused_flux_code(seed):
    """The reference against diffusers' two statements, float64 (h is what the norm reads)."""
    norm = torch.nn.LayerNorm(40, elementwise_affine=False, eps=1e-6, dtype=torch.float64)
    x, a = torch.randn(2, 6, 40, dtype=torch.float64), torch.randn(2, 6, 40, dtype=torch.float64)
    gate, shift, scale = (torch.randn(2, 40, dtype=torch.float64) for _ in range(3))
    h = x + gate[:, None] * a
    n = norm(h) * (1 + scale[:, None]) + shift[:, None]
    rh, rn = reference.adaln_residual(x, gate[:, None], a, shift[:, None], scale[:, None], 1e-6)
    assert_close(rh, h, torch.float64, what="h")
    assert_close(rn, n, torch.float64, what="n")
