"""NPU AdaLN modulation: one fused LayerNorm (torch_npu's aclnn LayerNorm behind
F.layer_norm, with its own backward) and one addcmul for (1 + scale) * y + shift.

Flux's numerics are kept: for half inputs the normalisation and the modulation run in float32 and
round once to x's dtype, as the reference does (stock diffusers rounds twice). torch_npu's
`npu_layer_norm_eval` is not used: it is inference-only (no backward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backends.npu import soc_declines
from ...ops.registry import register_kernel
from ._support import TORCH_NPU

# torch_npu must import (it provides the aclnn LayerNorm behind F.layer_norm), no vendor op named
CAPS = TORCH_NPU


def _check(backend, x, shift, scale, eps):
    return CAPS.reason(backend, x, shift, scale) or soc_declines(x.dtype)


@register_kernel("layer_norm_modulate", "npu", "torch.layer_norm(aclnn)+addcmul", check=_check, caps=CAPS)
def layer_norm_modulate(backend, x, shift, scale, eps):
    """F.layer_norm (fused on NPU) + torch.addcmul, float32 inside, one rounding to x.dtype."""
    xf = x if x.dtype == torch.float32 else x.float()
    y = F.layer_norm(xf, (x.shape[-1],), eps=eps)
    out = torch.addcmul(shift.float(), y, scale.float() + 1)
    return out if out.dtype == x.dtype else out.to(x.dtype)
