"""The BFL `flux.math` replacements of bfl.py: attention(q, k, v, pe, ...) -> ops.apply_rope +
ops.attention (ComfyUI's containers, masks and attention choices handled as bfl.py's doc says),
rope -> ops.rope_freqs, apply_rope / apply_rope1 -> ops.apply_rope; and KeepsOriginal, the skipped
row of a replacement that would change nothing for the chosen ops."""

from __future__ import annotations

import inspect

import torch

from .. import ops
from . import comfy_kitchen
from .comfy_kitchen import trim_pe
from .routes import handback

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


def _trims_long_pe(original) -> bool:
    """Whether the module's own RoPE (`_apply_rope1`, plain torch in ComfyUI) rotates x with the first
    L of longer frequencies rather than failing: probed once on float64 probes of 2 and 3 positions.
    Only then does our attention trim; elsewhere (BFL, kohya) a longer pe stays the original's error."""
    own = getattr(original, "__globals__", {}).get("_apply_rope1")
    if not callable(own):
        return False
    try:
        out = own(torch.ones(1, 1, 2, 2, dtype=torch.float64), torch.ones(1, 1, 3, 1, 2, 2, dtype=torch.float64))
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and tuple(out.shape) == (1, 1, 2, 2)


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


# ComfyUI's own choices of `optimized_attention` when the user names none (comfy.ldm.modules.attention
# picks one at import from the command line): SDPA where torch has it, else the exact split / sub-quadratic
# / basic forms. Any other (--use-sage-attention, --use-flash-attention, --use-xformers, --use-ck-attention,
# or a function a node rebinds into the module) is the user's choice and keeps the call.
COMFY_DEFAULT_ATTENTIONS = ("attention_pytorch", "attention_basic", "attention_split", "attention_sub_quad")


def _comfy_choice_why(original) -> str | None:
    """Why the attention `original` calls by name (its module's `optimized_attention`, read per call:
    a node may rebind it) is one the user chose, or None for ComfyUI's default / a module without one."""
    chosen = getattr(original, "__globals__", {}).get("optimized_attention")
    if chosen is None:
        return None
    name, module = getattr(chosen, "__name__", ""), getattr(chosen, "__module__", "") or ""
    if name in COMFY_DEFAULT_ATTENTIONS and module.endswith("ldm.modules.attention"):
        return None
    return (f"ComfyUI attention: optimized_attention is {module}.{name}, not ComfyUI's default "
            "(the user's attention choice, e.g. --use-sage-attention)")


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

    trims = _trims_long_pe(original)

    def rotate(q, k, pe, pe_q, pe_k):
        if use_rope:
            return ops.apply_rope(q, pe_q, backend=backend), ops.apply_rope(k, pe_k, backend=backend)
        if callable(own_rope):
            return own_rope(q, k, pe)
        return ops.reference.apply_rope(q, pe_q), ops.reference.apply_rope(k, pe_k)
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
        qt, kt = _peek(q), _peek(k)
        pe_q, pe_k = (trim_pe(pe, qt), trim_pe(pe, kt)) if trims else (pe, pe)
        why = None
        if set(kw) - known:
            why = f"BFL attention: unknown keyword argument(s) {sorted(set(kw) - known)}"
        elif any(n not in (mask_name, "transformer_options", "preferred_attention") and kw[n] is not None
                 for n in kw):
            why = "BFL attention: an argument besides the mask, transformer_options and preferred_attention is set"
        elif not all(isinstance(_peek(t), torch.Tensor) for t in (q, k, v)):
            why = "BFL attention: q/k/v are neither tensors nor ComfyUI AttentionTensorContainers"
        elif pe is not None and not (_pe_fits(pe_q, qt) and _pe_fits(pe_k, kt)):
            why = "BFL attention: positional encoding shape is not (..., L, D/2, 2, 2) for q and k"
        elif not use_attention:
            if pe is None:
                return original(q, k, v, pe, *args, **kwargs)  # nothing of ours to do: not a hand-back
            wrap = type(q) if not isinstance(q, torch.Tensor) else (lambda t: t)
            qr = ops.apply_rope(_take(q), pe_q, backend=backend)
            kr = ops.apply_rope(_take(k), pe_k, backend=backend)
            return original(wrap(qr), wrap(kr), v, None, *args, **kwargs)
        elif isinstance(opts, dict) and any(opts.get(key) is not None for key in COMFY_ATTENTION_KEYS):
            why = "ComfyUI attention: transformer_options sets optimized_attention_override (the user's attention)"
        elif mask is not None and not isinstance(mask, torch.Tensor):
            why = "BFL attention: mask is not a tensor"
        else:
            why = _preferred_why(kw.get("preferred_attention")) or _comfy_choice_why(original)
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
            q, k = rotate(q, k, pe, pe_q, pe_k)
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
    trims = _trims_long_pe(original)

    def apply_rope(xq, xk, freqs_cis):
        fq, fk = (trim_pe(freqs_cis, xq), trim_pe(freqs_cis, xk)) if trims else (freqs_cis, freqs_cis)
        if not (_pe_fits(fq, xq) and _pe_fits(fk, xk)):
            handback("apply_rope", backend, "BFL apply_rope: freqs_cis shape does not fit q/k")
            return original(xq, xk, freqs_cis)
        return ops.apply_rope(xq, fq, backend=backend), ops.apply_rope(xk, fk, backend=backend)

    apply_rope.__wrapped_original__ = original
    return apply_rope


def build_apply_rope1(original, backend):
    _keep_comfy_kitchen_route(original)
    trims = _trims_long_pe(original)

    def apply_rope1(x, freqs_cis):
        f = trim_pe(freqs_cis, x) if trims else freqs_cis
        if not _pe_fits(f, x):
            handback("apply_rope", backend, "ComfyUI apply_rope1: freqs_cis shape does not fit x")
            return original(x, freqs_cis)
        return ops.apply_rope(x, f, backend=backend)

    apply_rope1.__wrapped_original__ = original
    return apply_rope1
