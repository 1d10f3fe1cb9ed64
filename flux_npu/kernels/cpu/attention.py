"""CPU attention: torch's native scaled_dot_product_attention (flash / math kernels on CPU)."""

import torch.nn.functional as F

from ...ops.registry import register_kernel
from .._common import foreign_device


def _check(backend, q, k, v, mask, scale, layout):
    return foreign_device(backend, q, k, v, mask)


@register_kernel("attention", "cpu", "torch.sdpa", check=_check)
def sdpa_attention(backend, q, k, v, mask, scale, layout):
    """torch.nn.functional.scaled_dot_product_attention."""
    if layout == "BSHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2) if layout == "BSHD" else out
