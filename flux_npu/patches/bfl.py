"""Patches for the reference BFL Flux layout (`flux.math`, `flux.modules.layers`) and the code
derived from it: x-flux and FluxKits (same names), ComfyUI (`comfy.ldm.flux.math` / `.layers`,
whose `attention` takes `mask` and `transformer_options`), kohya sd-scripts (`library.flux_models`,
the whole layout in one module, `attention(..., attn_mask)`), and forks under any name: a module
that *defines* `attention(q, k, v, pe, ...)` and `apply_rope(xq, xk, freqs_cis)` (math), or the
`QKNorm` / `EmbedND` modules (layers), is recognised by structure; each of its symbols is then
replaced only if it has BFL's signature and computes what BFL's does on a small float64 probe
(`structural`), else it stays with a skipped row saying why (a causal decoder's attention, a
Gemma-style RMSNorm share the names).

math:   attention(q, k, v, pe, [mask | attn_mask], [transformer_options], [preferred_attention]) ->
        ops.apply_rope + ops.attention. q/k/v may be ComfyUI AttentionTensorContainers (taken, as
        ComfyUI's attention takes them). Masks are served (bool True = attend, or additive float):
        ComfyUI's with its own broadcasting (2-D (L, S), 3-D (B, L, S)), kohya's as SDPA does.
        Hand-backs to the original, each counted by ops.record_fallback with its reason: an
        `optimized_attention_override` in transformer_options or a `preferred_attention` whose
        `function` is set (an attention the user or the model chose), keyword arguments we do not
        know, positional encodings of another shape. With patch(exclude=["attention"]) RoPE is still
        served here and the original attention runs with pe=None (ComfyUI applies RoPE inside it).
        rope(pos, dim, theta) -> ops.rope_freqs; apply_rope / apply_rope1 -> ops.apply_rope.
        All are rebound where imported by name (`from flux.math import ...`).
layers: RMSNorm.forward -> ops.rms_norm (output dtype probed from the original once: BFL promotes
        with the scale's dtype, kohya keeps x's); QKNorm.forward -> ops.rms_norm of q and k rounded
        once to v's dtype, its norms either BFL RMSNorms (`scale`, eps 1e-6) or, in current ComfyUI
        (where layers.RMSNorm is None), `operations.RMSNorm` modules (`weight`, eps None = torch's
        finfo eps); EmbedND.forward -> ops.rope_freqs per axis. Weights stored in another dtype are
        cast as the replaced code casts them (kohya: scale.float(); ComfyUI comfy_cast_weights: to
        x's dtype) or handed back (a scale BFL uses as stored, weights on another device, ComfyUI
        weight_function patches).
blocks: DoubleStreamBlock / SingleStreamBlock / LastLayer forwards (kohya: their `_forward`): the
        inline LayerNorm+modulate expressions (4 per double block, 1 per single block, 1 in the
        last layer) -> ops.layer_norm_modulate and the gated residuals -> ops.gated_residual, by
        rewriting those expressions in the forward's own source (rewrite.py), including ComfyUI's
        `apply_mod(self.N(x), (1 + scale), shift, modulation_dims)` / `x + apply_mod(y, gate, None,
        modulation_dims)` form (fused where modulation_dims is None, else handed back, counted).
"""

from __future__ import annotations

import inspect
import types

import torch

from .. import ops
from . import comfy_kitchen
from .registry import register_patch_set
from .rewrite import build_block_forward
from .routes import calls_plainly, handback
from .spec import PatchSet, Spec, signature_drift, suffix_pattern

RMS_EPS = 1e-6  # the BFL RMSNorm's hard-coded epsilon

# transformer_options keys that change how ComfyUI computes attention: with one of these set the
# call goes to the original (ComfyUI's optimized_attention honours them); every other key
# (block_index, sigmas, patches, ...) is metadata the attention itself never reads.
COMFY_ATTENTION_KEYS = ("optimized_attention_override",)


def _pe_fits(pe, q) -> bool:
    """pe is BFL (..., L, D/2, 2, 2) for q (B, H, L, D): what ops.apply_rope takes."""
    return (
        isinstance(pe, torch.Tensor)
        and pe.dim() >= 4
        and tuple(pe.shape[-2:]) == (2, 2)
        and pe.shape[-3] * 2 == q.shape[-1]
        and pe.shape[-4] == q.shape[-2]
    )


def _peek(x):
    """The tensor in x: x itself, or what a ComfyUI AttentionTensorContainer holds (read without
    consuming it, so a hand-back passes the container on untouched)."""
    if isinstance(x, torch.Tensor):
        return x
    peek = getattr(x, "peek", None)
    if callable(peek):
        return peek()
    return getattr(x, "tensor", None)


def _take(x):
    """The tensor in x, consuming a container as ComfyUI's own attention does (`take()`)."""
    if isinstance(x, torch.Tensor):
        return x
    take = getattr(x, "take", None)
    return take() if callable(take) else _peek(x)


def _preferred_why(preferred) -> str | None:
    """Why a ComfyUI `preferred_attention` (a ComfyAttention) keeps the call on its own attention:
    one whose `function` is set names a specific attention (the model's or the user's choice), which
    ComfyUI runs instead of optimized_attention's default; None or an unset one leaves it to us."""
    if preferred is None or getattr(preferred, "function", None) is None:
        return None
    return "ComfyUI attention: preferred_attention names a specific attention function (the model's or user's choice)"


class KeepsOriginal(Exception):
    """The replacement would not change what runs for the chosen ops: the original stays (a skipped row)."""


def build_attention(original, backend, enabled=None):
    names = list(inspect.signature(original).parameters)[4:]  # after (q, k, v, pe)
    mask_name = next((n for n in names if n in ("mask", "attn_mask")), None)
    comfy_mask = mask_name == "mask"  # ComfyUI's optimized_attention broadcasting (2-D, 3-D = batch)
    known = set(names)
    use_attention = enabled is None or "attention" in enabled
    # patch(exclude=["apply_rope"]) holds inside this composite too: q and k are rotated by the
    # module's own apply_rope (BFL's maths, the reference where the module has none)
    use_rope = enabled is None or "apply_rope" in enabled
    own_rope = original.__globals__.get("apply_rope") if hasattr(original, "__globals__") else None

    def rotate(q, k, pe):
        if use_rope:
            return ops.apply_rope(q, pe, backend=backend), ops.apply_rope(k, pe, backend=backend)
        if callable(own_rope):
            return own_rope(q, k, pe)
        return ops.reference.apply_rope(q, pe), ops.reference.apply_rope(k, pe)
    if not use_attention:
        # patch(exclude=["attention"]): ComfyUI applies RoPE inside its attention, so RoPE is served
        # here and the original attention runs with pe=None, which it must then skip (ComfyUI's
        # `if pe is not None:`); an attention that always applies pe keeps RoPE (the row says so).
        try:
            source = inspect.getsource(original)
        except (OSError, TypeError):
            source = ""
        if "pe is not None" not in source:
            raise KeepsOriginal("attention excluded and this attention always applies RoPE itself (no "
                                "`pe is not None` branch): RoPE stays inside it")

    def attention(q, k, v, pe, *args, **kwargs):
        if len(args) > len(names):
            handback("attention", backend, "BFL attention: more positional arguments than the original takes")
            return original(q, k, v, pe, *args, **kwargs)
        kw = dict(zip(names, args, strict=False))
        kw.update(kwargs)
        mask = kw.get(mask_name) if mask_name else None
        opts = kw.get("transformer_options")
        qt = _peek(q)
        why = None
        if set(kw) - known:
            why = f"BFL attention: unknown keyword argument(s) {sorted(set(kw) - known)}"
        elif any(n not in (mask_name, "transformer_options", "preferred_attention") and kw[n] is not None
                 for n in kw):
            why = "BFL attention: an argument besides the mask, transformer_options and preferred_attention is set"
        elif not all(isinstance(_peek(t), torch.Tensor) for t in (q, k, v)):
            why = "BFL attention: q/k/v are neither tensors nor ComfyUI AttentionTensorContainers"
        elif pe is not None and not _pe_fits(pe, qt):
            why = "BFL attention: positional encoding shape is not (..., L, D/2, 2, 2) for q"
        elif not use_attention:
            if pe is None:
                return original(q, k, v, pe, *args, **kwargs)  # nothing of ours to do: not a hand-back
            wrap = type(q) if not isinstance(q, torch.Tensor) else (lambda t: t)
            qr = ops.apply_rope(_take(q), pe, backend=backend)
            kr = ops.apply_rope(_take(k), pe, backend=backend)
            return original(wrap(qr), wrap(kr), v, None, *args, **kwargs)
        elif isinstance(opts, dict) and any(opts.get(key) is not None for key in COMFY_ATTENTION_KEYS):
            why = "ComfyUI attention: transformer_options sets optimized_attention_override (the user's attention)"
        elif mask is not None and not isinstance(mask, torch.Tensor):
            why = "BFL attention: mask is not a tensor"
        else:
            why = _preferred_why(kw.get("preferred_attention"))
        if why is not None:
            handback("attention", backend, why)
            return original(q, k, v, pe, *args, **kwargs)
        q, k, v = _take(q), _take(k), _take(v)
        if mask is not None and comfy_mask:
            if mask.dim() == 2:  # (L, S)
                mask = mask[None, None]
            elif mask.dim() == 3:  # (B, L, S)
                mask = mask[:, None]
        if pe is not None:
            q, k = rotate(q, k, pe)
        x = ops.attention(q, k, v, mask=mask, backend=backend)
        return x.transpose(1, 2).flatten(2)  # "B H L D -> B L (H D)"

    attention.__wrapped_original__ = original
    if not use_attention:
        attention.__flux_npu_what__ = ("RoPE -> ops.apply_rope, then the original attention with pe=None "
                                       "(attention excluded by patch(exclude=...))")
    return attention


def build_rope(original, backend):
    def rope(pos, dim, theta):
        return ops.rope_freqs(pos, dim, theta, form="bfl", backend=backend)

    rope.__wrapped_original__ = original
    return rope


def _keep_comfy_kitchen_route(original) -> None:
    """A ComfyUI RoPE function that calls comfy-kitchen stays as written while our backend is
    registered there (comfy_kitchen.py): comfy-kitchen serves it with our kernels."""
    if comfy_kitchen.route_on() and comfy_kitchen.calls_comfy_kitchen(original):
        raise KeepsOriginal("it routes through comfy-kitchen (comfy.quant_ops.ck), where the flux_npu backend is "
                            "registered (patch(comfy_kitchen=None) replaces it instead)")


def build_apply_rope(original, backend):
    _keep_comfy_kitchen_route(original)

    def apply_rope(xq, xk, freqs_cis):
        if not (_pe_fits(freqs_cis, xq) and _pe_fits(freqs_cis, xk)):
            handback("apply_rope", backend, "BFL apply_rope: freqs_cis shape does not fit q/k")
            return original(xq, xk, freqs_cis)
        return ops.apply_rope(xq, freqs_cis, backend=backend), ops.apply_rope(xk, freqs_cis, backend=backend)

    apply_rope.__wrapped_original__ = original
    return apply_rope


def build_apply_rope1(original, backend):
    _keep_comfy_kitchen_route(original)

    def apply_rope1(x, freqs_cis):
        if not _pe_fits(freqs_cis, x):
            handback("apply_rope", backend, "ComfyUI apply_rope1: freqs_cis shape does not fit x")
            return original(x, freqs_cis)
        return ops.apply_rope(x, freqs_cis, backend=backend)

    apply_rope1.__wrapped_original__ = original
    return apply_rope1


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


MATH_MODULES = ("flux.math",)
# (class, method, optional): kohya runs the block body in `_forward` (behind checkpointing)
BLOCK_FORWARDS = (("DoubleStreamBlock", "forward", False), ("DoubleStreamBlock", "_forward", True),
                  ("SingleStreamBlock", "forward", False), ("SingleStreamBlock", "_forward", True),
                  ("LastLayer", "forward", False))
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


register_patch_set(
    PatchSet(
        target="bfl",
        matches=suffix_pattern(*MATH_MODULES),
        recognise=looks_like_bfl_math,
        describe="*flux.math",
        specs=[
            Spec("attention", structural(build_attention, "attention"),
                 "RoPE + attention (masks too) -> ops.apply_rope + ops.attention",
                 params=("q", "k", "v", "pe"), rebind=True, ops=("attention", "apply_rope")),
            Spec("rope", structural(build_rope, "rope"),
                 "RoPE matrices -> ops.rope_freqs (float32 where no float64)",
                 params=("pos", "dim", "theta"), rebind=True, ops=("rope_freqs",)),
            Spec("apply_rope", structural(build_apply_rope, "apply_rope"), "RoPE application -> ops.apply_rope",
                 params=("xq", "xk", "freqs_cis"), rebind=True, ops=("apply_rope",)),
            Spec("apply_rope1", structural(build_apply_rope1, "apply_rope1"),
                 "RoPE application (one tensor) -> ops.apply_rope",
                 params=("x", "freqs_cis"), rebind=True, ops=("apply_rope",), optional=True),
        ],
    )
)

register_patch_set(
    PatchSet(
        target="bfl",
        matches=suffix_pattern(*LAYER_MODULES),
        recognise=looks_like_bfl_layers,
        describe="*flux.modules.layers",
        specs=[
            Spec("RMSNorm.forward", structural(build_rms_forward, "RMSNorm"), "RMSNorm -> ops.rms_norm",
                 params=("self", "x"), ops=("rms_norm",)),
            Spec("QKNorm.forward", structural(build_qknorm_forward, "QKNorm"),
                 "QK RMSNorm -> ops.rms_norm (rounded once to v's dtype)",
                 params=("self", "q", "k", "v"), ops=("rms_norm",)),
            Spec("EmbedND.forward", structural(build_embednd_forward, "EmbedND"),
                 "RoPE frequencies -> ops.rope_freqs", params=("self", "ids"), ops=("rope_freqs",)),
            *[Spec(f"{cls}.{meth}", build_block_forward(f"BFL {cls}"), "AdaLN + gated residuals",
                   ops=("layer_norm_modulate", "gated_residual"), optional=optional)
              for cls, meth, optional in BLOCK_FORWARDS],
        ],
    )
)
