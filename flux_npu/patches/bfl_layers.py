"""The BFL `flux.modules.layers` replacements of bfl.py: RMSNorm.forward and QKNorm.forward ->
ops.rms_norm (weights cast as the replaced code casts them, or handed back), EmbedND.forward ->
ops.rope_freqs per axis."""

from __future__ import annotations

import types

import torch

from .. import ops
from .routes import calls_plainly, handback

RMS_EPS = 1e-6  # the BFL RMSNorm's hard-coded epsilon


def _rms_keeps_x_dtype(original) -> bool:
    """Whether the original RMSNorm returns x's dtype for a bf16 x and a float32 scale (kohya)
    rather than the promoted dtype (BFL). Probed once on a 1x2 tensor when the patch is built."""
    try:
        out = original(types.SimpleNamespace(scale=torch.ones(2)), torch.ones(1, 2, dtype=torch.bfloat16))
        return out.dtype == torch.bfloat16
    except Exception:
        return False


# weight dtypes ops.rms_norm takes as stored; others (float8 e4m3 / e5m2 storage) are cast the way
# the replaced code casts them, or handed back to it
PLAIN_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _scale_weight(scale, x, keeps_x: bool, where: str):
    """(weight, None) of a BFL-style RMSNorm `scale` for ops.rms_norm, or (None, reason)."""
    if not isinstance(scale, torch.Tensor) or scale.dim() != 1 or scale.shape[0] != x.shape[-1]:
        return None, f"{where}: no 1-D `scale` of x's last dim"
    if scale.device != x.device:  # weights streamed in by the original (ComfyUI low-VRAM casting)
        return None, f"{where}: scale on another device than x"
    if scale.dtype not in PLAIN_FLOATS:
        if not keeps_x:  # BFL multiplies by the stored scale as is: its own arithmetic decides
            return None, f"{where}: scale stored in {scale.dtype} (used as stored by the original)"
        scale = scale.float()  # kohya computes with `self.scale.float()` (its --fp8_base storage)
    return scale, None


def _module_weight(norm, x, where: str):
    """(weight, eps, None) of a torch.nn.RMSNorm-like QK norm (ComfyUI's operations.RMSNorm), cast
    as its forward casts it, or (None, None, reason)."""
    weight = getattr(norm, "weight", None)
    shape = tuple(getattr(norm, "normalized_shape", ()) or ())
    if not isinstance(weight, torch.Tensor) or shape != (x.shape[-1],) or tuple(weight.shape) != shape:
        return None, None, f"{where}: norm has no weight of the head dim"
    if getattr(norm, "weight_function", None) or getattr(norm, "bias_function", None):
        return None, None, f"{where}: ComfyUI weight patches (weight_function) apply on the fly"
    if weight.device != x.device:  # offloaded, streamed in by the norm's own forward
        return None, None, f"{where}: weight on another device than x (streamed in by the norm itself)"
    if getattr(norm, "comfy_cast_weights", False):
        weight = weight.to(x.dtype)  # ComfyUI's cast_bias_weight: the weight in the input's dtype
    elif weight.dtype not in PLAIN_FLOATS:
        return None, None, f"{where}: weight stored in {weight.dtype} without ComfyUI's on-the-fly cast"
    eps = norm.eps if getattr(norm, "eps", None) is not None else torch.finfo(x.dtype).eps  # torch's default
    return weight, eps, None


def build_rms_forward(original, backend):
    keeps_x = _rms_keeps_x_dtype(original)

    def forward(self, x):
        scale, why = _scale_weight(getattr(self, "scale", None), x, keeps_x, "BFL RMSNorm")
        if why is not None:
            handback("rms_norm", backend, why)
            return original(self, x)
        out = x.dtype if keeps_x else torch.promote_types(x.dtype, scale.dtype)
        return ops.rms_norm(x, scale, RMS_EPS, out_dtype=out, backend=backend)

    return forward


def build_qknorm_forward(original, backend):
    # the RMSNorm class its norms are built from: BFL's / kohya's (`scale`, eps 1e-6; kohya computes
    # in x's dtype with scale.float()), or None in current ComfyUI, whose QKNorm holds
    # operations.RMSNorm modules (`weight`, eps None = torch's default, weight cast to x's dtype)
    rms_cls = original.__globals__.get("RMSNorm")
    rms_forward = getattr(rms_cls, "forward", None) if isinstance(rms_cls, type) else None
    keeps_x = _rms_keeps_x_dtype(rms_forward) if rms_forward is not None else False

    def one(norm, x, v):
        if isinstance(norm, torch.nn.Module) and not calls_plainly(norm):
            return "BFL QKNorm: a norm with hooks (offloading, casting) or an instance forward: its own call runs"
        if isinstance(getattr(norm, "scale", None), torch.Tensor):
            w, why = _scale_weight(norm.scale, x, keeps_x, "BFL QKNorm")
            eps = RMS_EPS
        elif isinstance(norm, torch.nn.Module) and hasattr(norm, "weight") and hasattr(norm, "eps"):
            w, eps, why = _module_weight(norm, x, "ComfyUI QKNorm")
        else:
            w, why = None, "BFL QKNorm: query_norm/key_norm with neither a `scale` nor an RMSNorm `weight`"
        return (w, eps) if why is None else why

    def forward(self, q, k, v):
        qn, kn = one(getattr(self, "query_norm", None), q, v), one(getattr(self, "key_norm", None), k, v)
        why = qn if isinstance(qn, str) else kn if isinstance(kn, str) else None
        if why is not None:
            handback("rms_norm", backend, why)
            return original(self, q, k, v)
        return (
            ops.rms_norm(q, qn[0], qn[1], out_dtype=v.dtype, backend=backend),
            ops.rms_norm(k, kn[0], kn[1], out_dtype=v.dtype, backend=backend),
        )

    return forward


def build_embednd_forward(original, backend):
    def forward(self, ids):
        n_axes = ids.shape[-1]
        emb = torch.cat(
            [ops.rope_freqs(ids[..., i], self.axes_dim[i], self.theta, form="bfl", backend=backend)
             for i in range(n_axes)],
            dim=-3,
        )
        return emb.unsqueeze(1)

    return forward
