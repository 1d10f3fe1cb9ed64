"""CPU gated residual: x + gate * y as one torch.addcmul (shared with the other backends)."""

from ...ops.registry import register_kernel
from .._common import addcmul_gated_residual, check_gated_residual

register_kernel("gated_residual", "cpu", "torch.addcmul", check=check_gated_residual)(addcmul_gated_residual)
