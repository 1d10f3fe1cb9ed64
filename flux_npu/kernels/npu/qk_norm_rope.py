"""NPU QK-norm + RoPE: no fused kernel, the backend's rms_norm (npu_rms_norm) and apply_rope
(npu_rotary_mul) kernels composed (shared with the other backends without one)."""

from ...ops.registry import register_kernel
from .._common import check_qk_norm_rope, composed_qk_norm_rope

register_kernel("qk_norm_rope", "npu", "composed(rms_norm, apply_rope)", check=check_qk_norm_rope)(
    composed_qk_norm_rope
)
