"""Patches for x-flux's block processors, IP-adapter ones and plain (`flux.modules.layers` of
XLabs-AI/x-flux and forks).

x-flux's DoubleStreamBlock hands its body to a processor; `IPDoubleStreamBlockProcessor.__call__
(self, attn, img, txt, vec, pe, image_proj, ip_scale=1.0, ...)` runs the block as written (its
`attention(...)` and `attn.img_attn.norm(...)` are the BFL ones, patched by bfl.py) and then an
image-prompt attention of the block's normalised image queries over projected image-prompt
tokens, written inline as `F.scaled_dot_product_attention(...)`. That inline call (and, in forks
that normalise the IP queries/keys with their own RMSNorms, those norm calls) has no symbol we
could swap, so the processor's `__call__` is rewritten in its own source, only at these expressions:

- `<anything>.scaled_dot_product_attention(q, k, v, ...)` (and a bare `scaled_dot_product_attention`)
  -> `_sdpa(<that function>, q, k, v, ...)`: ops.attention when the function is torch's own SDPA
  and the call is plain attention over (B, H, L, D) tensors (no dropout, not causal, no GQA flag,
  mask None / bool / additive), else the function itself with a counted hand-back.
- the AdaLN and gated residuals the processors write on the block they are handed (`attn`):
  `V = attn.N(X)` then `V = (1 + S) * V + T`, and `(1 + S) * attn.N(X) + T`
  -> ops.layer_norm_modulate when `attn.N` is a LayerNorm without affine parameters over the
  last dim and shift/scale share x's dtype; `X + G * Y` with a gate G -> ops.gated_residual when
  the shapes and dtypes allow; else the expression as written, with a counted hand-back. This is
  what fuses x-flux's AdaLN at all: its DoubleStreamBlock.forward only calls the processor, so
  the BFL block rewrite (bfl.py) finds nothing there. The plain `DoubleStreamBlockProcessor` /
  `SingleStreamBlockProcessor` get this part too.
- `<obj>.<qk norm>(x)` with a QK-norm name (`q_norm`, `ip_key_norm`, `norm_q`, `query_norm`, ...)
  -> `_rms(<obj>.<qk norm>, x)`: ops.rms_norm for the BFL RMSNorm form (a 1-D `scale`, eps 1e-6,
  output promoted with the scale's dtype, as BFL's RMSNorm returns) and for torch.nn.RMSNorm,
  else the norm itself with a counted hand-back.

The layout is recognised by structure (x-flux's `flux.modules.layers` included): a module that
defines `DoubleStreamBlockProcessor` with `__call__(self, attn, img, txt, vec, pe, ...)` gets all
four processors patched, one that defines only `IPDoubleStreamBlockProcessor` (a fork keeping its
IP processors apart) the IP ones. `patch_module(pkg)` reaches `pkg.modules.layers` too. The rewritten
function is compiled against the module's live globals, with its file and line numbers.
`IPSingleStreamBlockProcessor` (defined by some forks, same idea) is served when present. x-flux's
LoRA processors (`DoubleStreamBlockLoraProcessor` / `SingleStreamBlockLoraProcessor`, nn.Modules
whose `forward` runs the block with LoRA deltas) get the AdaLN / gated-residual rewrite of their
`forward` (optional specs: only x-flux versions with LoRA define them).
"""

from __future__ import annotations

import ast
import re

import torch

from .. import ops
from .registry import register_patch_set
from .rewrite import (
    NothingToFuse,
    _call,
    _Expressions,
    _modulated,
    _single_target,
    compile_rewritten,
    parse_function,
)
from .rewrite import make_helpers as block_helpers
from .routes import calls_plainly, handback, note_route, plain_rms_norm
from .spec import PatchSet, Spec, signature_drift

RMS_EPS = 1e-6  # the BFL RMSNorm's hard-coded epsilon
SDPA = "__flux_npu_ip_sdpa"
RMS = "__flux_npu_ip_rms"
LNMOD = "__flux_npu_xflux_lnmod"
GATED = "__flux_npu_xflux_gated"
# attribute names of a query/key norm (x-flux forks, diffusers-style and BFL QKNorm member names)
QK_NORM_NAME = re.compile(r"^(.*_)?(q|k|query|key)_norm$|^norm_(added_)?(q|k)$")
PROCESSORS = ("IPDoubleStreamBlockProcessor", "IPSingleStreamBlockProcessor", "DoubleStreamBlockProcessor",
              "SingleStreamBlockProcessor")
DOUBLE_PARAMS, SINGLE_PARAMS = ("self", "attn", "img", "txt", "vec", "pe"), ("self", "attn", "x", "vec", "pe")
CALL_PARAMS = {name: DOUBLE_PARAMS if "Double" in name else SINGLE_PARAMS for name in PROCESSORS}


class _IPCalls(ast.NodeTransformer):
    def __init__(self, attention: bool, norms: bool):
        self.attention, self.norms = attention, norms
        self.sdpa = self.rms = 0

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        is_sdpa = (isinstance(f, ast.Attribute) and f.attr == "scaled_dot_product_attention") or (
            isinstance(f, ast.Name) and f.id == "scaled_dot_product_attention")
        if self.attention and is_sdpa:
            self.sdpa += 1
            # the function expression itself is passed on: the helper checks at run time that it
            # is torch's SDPA (a user may have rebound F or the name) and calls it otherwise
            return ast.copy_location(ast.Call(func=ast.Name(id=SDPA, ctx=ast.Load()), args=[f, *node.args],
                                              keywords=node.keywords), node)
        if (
            self.norms and isinstance(f, ast.Attribute) and QK_NORM_NAME.match(f.attr)
            and len(node.args) == 1 and not node.keywords
        ):
            self.rms += 1
            return ast.copy_location(ast.Call(func=ast.Name(id=RMS, ctx=ast.Load()), args=[f, node.args[0]],
                                              keywords=[]), node)
        return node


def _norm_call(node):
    """`attn.N(X)` (any plain name before the dot: x-flux processors call the block `attn`) ->
    (the `attn.N` node, X), else None."""
    if (
        isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords
        and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
    ):
        return node.func, node.args[0]
    return None


def _merge_two_statement_adaln(body):
    """x-flux's `V = attn.N(X)` then `V = (1 + S) * V + T` (S and T not reading V) -> one
    `V = _lnmod(attn.N, X, T, S)`, within one statement list; returns (new body, count)."""
    out, n, i = [], 0, 0
    while i < len(body):
        s, nxt = body[i], body[i + 1] if i + 1 < len(body) else None
        v = _single_target(s)
        call = _norm_call(s.value) if v is not None else None
        if call is not None and nxt is not None and _single_target(nxt) == v:
            hit = _modulated(nxt.value, lambda a, v=v: isinstance(a, ast.Name) and a.id == v)
            reads_v = hit is not None and any(isinstance(t, ast.Name) and t.id == v
                                              for e in hit[1:] for t in ast.walk(e))
            if hit is not None and not reads_v:
                out.append(ast.copy_location(ast.Assign(targets=nxt.targets, value=_call(LNMOD, *call, hit[2], hit[1])),
                                             s))
                n += 1
                i += 2
                continue
        out.append(s)
        i += 1
    return out, n


def _bfl_rms_scale(norm, x):
    """The BFL RMSNorm form: an nn.Module with a 1-D `scale` over x's last dim and no `weight`."""
    scale = getattr(norm, "scale", None)
    return (
        isinstance(norm, torch.nn.Module) and type(norm).__name__.endswith("RMSNorm")
        and isinstance(scale, torch.Tensor) and scale.dim() == 1 and scale.shape[0] == x.shape[-1]
        and getattr(norm, "weight", None) is None and scale.device == x.device
    )


def _sdpa_fits(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, extra) -> str | None:
    """None when ops.attention computes exactly what this SDPA call asks for, else why not."""
    if extra:
        return f"unknown keyword argument(s) {sorted(extra)}"
    if dropout_p or is_causal or enable_gqa:
        return "dropout, is_causal or enable_gqa requested"
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return "q, k, v are not all 4-D (B, H, L, D) tensors"
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        return "q, k, v shapes are not (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, Dv)"
    if not (q.dtype == k.dtype == v.dtype):
        return "q, k, v dtypes differ"
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        return "attn_mask is not a tensor"
    return None


def make_helpers(backend, where: str, enabled):
    """The run-time helpers of a rewritten processor; an AdaLN op the user excluded keeps the plain
    expression (the rewrite touches both AdaLN kinds when either is on)."""

    def sdpa(fn, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
             **extra):
        why = None
        if fn is not torch.nn.functional.scaled_dot_product_attention:
            why = "the called function is not torch's scaled_dot_product_attention"
        else:
            why = _sdpa_fits(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, extra)
        if why is not None:
            handback("attention", backend, f"{where} IP attention: {why}")
            return fn(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                      enable_gqa=enable_gqa, **extra)
        note_route(f"{where} IP attention", "ops.attention")
        return ops.attention(query, key, value, mask=attn_mask, scale=scale, backend=backend)

    def rms(norm, x):
        if isinstance(x, torch.Tensor) and calls_plainly(norm):  # hooks run: the norm's own __call__
            if _bfl_rms_scale(norm, x):
                out = torch.promote_types(x.dtype, norm.scale.dtype)
                return ops.rms_norm(x, norm.scale, RMS_EPS, out_dtype=out, backend=backend)
            if plain_rms_norm(norm, x):  # a torch.nn.RMSNorm over the head dim, weight on x's device
                eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
                return ops.rms_norm(x, norm.weight, eps, backend=backend)
        handback("rms_norm", backend, f"{where} IP QK norm: neither a BFL RMSNorm (1-D scale) nor a "
                                      "torch.nn.RMSNorm over the head dim")
        return norm(x)

    # the AdaLN helpers are the block rewrite's own (one guard for both): the fused op where it
    # applies, else the expression as written, counted; an excluded op computes it plainly
    lnmod, gated = block_helpers(backend, where, enabled, None)[:2]

    return sdpa, rms, lnmod, gated


def rewrite_processor_call(original, backend, enabled, where: str):
    """`original` (a processor's __call__) with its SDPA and QK-norm calls routed to our ops."""
    fdef, first = parse_function(original)
    tx = _IPCalls(attention="attention" in enabled, norms="rms_norm" in enabled)
    fdef = tx.visit(fdef)
    n_ln = n_gated = 0
    if "layer_norm_modulate" in enabled:  # the two-statement form first: its second line is an inline form too
        fdef.body, n_ln = _merge_two_statement_adaln(fdef.body)
    if {"layer_norm_modulate", "gated_residual"} & enabled:
        # `(1 + S) * attn.N(X) + T` and gated residuals (x-flux's `ip_scale * ...` names no gate)
        ada = _Expressions(_norm_call, LNMOD, GATED)
        fdef = ada.visit(fdef)
        # an excluded op keeps its expression: the helper then computes it as written, counted nowhere
        n_ln += ada.ln if "layer_norm_modulate" in enabled else 0
        n_gated = ada.gated if "gated_residual" in enabled else 0
    if not (tx.sdpa or tx.rms or n_ln or n_gated):
        raise NothingToFuse("no scaled_dot_product_attention, QK-norm, LayerNorm+modulate or gated-residual "
                            "expression in its source")
    new = compile_rewritten(original, fdef, first, (SDPA, RMS, LNMOD, GATED),
                            make_helpers(backend, where, enabled))
    parts = []
    if tx.sdpa:
        parts.append(f"{tx.sdpa} IP attention call(s) (scaled_dot_product_attention) -> ops.attention")
    if tx.rms:
        parts.append(f"{tx.rms} IP QK norm(s) -> ops.rms_norm")
    if n_ln:
        parts.append(f"{n_ln} LayerNorm+modulate -> ops.layer_norm_modulate")
    if n_gated:
        parts.append(f"{n_gated} gated residual(s) -> ops.gated_residual")
    new.__flux_npu_what__ = ", ".join(parts) + " (rewritten in its own source; the rest as written)"
    return new


def _build(where):
    def build(original, backend, enabled):
        return rewrite_processor_call(original, backend, enabled, where)

    return build


def _defines_processor(module, name) -> bool:
    cls = vars(module).get(name)
    return (
        isinstance(cls, type) and cls.__module__ == module.__name__ and "__call__" in cls.__dict__
        and signature_drift(cls.__dict__["__call__"], DOUBLE_PARAMS) is None
    )


def looks_like_xflux_layers(module) -> bool:
    """x-flux's layers module (or a fork of it): defines DoubleStreamBlockProcessor with
    __call__(self, attn, img, txt, vec, pe, ...)."""
    return _defines_processor(module, "DoubleStreamBlockProcessor")


def looks_like_ip_only(module) -> bool:
    """A module of IP processors alone (a fork keeping them apart from the layers)."""
    return _defines_processor(module, "IPDoubleStreamBlockProcessor") and not looks_like_xflux_layers(module)


def _specs(names, required):
    # `required` is the symbol recognition relies on: not optional, so patch_module() (which applies
    # a set to a module holding one of its non-optional symbols) finds the module too
    return [Spec(f"{name}.__call__", _build(f"x-flux {name}"), "IP attention, IP QK norms, AdaLN -> our ops",
                 params=CALL_PARAMS[name], ops=("attention", "rms_norm", "layer_norm_modulate", "gated_residual"),
                 optional=name != required)
            for name in names]


# x-flux's LoRA processors (its training script and `set_lora` install them): nn.Modules whose
# `forward(self, attn, ...)` runs the block with LoRA deltas; their AdaLN and gated residuals are
# rewritten as the other processors' (the LoRA terms stay as written)
LORA_PROCESSORS = ("DoubleStreamBlockLoraProcessor", "SingleStreamBlockLoraProcessor")
LORA_SPECS = [Spec(f"{name}.forward", _build(f"x-flux {name}"), "AdaLN + gated residuals -> our ops",
                   params=DOUBLE_PARAMS if "Double" in name else SINGLE_PARAMS,
                   ops=("attention", "rms_norm", "layer_norm_modulate", "gated_residual"), optional=True)
              for name in LORA_PROCESSORS]


# by structure only (x-flux's own `flux.modules.layers` is found so too): a name match would also
# hit the reference BFL layers module, which has no processors
register_patch_set(PatchSet(target="bfl", matches=lambda name: False, recognise=looks_like_xflux_layers,
                            describe="x-flux block processors",
                            specs=[*_specs(PROCESSORS, "DoubleStreamBlockProcessor"), *LORA_SPECS]))
register_patch_set(PatchSet(target="bfl", matches=lambda name: False, recognise=looks_like_ip_only,
                            describe="x-flux IP-adapter processors",
                            # all optional: patch_module() (which ignores recognition) must not apply this
                            # set to a layers module as well, where the first set already patched them
                            specs=_specs(PROCESSORS[:2], None)))
