"""CPU AdaLN modulation: fused layer_norm, then one addcmul for (1 + scale) * y + shift."""

import torch
import torch.nn.functional as F

from ...ops.registry import register_kernel
from .._common import foreign_device


def _check(backend, x, shift, scale, eps):
    return foreign_device(backend, x, shift, scale)


@register_kernel("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul", check=_check)
def layer_norm_modulate(backend, x, shift, scale, eps):
    """F.layer_norm + torch.addcmul (one pass for the modulation instead of three)."""
    y = F.layer_norm(x, (x.shape[-1],), eps=eps)
    out = torch.addcmul(shift, y, scale + 1)
    return out if out.dtype == x.dtype else out.to(x.dtype)
