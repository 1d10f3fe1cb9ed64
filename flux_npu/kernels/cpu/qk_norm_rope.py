"""CPU QK-norm + RoPE: the CPU RMSNorm kernel then the CPU complex-multiply RoPE kernel.

Without it the op would fall to its reference (a composition of float32 references), which is
slower than the stock `nn.RMSNorm` + `apply_rotary_emb` it stands for; composed from the two
tuned kernels it is not. Same rounding as the reference: normalised q/k are rounded to their
dtype before the rotation, as unfused Flux code does."""

import torch

from ...ops.registry import register_kernel
from .._common import foreign_device
from .apply_rope import _check as _rope_check
from .apply_rope import apply_rope
from .rms_norm import rms_norm


def _check(backend, q, k, q_weight, k_weight, freqs, eps, sequence_dim):
    if not isinstance(freqs, (torch.Tensor, tuple, list)):
        return "freqs of an unknown form"
    return foreign_device(backend, q, k, q_weight, k_weight) or _rope_check(backend, q, freqs, sequence_dim)


@register_kernel("qk_norm_rope", "cpu", "torch.rms_norm+complex_mul", check=_check)
def qk_norm_rope(backend, q, k, q_weight, k_weight, freqs, eps, sequence_dim):
    """CPU rms_norm kernel, then CPU RoPE kernel, for q and for k."""
    qn = rms_norm(backend, q, q_weight, eps, None)
    kn = rms_norm(backend, k, k_weight, eps, None)
    return apply_rope(backend, qn, freqs, sequence_dim), apply_rope(backend, kn, freqs, sequence_dim)
