"""CPU RoPE: one complex multiply instead of reshape/unbind/stack/flatten copies.

Adjacent pairs (x[2i], x[2i+1]) are the real and imaginary parts of a complex number, and the
rotation by angle a is a multiply by cos a + i sin a. The complex operand is built once per
forward from whichever frequency form Flux code hands over (cached by tensor identity).
"""

import torch

from ...ops import reference
from ...ops.registry import register_kernel
from .._common import LastValueCache, foreign_device

_CACHE = LastValueCache()


def _complex_freqs(freqs, sequence_dim, ndim):
    if isinstance(freqs, torch.Tensor):  # BFL (..., S, D/2, 2, 2): cos at [0,0], sin at [1,0]
        return torch.complex(freqs[..., 0, 0].float(), freqs[..., 1, 0].float())
    cos, sin = freqs
    fc = torch.complex(cos[:, 0::2].float(), sin[:, 0::2].float())  # (S, D/2)
    shape = [1] * ndim
    shape[sequence_dim] = fc.shape[0]
    shape[-1] = fc.shape[1]
    return fc.reshape(shape)


def _check(backend, x, freqs, sequence_dim):
    tensors = (freqs,) if isinstance(freqs, torch.Tensor) else tuple(freqs)
    return foreign_device(backend, x, *tensors)


@register_kernel("apply_rope", "cpu", "torch.complex_mul", check=_check)
def apply_rope(backend, x, freqs, sequence_dim):
    """x viewed as complex pairs times cos + i sin (float32), rounded once to x.dtype."""
    if torch.compiler.is_compiling():
        # inductor fuses the real-arithmetic form into one loop; complex views and stride checks
        # would only break the graph
        return reference.apply_rope(x, freqs, sequence_dim)
    keys = (freqs,) if isinstance(freqs, torch.Tensor) else tuple(freqs)
    fc = _CACHE.get(keys, (sequence_dim, x.dim()), lambda: _complex_freqs(freqs, sequence_dim, x.dim()))
    xf = x.float()
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):
        xf = xf.contiguous()  # view_as_complex needs pair-aligned strides
    xc = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))
    out = torch.view_as_real(xc * fc).flatten(-2)
    return out.to(x.dtype)
