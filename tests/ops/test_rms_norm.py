"""rms_norm on every backend (cpu, cuda via the `device` fixture, npu on the emulator) against the
catalogue's float64 reference, forward and backward (tests/op_checks.py); then the cpu kernel's no-grad
fast path."""

import pytest
import torch
from op_checks import SHAPE_IDS, check_op, on  # noqa: F401  (the backend fixture)

from flux_npu import ops
from flux_npu.backends import cpu as cpu_backend
from flux_npu.ops import reference
from flux_npu.testing import assert_close


@pytest.mark.parametrize("shape", SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm(on, dtype, shape):  # noqa: F811
    check_op("rms_norm", on, dtype, shape)


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
