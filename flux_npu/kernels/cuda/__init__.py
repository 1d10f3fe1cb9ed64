"""CUDA kernels, one file per op: Triton kernels with their launchers, custom ops, autograd, check
and registration (rms_norm, apply_rope, qk_norm_rope, layer_norm_modulate, adaln_residual), SDPA
attention, and the addcmul gated residual. Importing this package registers them for backend
"cuda"; where triton does not import, the kernels stay registered and their checks decline with
the reason."""

from . import (  # noqa: F401
    adaln_residual,
    apply_rope,
    attention,
    gated_residual,
    layer_norm_modulate,
    qk_norm_rope,
    rms_norm,
)
