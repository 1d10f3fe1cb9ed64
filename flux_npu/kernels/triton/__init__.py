"""Triton kernels of the CUDA backend, one file per op (kernels, launchers, autograd.Function).

Importing this package imports triton: only `flux_npu.kernels.cuda` (loaded lazily on the first
dispatch to the cuda backend) and the tests do. Every function runs on CUDA tensors, and on CPU
tensors under TRITON_INTERPRET=1 (how CI tests them without a GPU).
"""

from .layer_norm_modulate import layer_norm_modulate
from .qk_norm_rope import qk_norm_rope
from .rms_norm import rms_norm
from .rope import apply_rope, norm_rope

__all__ = ["apply_rope", "layer_norm_modulate", "norm_rope", "qk_norm_rope", "rms_norm"]
