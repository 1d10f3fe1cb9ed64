"""Gated residual on CUDA: torch.addcmul, already one fused elementwise kernel (a Triton kernel
would not pay here). The fused AdaLN + gated residual kernel lives in `adaln_residual.py`."""

from ...ops.registry import register_kernel
from .._common import addcmul_gated_residual, check_gated_residual

register_kernel("gated_residual", "cuda", "torch.addcmul", check=check_gated_residual)(addcmul_gated_residual)
