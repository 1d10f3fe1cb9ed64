"""Fusing AdaLN and gated residuals inside a block's own forward, by rewriting its source.

Flux blocks compute the AdaLN modulation and the gated residual inline, as tensor arithmetic
(`(1 + mod.scale) * self.img_norm1(img) + mod.shift`, `img + mod.gate * out`), so no module or
function can be swapped for them. Re-implementing whole block forwards would silently diverge
from each fork (ComfyUI, kohya, x-flux, diffusers versions). Instead the forward's own source is
parsed and only these expressions are replaced, everything else is kept as written:

- `(1 + S) * self.N(X) + T`, `self.N(X) * (1 + S) + T`, and the two-statement form
  `V = self.N(X)` followed by `V = (1 + S) * V + T` (or `V * (1 + S) + T`)
  -> `_lnmod(self.N, X, T, S)`: ops.layer_norm_modulate when `self.N` is a plain LayerNorm
  without affine parameters over the last dim, else the original expression.
- `X + G * Y` with G a gate (its text names a gate), and `V = G * Y` followed by `X = X + V`
  (V not read afterwards) -> `_gated(X, G, Y)`: ops.gated_residual when the shapes and dtypes
  allow (y has x's shape, one dtype), else the original expression.
- A gated residual `H = _gated(X, G, Y)` whose very next statement normalises H
  (`_lnmod(self.N, H, T, S)` anywhere in it: `V = ...` as diffusers' FluxTransformerBlock writes
  it, or inside the feed-forward call as BFL's DoubleStreamBlock does) -> `H, V = _adares(self.N,
  X, G, Y, T, S)` with the norm's call replaced by V (a fresh name when it was nested):
  ops.adaln_residual (one pass on cuda) when both parts would take their op, else the two
  helpers above, one after the other. T and S must not read H (they are evaluated before it).

The same machinery serves diffusers attention processors we have no hand-written replacement for
(FLUX.2, IP-adapter): `attn.norm_q(X)` and its siblings -> `_rms(attn.norm_q, X)` (ops.rms_norm
for a torch.nn.RMSNorm over the head dim), and `dispatch_attention_fn(...)` -> `_attention(...)`:
ops.attention in the (B, S, H, D) layout unless the user chose a diffusers attention backend
(or context parallelism), whose own dispatch then runs.

The rewritten function is compiled against the original module's globals (names still resolve
there, live) with its file and line numbers and the original's `from __future__` flags; a forward
whose source cannot be read, that is decorated, uses a closure (e.g. `super()`) or a private
(mangled) name, whose source file no longer compiles to the code that runs (edited after import),
or that contains none of these expressions is not touched (the builder raises NothingToFuse, which
the engine reports as a skipped row with the reason).

What legal code computes is kept: a gated temporary is dropped only when nothing can read it
after its statement pair (later in the function, after the `if` holding it, or in the next
iteration of a loop around it); helper arguments are passed by keyword in the order the original
expression evaluated them; the fused adaln_residual moves shift and scale before the rest of the
next statement, so it is used only where they are pure (names, attributes, subscripts, arithmetic);
and a norm with hooks or an instance `forward` is called through its `__call__` (calls_plainly).
"""

from __future__ import annotations

from .rewrite_compile import NothingToFuse, compile_rewritten, parse_function
from .rewrite_exprs import (
    ADARES,
    APPLY_MOD,
    ATTN,
    GATED,
    GATED_MOD,
    LN,
    LN_MOD,
    RMS,
    _ApplyMod,
    _call,
    _Expressions,
    _modulated,
    _ProcessorCalls,
)
from .rewrite_helpers import make_helpers
from .rewrite_stmts import _fuse_adaln_residual, _merge_apply_mod_pairs, _merge_pairs, _Reads, _single_target

# the rewrite's parts live in rewrite_exprs (expressions), rewrite_stmts (statement pairs),
# rewrite_helpers (run-time guards) and rewrite_compile (parse and compile); the names other
# patches import from here stay importable from here
__all__ = [
    "NothingToFuse", "_Expressions", "_call", "_modulated", "_single_target", "build_block_forward",
    "build_rewrite", "compile_rewritten", "make_helpers", "parse_function", "rewrite_function",
]


def rewrite_function(original, backend, enabled, where: str, kinds=("adaln",)):
    """The original function with the chosen kinds of expressions routed to our ops:
    "adaln" (LayerNorm+modulate and gated residuals) and "processor" (QK norms and
    dispatch_attention_fn calls of an attention processor)."""
    fn = original
    fdef, first = parse_function(fn)
    counts = {"ln": 0, "gated": 0, "rms": 0, "attn": 0, "adares": 0}
    if "adaln" in kinds:
        if APPLY_MOD in fn.__code__.co_names:  # ComfyUI's apply_mod form
            fdef.body = _merge_apply_mod_pairs(fdef.body, counts)
            mx = _ApplyMod()
            fdef = mx.visit(fdef)
            counts["ln"] += mx.ln
            counts["gated"] += mx.gated
        fdef.body = _merge_pairs(fdef.body, counts, _Reads(fdef))
        tx = _Expressions()
        fdef = tx.visit(fdef)
        counts["ln"] += tx.ln
        counts["gated"] += tx.gated
        if "layer_norm_modulate" in enabled and "gated_residual" in enabled:
            fdef.body = _fuse_adaln_residual(fdef.body, counts)
    if "processor" in kinds:
        px = _ProcessorCalls(norms=True, attention="dispatch_attention_fn" in fn.__globals__)
        fdef = px.visit(fdef)
        counts["rms"], counts["attn"] = px.rms, px.attn
    for key, op in (("ln", "layer_norm_modulate"), ("gated", "gated_residual"), ("rms", "rms_norm"),
                    ("attn", "attention"), ("adares", "layer_norm_modulate")):
        if op not in enabled:
            counts[key] = 0
    if not any(counts.values()):
        raise NothingToFuse("no expression we fuse (LayerNorm+modulate, gated residual, QK norm, attention call) "
                            "in its source")
    helpers = make_helpers(backend, where, enabled, fn.__globals__.get("dispatch_attention_fn"))
    new = compile_rewritten(original, fdef, first, (LN, GATED, RMS, ATTN, ADARES, LN_MOD, GATED_MOD), helpers)
    parts = []
    for key, text in (("adares", "gated residual + LayerNorm+modulate -> ops.adaln_residual"),
                      ("ln", "LayerNorm+modulate -> ops.layer_norm_modulate"),
                      ("gated", "gated residual(s) -> ops.gated_residual"),
                      ("rms", "QK norm(s) -> ops.rms_norm"),
                      ("attn", "attention call(s) -> ops.attention (a diffusers backend the user chose: "
                               "dispatch_attention_fn)")):
        if counts[key]:
            parts.append(f"{counts[key]} {text}")
    new.__flux_npu_what__ = ", ".join(parts) + " (rewritten in its own source; the rest as written)"
    return new


def build_rewrite(where, kinds=("adaln",)):
    """A Spec builder rewriting a block forward or a processor (see module doc); `where` names it
    in hand-back reasons and routes."""

    def build(original, backend, enabled):
        return rewrite_function(original, backend, enabled, where, kinds)

    return build


def build_block_forward(where):
    return build_rewrite(where, ("adaln",))
