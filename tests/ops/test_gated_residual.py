"""gated_residual on every backend (cpu, cuda via the `device` fixture, npu on the emulator) against the
catalogue's float64 reference, forward and backward (tests/op_checks.py)."""

import pytest
import torch
from op_checks import SHAPE_IDS, check_op, on  # noqa: F401  (the backend fixture)

from flux_npu.ops import catalogue


@pytest.mark.parametrize("shape", SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gated_residual(on, dtype, shape):  # noqa: F811
    check_op("gated_residual", on, dtype, shape)


@pytest.mark.parametrize("shape", list(catalogue.info("gated_residual").extra_samples))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gated_residual_extra(on, dtype, shape):  # noqa: F811
    check_op("gated_residual", on, dtype, shape)
