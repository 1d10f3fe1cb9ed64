"""Small helpers shared by kernels of every backend."""

from __future__ import annotations

import torch


def foreign_device(backend, *tensors):
    """Reason string if any tensor is not on the backend's device type, else None."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and not backend.owns(t):
            return f"tensor on device {t.device.type!r}; backend {backend.name} takes {backend.device_type!r} tensors"
    return None


def addcmul_gated_residual(backend, x, gate, y):
    """x + gate * y as torch.addcmul: already one fused elementwise kernel with broadcasting on
    every device (one read of x, gate, y, one write), so no backend needs its own."""
    out = torch.addcmul(x, gate, y)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def check_gated_residual(backend, x, gate, y):
    return foreign_device(backend, x, gate, y)


def composed_adaln_residual(backend, x, gate, y, shift, scale, eps):
    """adaln_residual on a backend without a fused kernel: its own gated_residual and
    layer_norm_modulate kernels, one after the other (each dispatched, so each is counted, and
    declines or strict mode apply to each as when Flux code calls them separately)."""
    from .. import ops

    h = ops.gated_residual(x, gate, y, backend=backend)
    return h, ops.layer_norm_modulate(h, shift, scale, eps, backend=backend)


def check_adaln_residual(backend, x, gate, y, shift, scale, eps):
    return foreign_device(backend, x, gate, y, shift, scale)


def composed_qk_norm_rope(backend, q, k, q_weight, k_weight, freqs, eps, sequence_dim):
    """qk_norm_rope on a backend without a fused kernel: its own rms_norm and apply_rope kernels,
    one after the other (each dispatched and counted, as when Flux code calls them separately)."""
    from .. import ops

    qn = ops.rms_norm(q, q_weight, eps, backend=backend)
    kn = ops.rms_norm(k, k_weight, eps, backend=backend)
    return ops.apply_rope(qn, freqs, sequence_dim, backend=backend), ops.apply_rope(kn, freqs, sequence_dim,
                                                                                    backend=backend)


def check_qk_norm_rope(backend, q, k, q_weight, k_weight, freqs, eps, sequence_dim):
    """Takes the input only where the backend's own rms_norm and apply_rope kernels take its parts
    (composing two fallbacks would only be the reference under another name)."""
    why = foreign_device(backend, q, k, q_weight, k_weight, *(freqs if isinstance(freqs, tuple) else (freqs,)))
    if why:
        return why
    from ..ops.registry import explain

    for op, args in (("rms_norm", (q, q_weight, eps, None)), ("rms_norm", (k, k_weight, eps, None)),
                     ("apply_rope", (q, freqs, sequence_dim))):
        name, reasons = explain(op, backend, *args)
        if name is None:
            return f"{op}: " + ("; ".join(reasons) or "no kernel")
    return None
