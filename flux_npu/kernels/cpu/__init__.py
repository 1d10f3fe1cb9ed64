"""CPU kernels: the fastest correct plain-torch forms (native SDPA, fused rms_norm / layer_norm,
complex-multiply RoPE). Importing this package registers them."""

from . import (  # noqa: F401  (registration side effects)
    adaln_residual,
    apply_rope,
    attention,
    gated_residual,
    layer_norm_modulate,
    qk_norm_rope,
    rms_norm,
)
