"""CUDA kernels, one file per op: Triton kernels with their launchers, custom ops, autograd, check
and registration (rms_norm, apply_rope, qk_norm_rope, layer_norm_modulate, adaln_residual), SDPA
attention, and the addcmul gated residual. Importing this package registers them for backend
"cuda"; where triton does not import, the kernels stay registered and their checks decline with
the reason."""

from .. import import_op_files

import_op_files(__name__)
