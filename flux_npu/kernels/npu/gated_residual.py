"""NPU gated residual: x + gate * y as one torch.addcmul (one aclnn elementwise kernel with
broadcasting: one read of x, gate and y, one write), instead of the reference's float32 chain."""

from __future__ import annotations

from ...backends.npu import soc_declines
from ...ops.registry import register_kernel
from .._common import addcmul_gated_residual, foreign_device
from ._support import dtype_declines


def _check(backend, x, gate, y):
    return foreign_device(backend, x, gate, y) or dtype_declines(x, gate, y) or soc_declines(x.dtype)


register_kernel("gated_residual", "npu", "torch.addcmul", check=_check)(addcmul_gated_residual)
