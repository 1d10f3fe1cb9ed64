"""rms_norm on every backend (cpu, cuda via the `device` fixture, npu on the emulator) against the
catalogue's float64 reference, forward and backward (tests/op_checks.py); then the cpu kernel's no-grad
fast path."""

import pytest
import torch
from op_checks import SHAPE_IDS, check_op, on  # noqa: F401  (the backend fixture)

from flux_npu import ops
from flux_npu.backends import cpu as cpu_backend
from flux_npu.ops import catalogue, reference
from flux_npu.testing import assert_close


@pytest.mark.parametrize("shape", SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm(on, dtype, shape):  # noqa: F811
    check_op("rms_norm", on, dtype, shape)


@pytest.mark.parametrize("shape", list(catalogue.info("rms_norm").extra_samples))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rms_norm_extra(on, dtype, shape):  # noqa: F811
    check_op("rms_norm", on, dtype, shape, grad_scale=1.0)  # the old per-backend tests' tolerance
    if on[0].name == "cuda":  # the Triton kernel takes every one of these (no fallback)
        assert ("rms_norm", "cuda", "triton.rms_norm") in ops.dispatch_stats()["served"], ops.dispatch_stats()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("weight", ["same", "float32", None])
def test_cpu_rms_norm_inference_path(dtype, weight):
    """The CPU rms_norm's no-grad fast path (vector_norm + scaling) against the float64 reference,
    including a float32 weight on a half input (BFL RMSNorm's promote(x, scale) output)."""
    torch.manual_seed(21)
    x = torch.randn(3, 7, 2, 48, dtype=dtype) * 4
    w = None if weight is None else torch.randn(48, dtype=dtype if weight == "same" else torch.float32)
    out_dtype = None if w is None else torch.promote_types(dtype, w.dtype)
    with torch.no_grad():
        y = ops.rms_norm(x, w, 1e-6, out_dtype, backend=cpu_backend.BACKEND)
    ref = reference.rms_norm(x.double(), None if w is None else w.double(), 1e-6)
    assert y.dtype == (out_dtype or dtype)
    assert_close(y, ref, dtype, what="cpu rms_norm (no grad)")
    assert ops.dispatch_stats()["served"][("rms_norm", "cpu", "torch.rms_norm")] == 1


def test_rms_norm_mixed_dtypes_and_out_dtype(seed):
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    w = torch.rand(64) + 0.5  # float32 weight on a bf16 input, as a bf16-autocast model holds it
    out = ops.rms_norm(x, w, 1e-6, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_close(out, reference.rms_norm(x.double(), w.double(), 1e-6), torch.float32, scale=1e2)  # input is bf16
    assert_close(ops.rms_norm(x, w), torch.nn.functional.rms_norm(x.float(), (64,), w, 1e-6), torch.bfloat16)


def test_rms_norm_reference_matches_torch_rmsnorm(seed):
    m = torch.nn.RMSNorm(48, eps=1e-6, dtype=torch.float64)
    torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    x = torch.randn(4, 48, dtype=torch.float64)
    assert_close(reference.rms_norm(x, m.weight, 1e-6), m(x), torch.float64)
