"""NPU gated residual + AdaLN: no fused kernel, the backend's gated_residual and
layer_norm_modulate kernels composed (shared with the other backends without one)."""

from ...ops.registry import register_kernel
from .._common import check_adaln_residual, composed_adaln_residual

register_kernel(
    "adaln_residual", "npu", "composed(gated_residual, layer_norm_modulate)", check=check_adaln_residual,
)(composed_adaln_residual)
