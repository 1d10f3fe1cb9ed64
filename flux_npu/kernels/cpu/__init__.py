"""CPU kernels: the fastest correct plain-torch forms (native SDPA, fused rms_norm / layer_norm,
complex-multiply RoPE). Importing this package registers them."""

from . import adaln_residual, attention, gated_residual, layer_norm, qk_norm_rope, rms_norm, rope  # noqa: F401  (registration side effects)
