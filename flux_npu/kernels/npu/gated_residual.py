"""NPU gated residual: x + gate * y as one torch.addcmul (one aclnn elementwise kernel with
broadcasting: one read of x, gate and y, one write), instead of the reference's float32 chain."""

from __future__ import annotations

from ...backends.npu import soc_declines
from ...ops.registry import register_kernel
from .._common import addcmul_gated_residual
from ._support import NPU_TORCH

CAPS = NPU_TORCH


def _check(backend, x, gate, y):
    return CAPS.reason(backend, x, gate, y) or soc_declines(x.dtype)


register_kernel("gated_residual", "npu", "torch.addcmul", check=_check, caps=CAPS)(addcmul_gated_residual)
