"""CUDA kernels, one file per op: Triton kernels with their launchers, custom ops, autograd, check
and registration (rms_norm, rope, qk_norm_rope, layer_norm_modulate), SDPA attention, and the
addcmul gated residual. Importing this package registers them for backend "cuda"; where triton
does not import, the kernels stay registered and their checks decline with the reason.
`adaln_residual` (fused gated residual + AdaLN) is not imported here: no op of the table uses it
yet."""

from . import attention, gated_residual, layer_norm_modulate, qk_norm_rope, rms_norm, rope  # noqa: F401
