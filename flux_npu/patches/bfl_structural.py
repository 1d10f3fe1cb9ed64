"""Recognising the BFL layout in modules under other names (bfl.py): a module that defines
attention / apply_rope (math) or QKNorm / EmbedND (layers) with BFL's signatures, and the
structural check that each symbol found that way computes what BFL's does on a float64 probe."""

from __future__ import annotations

import inspect
import types

import torch

from .bfl_layers import RMS_EPS
from .bfl_math import KeepsOriginal
from .spec import signature_drift, suffix_pattern

# -- structural recognition: what a module found by its names must also compute ----------------
# A module under another name is ours only because it defines BFL's names (attention, apply_rope,
# QKNorm, EmbedND); a causal decoder or a Gemma-style RMSNorm (x * rrms * (1 + w)) defines them too.
# Before replacing such a symbol, its original is run once on small float64 probes (positions,
# frequencies and weights drawn here) and must compute what BFL's does, with BFL's signature;
# otherwise the stock code stays and the report row says why. Modules matched by name (flux.math,
# comfy.ldm.flux.*, flux.modules.layers) are BFL's own and are not probed (ComfyUI's attention may
# need its device setup).
PROBE_RTOL = 1e-5  # originals may compute in float32
ATTENTION_EXTRA = {"mask": None, "attn_mask": None, "transformer_options": {}, "preferred_attention": None}


def _named_layout(original) -> bool:
    mod = getattr(original, "__module__", None) or ""
    return suffix_pattern(*MATH_MODULES)(mod) or suffix_pattern(*LAYER_MODULES)(mod)


def _probe_rel(got, ref) -> float:
    got = got if isinstance(got, (tuple, list)) else (got,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(got) != len(ref):
        return float("inf")
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(r.shape):
            return float("inf")
        err = float((g.double() - r).norm() / r.norm().clamp_min(1e-30))
        worst = max(worst, err if err == err else float("inf"))
    return worst


def _rms_ref(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * w


class _ProbeNorm:
    """A stand-in query/key norm for probing QKNorm.forward: BFL's RMSNorm with a fixed scale."""

    def __init__(self, w):
        self.scale = w

    def __call__(self, x):
        return _rms_ref(x, self.scale)


def _probe(kind, original):
    """(got, reference) of `original` on small float64 inputs, for the symbol `kind`."""
    from ..ops import reference as R

    g = torch.Generator().manual_seed(0)
    pos = torch.arange(3, dtype=torch.float64)[None] * 1.5
    pe = R.rope_freqs(pos, 4, 10000.0, form="bfl")[:, None]  # (1, 1, L=3, 2, 2, 2)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if kind == "attention":
        q, k, v = rnd(1, 2, 3, 4), rnd(1, 2, 3, 4), rnd(1, 2, 3, 4)
        qr, kr = R.apply_rope(q, pe), R.apply_rope(k, pe)
        ref = torch.nn.functional.scaled_dot_product_attention(qr, kr, v).transpose(1, 2).flatten(2)
        return original(q, k, v, pe), ref
    if kind == "apply_rope":
        q, k = rnd(1, 2, 3, 4), rnd(1, 2, 3, 4)
        return original(q, k, pe), (R.apply_rope(q, pe), R.apply_rope(k, pe))
    if kind == "apply_rope1":
        q = rnd(1, 2, 3, 4)
        return original(q, pe), R.apply_rope(q, pe)
    if kind == "rope":
        return original(pos, 4, 10000), R.rope_freqs(pos, 4, 10000.0, form="bfl")
    if kind == "RMSNorm":
        x, w = rnd(2, 4), rnd(4)
        return original(types.SimpleNamespace(scale=w), x), _rms_ref(x, w)
    if kind == "QKNorm":
        q, k, v, w = rnd(1, 2, 3, 4), rnd(1, 2, 3, 4), rnd(1, 2, 3, 4), rnd(4)
        fake = types.SimpleNamespace(query_norm=_ProbeNorm(w), key_norm=_ProbeNorm(w))
        return original(fake, q, k, v), (_rms_ref(q, w), _rms_ref(k, w))
    if kind == "EmbedND":
        ids = torch.stack([torch.arange(3, dtype=torch.float64), torch.arange(3, dtype=torch.float64) * 2], -1)[None]
        ref = torch.cat([R.rope_freqs(ids[..., i], d, 10000.0, form="bfl") for i, d in enumerate((2, 4))], dim=-3)
        return original(types.SimpleNamespace(theta=10000, axes_dim=[2, 4], dim=6), ids), ref.unsqueeze(1)
    raise KeyError(kind)


def structural_mismatch(kind, original) -> str | None:
    """None when `original` (found by structure) has BFL's signature and computes what BFL's `kind`
    computes on a probe; else why not."""
    try:
        sig = inspect.signature(original)
    except (TypeError, ValueError) as exc:
        return f"cannot read its signature ({exc})"
    params = list(sig.parameters.values())
    if kind == "attention":
        if any(p.default is not inspect.Parameter.empty for p in params[:4]):
            return f"signature {sig} gives q, k, v or pe a default (BFL's attention(q, k, v, pe) takes all four)"
        for p in params[4:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.name not in ATTENTION_EXTRA or p.default not in (ATTENTION_EXTRA[p.name], inspect.Parameter.empty):
                return f"parameter {p.name}={p.default!r} is none of BFL's, ComfyUI's or kohya's"
    if kind == "QKNorm":  # the replacement reads its norms' `scale`: their class must be BFL's RMSNorm
        rms_cls = getattr(original, "__globals__", {}).get("RMSNorm")
        rms_forward = getattr(rms_cls, "forward", None) if isinstance(rms_cls, type) else None
        why = structural_mismatch("RMSNorm", rms_forward) if rms_forward is not None else None
        if why is not None:
            return f"its module's RMSNorm {why}"
    try:
        with torch.no_grad():
            got, ref = _probe(kind, original)
    except Exception as exc:  # noqa: BLE001 - any failure on BFL inputs means: not BFL's
        return f"raised {type(exc).__name__} on BFL-shaped inputs ({exc})"
    err = _probe_rel(got, ref)
    if not err <= PROBE_RTOL:
        what = {"attention": "RoPE then non-causal attention, (B, L, H*D) out", "RMSNorm": "x * rrms * scale",
                "rope": "BFL rotation matrices", "EmbedND": "BFL rotation matrices per axis"}.get(kind, "BFL's")
        return f"computes something else than {what} on a probe (rel err {err:.3g})"
    return None


def structural(build, kind):
    """`build`, refusing (KeepsOriginal: a skipped row with the reason) an original that its module's
    names alone made look like BFL's but that does not compute what BFL's `kind` computes."""
    import functools

    @functools.wraps(build)
    def checked(original, backend, *rest):
        if not _named_layout(original):
            why = structural_mismatch(kind, original)
            if why is not None:
                raise KeepsOriginal(f"recognised by its names only, and {why}: not BFL's {kind}")
        return build(original, backend, *rest)

    return checked


# -- recognition by names: the modules BFL's layout lives in, and what a fork must define ----------
MATH_MODULES = ("flux.math",)
LAYER_MODULES = ("flux.modules.layers", "flux.layers")

MATH_SIGNATURES = {"attention": ("q", "k", "v", "pe"), "apply_rope": ("xq", "xk", "freqs_cis"),
                   "rope": ("pos", "dim", "theta")}
LAYER_SIGNATURES = {"QKNorm": ("self", "q", "k", "v"), "EmbedND": ("self", "ids"), "RMSNorm": ("self", "x")}


def _defined_function(module, name, params):
    fn = vars(module).get(name)
    return (
        isinstance(fn, types.FunctionType)
        and fn.__module__ == module.__name__
        and signature_drift(fn, params) is None
    )


def _defined_module_class(module, name, params):
    cls = vars(module).get(name)
    return (
        isinstance(cls, type)
        and cls.__module__ == module.__name__
        and issubclass(cls, torch.nn.Module)
        and signature_drift(cls.__dict__.get("forward"), params) is None
    )


def looks_like_bfl_math(module) -> bool:
    """Defines (not imports) attention(q, k, v, pe, ...) and apply_rope(xq, xk, freqs_cis)."""
    d = vars(module)
    if "attention" not in d or "apply_rope" not in d:
        return False
    return all(_defined_function(module, n, MATH_SIGNATURES[n]) for n in ("attention", "apply_rope"))


def looks_like_bfl_layers(module) -> bool:
    """Defines the nn.Modules QKNorm(q, k, v) and EmbedND(ids)."""
    d = vars(module)
    if "QKNorm" not in d or "EmbedND" not in d:
        return False
    return all(_defined_module_class(module, n, LAYER_SIGNATURES[n]) for n in ("QKNorm", "EmbedND"))
