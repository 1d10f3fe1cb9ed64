"""CPU RoPE: one complex multiply instead of reshape/unbind/stack/flatten copies.

Adjacent pairs (x[2i], x[2i+1]) are the real and imaginary parts of a complex number z, and the
rotation by angle a is a multiply by cos a + i sin a. The complex operand is built on every call
from whichever frequency form Flux code hands over: it costs one pass over the (S, D) frequencies
next to the (B, H, S, D) rotation, and no cache keyed on the tensor can see every write a user can
make to it (`.data.copy_`, writes through `.numpy()` or a DLPack alias bump no version counter).

Frequencies that require grad (learnable RoPE) take the reference: the complex form reads only
the even columns of (cos, sin) and drops the conj term when it is zero, both of which carry
gradient.

BFL matrices are applied as given even when they are not rotations: any real 2x2 matrix M acts
on z as alpha * z + beta * conj(z), with alpha = ((m00 + m11) + i (m10 - m01)) / 2 and
beta = ((m00 - m11) + i (m10 + m01)) / 2. For rotation matrices beta is exactly zero (found once
per operand build) and the conj term is skipped.
"""

import torch

from ...ops import reference
from ...ops.registry import register_kernel
from .._common import foreign_device


def _complex_freqs(freqs, sequence_dim, ndim):
    """(alpha, beta or None) with out = alpha * z + beta * conj(z)."""
    if isinstance(freqs, torch.Tensor):  # BFL (..., S, D/2, 2, 2)
        m = freqs.float()
        m00, m01, m10, m11 = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
        alpha = torch.complex((m00 + m11) * 0.5, (m10 - m01) * 0.5)
        beta_re, beta_im = (m00 - m11) * 0.5, (m10 + m01) * 0.5
        if not (bool((beta_re == 0).all()) and bool((beta_im == 0).all())):  # CPU tensors: no device sync
            return alpha, torch.complex(beta_re, beta_im)
        return alpha, None
    cos, sin = freqs
    fc = torch.complex(cos[:, 0::2].float(), sin[:, 0::2].float())  # (S, D/2)
    shape = [1] * ndim
    shape[sequence_dim] = fc.shape[0]
    shape[-1] = fc.shape[1]
    return fc.reshape(shape), None


def _check(backend, x, freqs, sequence_dim):
    tensors = (freqs,) if isinstance(freqs, torch.Tensor) else tuple(freqs)
    return foreign_device(backend, x, *tensors)


@register_kernel("apply_rope", "cpu", "torch.complex_mul", check=_check)
def apply_rope(backend, x, freqs, sequence_dim):
    """x viewed as complex pairs times cos + i sin (float32), rounded once to x.dtype."""
    keys = (freqs,) if isinstance(freqs, torch.Tensor) else tuple(freqs)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in keys)):
        # inductor fuses the real-arithmetic form into one loop; complex views and stride checks
        # would only break the graph. Learnable frequencies: the reference's gradient (module doc).
        return reference.apply_rope(x, freqs, sequence_dim)
    alpha, beta = _complex_freqs(freqs, sequence_dim, x.dim())
    xf = x.float()
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):
        xf = xf.contiguous()  # view_as_complex needs pair-aligned strides
    xc = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))
    yc = xc * alpha if beta is None else xc * alpha + xc.conj() * beta
    out = torch.view_as_real(yc).flatten(-2)
    return out.to(x.dtype)
