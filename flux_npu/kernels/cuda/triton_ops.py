"""Registration of the Triton kernels for backend "cuda" (rms_norm, apply_rope, qk_norm_rope,
layer_norm_modulate). Triton is imported inside each kernel function, at its first call, so that
this module (and the op table) loads on a machine without triton and the checks can say so."""

from __future__ import annotations

import torch

from ...ops.registry import register_kernel
from .._common import addcmul_gated_residual, check_gated_residual
from ._checks import freqs_reason, group_split, row_reason, triton_reason


def _freq_tensors(freqs):
    return (freqs,) if isinstance(freqs, torch.Tensor) else tuple(t for t in freqs if isinstance(t, torch.Tensor))


def _check_rms(backend, x, weight, eps, out_dtype):
    return (
        triton_reason(backend, x, weight)
        or row_reason(x.shape[-1])
        or (f"out_dtype {out_dtype} is not a Triton dtype" if out_dtype not in (None, torch.float32, torch.bfloat16, torch.float16) else None)
    )


@register_kernel("rms_norm", "cuda", "triton.rms_norm", check=_check_rms)
def rms_norm(backend, x, weight, eps, out_dtype):
    """Triton RMSNorm: one read, one write, float32 maths, strided rows read in place."""
    from .. import triton as impl

    return impl.rms_norm(x, weight, eps, out_dtype)


def _check_rope(backend, x, freqs, sequence_dim):
    if not isinstance(freqs, (torch.Tensor, tuple, list)):
        return "freqs of an unknown form"
    return triton_reason(backend, x, *_freq_tensors(freqs)) or row_reason(x.shape[-1]) or freqs_reason(x, freqs, sequence_dim)


@register_kernel("apply_rope", "cuda", "triton.rope", check=_check_rope)
def apply_rope(backend, x, freqs, sequence_dim):
    """Triton RoPE, BFL matrices or diffusers (cos, sin), frequencies broadcast in place."""
    from .. import triton as impl

    return impl.apply_rope(x, freqs, sequence_dim)


def _check_qk(backend, q, k, q_weight, k_weight, freqs, eps, sequence_dim):
    if not isinstance(freqs, (torch.Tensor, tuple, list)):
        return "freqs of an unknown form"
    why = triton_reason(backend, q, k, q_weight, k_weight, *_freq_tensors(freqs)) or row_reason(q.shape[-1])
    if why:
        return why
    for n, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None and (not isinstance(w, torch.Tensor) or w.dim() != 1 or w.shape[0] != q.shape[-1]):
            return f"{n} must be None or a ({q.shape[-1]},) tensor"
    return freqs_reason(q, freqs, sequence_dim) or freqs_reason(k, freqs, sequence_dim)


@register_kernel("qk_norm_rope", "cuda", "triton.qk_norm_rope", check=_check_qk)
def qk_norm_rope(backend, q, k, q_weight, k_weight, freqs, eps, sequence_dim):
    """Triton RMSNorm + RoPE in one pass per tensor."""
    from .. import triton as impl

    return impl.qk_norm_rope(q, k, q_weight, k_weight, freqs, eps, sequence_dim)


def _check_ln(backend, x, shift, scale, eps):
    why = triton_reason(backend, x, shift, scale) or row_reason(x.shape[-1])
    if why:
        return why
    k_sh, k_sc = group_split(x.shape, shift.shape), group_split(x.shape, scale.shape)
    if k_sh is None or k_sh != k_sc:
        return (
            f"shift {tuple(shift.shape)} / scale {tuple(scale.shape)} against x {tuple(x.shape)}: the kernel takes "
            f"shift/scale varying along the same leading dims and constant after them (e.g. (B, 1, D))"
        )
    return None


@register_kernel("layer_norm_modulate", "cuda", "triton.layer_norm_modulate", check=_check_ln)
def layer_norm_modulate(backend, x, shift, scale, eps):
    """Triton AdaLN: LayerNorm + (1 + scale), + shift in one pass."""
    from .. import triton as impl

    return impl.layer_norm_modulate(x, shift, scale, eps)


# A Triton kernel would not pay here: addcmul is already one fused elementwise kernel.
register_kernel("gated_residual", "cuda", "torch.addcmul", check=check_gated_residual)(addcmul_gated_residual)
