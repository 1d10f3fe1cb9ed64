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

The rewritten function is compiled against the original module's globals (names still resolve
there, live) with its file and line numbers; a forward whose source cannot be read, that is
decorated, uses a closure (e.g. `super()`), or contains none of these expressions is not touched
(the builder raises NothingToFuse, which the engine reports as a skipped row with the reason).
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import torch

from .. import ops
from .engine import handback

LN = "__flux_npu_lnmod"
GATED = "__flux_npu_gated"


class NothingToFuse(Exception):
    """The forward has no LayerNorm+modulate or gated-residual expression we rewrite."""


def _is_one_plus(node):
    """`1 + S` (or `S + 1`) -> S, else None."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        for a, b in ((node.left, node.right), (node.right, node.left)):
            if isinstance(a, ast.Constant) and a.value == 1:
                return b
    return None


def _self_call(node):
    """`self.N(X)` -> (the `self.N` node, X), else None."""
    if (
        isinstance(node, ast.Call)
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
    ):
        return node.func, node.args[0]
    return None


def _modulated(node, inner):
    """`(1 + S) * A + T` or `A * (1 + S) + T` where inner(A) holds -> (A, S, T), else None."""
    if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)):
        return None
    mul, shift = node.left, node.right
    if not (isinstance(mul, ast.BinOp) and isinstance(mul.op, ast.Mult)):
        return None
    for a, b in ((mul.left, mul.right), (mul.right, mul.left)):
        scale = _is_one_plus(a)
        if scale is not None and inner(b):
            return b, scale, shift
    return None


def _is_gate(node) -> bool:
    return "gate" in ast.unparse(node).lower()


def _gated(node):
    """`X + G * Y` with a gate G -> (X, G, Y), else None."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        mul = node.right
        if isinstance(mul, ast.BinOp) and isinstance(mul.op, ast.Mult) and _is_gate(mul.left):
            return node.left, mul.left, mul.right
    return None


def _call(name, *args):
    return ast.Call(func=ast.Name(id=name, ctx=ast.Load()), args=list(args), keywords=[])


class _Expressions(ast.NodeTransformer):
    def __init__(self):
        self.ln = self.gated = 0

    def visit_BinOp(self, node):
        self.generic_visit(node)
        hit = _modulated(node, lambda a: _self_call(a) is not None)
        if hit is not None:
            norm, x = _self_call(hit[0])
            self.ln += 1
            return ast.copy_location(_call(LN, norm, x, hit[2], hit[1]), node)
        hit = _gated(node)
        if hit is not None:
            self.gated += 1
            return ast.copy_location(_call(GATED, *hit), node)
        return node


def _single_target(stmt):
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    return None


def _loads(stmts, name) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)
               for s in stmts for n in ast.walk(s))


def _merge_pairs(body, counts):
    """The two-statement forms, within one statement list (recursing into nested blocks)."""
    out, i = [], 0
    while i < len(body):
        s = body[i]
        for field in ("body", "orelse", "finalbody"):
            if isinstance(getattr(s, field, None), list) and not isinstance(s, ast.FunctionDef):
                setattr(s, field, _merge_pairs(getattr(s, field), counts))
        nxt = body[i + 1] if i + 1 < len(body) else None
        v = _single_target(s)
        if v is not None and nxt is not None and _single_target(nxt) == v:
            call = _self_call(s.value)
            hit = _modulated(nxt.value, lambda a: isinstance(a, ast.Name) and a.id == v) if call else None
            if hit is not None and not _loads([hit[1], hit[2]], v):
                new = ast.Assign(targets=nxt.targets, value=_call(LN, call[0], call[1], hit[2], hit[1]))
                out.append(ast.copy_location(new, s))
                counts["ln"] += 1
                i += 2
                continue
        if (
            v is not None and nxt is not None
            and isinstance(s.value, ast.BinOp) and isinstance(s.value.op, ast.Mult) and _is_gate(s.value.left)
        ):
            x = _single_target(nxt)
            add = nxt.value
            if (
                x is not None and isinstance(add, ast.BinOp) and isinstance(add.op, ast.Add)
                and isinstance(add.right, ast.Name) and add.right.id == v
                and not _loads([add.left], v)
                and (x == v or not _loads(body[i + 2:], v))
            ):
                new = ast.Assign(targets=nxt.targets, value=_call(GATED, add.left, s.value.left, s.value.right))
                out.append(ast.copy_location(new, s))
                counts["gated"] += 1
                i += 2
                continue
        out.append(s)
        i += 1
    return out


def _plain_ln(norm, x) -> bool:
    return (
        type(norm) is torch.nn.LayerNorm
        and norm.weight is None
        and norm.bias is None
        and tuple(norm.normalized_shape) == (x.shape[-1],)
    )


def _broadcasts_to(t, x) -> bool:
    if not isinstance(t, torch.Tensor) or t.shape[-1] != x.shape[-1] or t.dim() > x.dim():
        return False
    try:
        return torch.broadcast_shapes(t.shape, x.shape) == x.shape
    except RuntimeError:
        return False


def make_helpers(backend, where: str):
    """The two run-time helpers the rewritten forward calls; each takes the fused op when it
    applies and computes the original expression (and counts a hand-back) when it does not."""

    def lnmod(norm, x, shift, scale):
        if (
            isinstance(x, torch.Tensor) and _plain_ln(norm, x) and _broadcasts_to(shift, x) and _broadcasts_to(scale, x)
            and shift.dtype == scale.dtype == x.dtype
        ):
            return ops.layer_norm_modulate(x, shift, scale, norm.eps, backend=backend)
        handback("layer_norm_modulate", backend, f"{where}: not a plain LayerNorm + same-dtype modulation")
        return (1 + scale) * norm(x) + shift

    def gated(x, gate, y):
        if (
            isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and isinstance(gate, torch.Tensor)
            and y.shape == x.shape and x.dtype == y.dtype == gate.dtype and _broadcasts_to(gate, x)
        ):
            return ops.gated_residual(x, gate, y, backend=backend)
        handback("gated_residual", backend, f"{where}: shapes or dtypes of x + gate * y differ")
        return x + gate * y

    return lnmod, gated


def rewrite_forward(original, backend, enabled, where: str):
    """The original function with its AdaLN / gated-residual expressions routed to our ops."""
    fn = original
    if fn.__code__.co_freevars:
        raise NothingToFuse(f"uses a closure ({', '.join(fn.__code__.co_freevars)}): not rewritten")
    try:
        lines, first = inspect.getsourcelines(fn)
    except (OSError, TypeError) as exc:
        raise NothingToFuse(f"source not readable ({exc})") from exc
    tree = ast.parse(textwrap.dedent("".join(lines)))
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef) or fdef.decorator_list:
        raise NothingToFuse("decorated or not a plain function: not rewritten")
    counts = {"ln": 0, "gated": 0}
    fdef.body = _merge_pairs(fdef.body, counts)
    tx = _Expressions()
    fdef = tx.visit(fdef)
    counts["ln"] += tx.ln
    counts["gated"] += tx.gated
    if "layer_norm_modulate" not in enabled:
        counts["ln"] = 0
    if "gated_residual" not in enabled:
        counts["gated"] = 0
    if not counts["ln"] and not counts["gated"]:
        raise NothingToFuse("no LayerNorm+modulate or gated-residual expression in its source")
    # route the disabled kind back to plain arithmetic: the helper names still appear in the tree
    lnmod, gated = make_helpers(backend, where)
    if "layer_norm_modulate" not in enabled:
        def lnmod(norm, x, shift, scale):
            return (1 + scale) * norm(x) + shift
    if "gated_residual" not in enabled:
        def gated(x, gate, y):
            return x + gate * y
    maker = ast.FunctionDef(
        name="__flux_npu_make", args=ast.arguments(posonlyargs=[], args=[ast.arg(LN), ast.arg(GATED)], kwonlyargs=[],
                                                    kw_defaults=[], defaults=[]),
        body=[fdef, ast.Return(ast.Name(id=fdef.name, ctx=ast.Load()))], decorator_list=[], returns=None,
    )
    if "type_params" in ast.FunctionDef._fields:  # Python 3.12+
        maker.type_params = []
    module = ast.Module(body=[maker], type_ignores=[])
    ast.fix_missing_locations(module)
    ast.increment_lineno(module, first - 1)
    code = compile(module, inspect.getsourcefile(fn) or "<flux_npu rewrite>", "exec")
    scope: dict = {}
    exec(code, fn.__globals__, scope)  # defines only __flux_npu_make in `scope`, not in the module
    new = scope["__flux_npu_make"](lnmod, gated)
    new.__defaults__ = fn.__defaults__
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__wrapped_original__ = original
    new.__flux_npu_fused__ = (counts["ln"], counts["gated"])
    parts = []
    if counts["ln"]:
        parts.append(f"{counts['ln']} LayerNorm+modulate -> ops.layer_norm_modulate")
    if counts["gated"]:
        parts.append(f"{counts['gated']} gated residual(s) -> ops.gated_residual")
    new.__flux_npu_what__ = ", ".join(parts) + " (rewritten in its own source; the rest as written)"
    return new


def build_block_forward(where):
    """A Spec builder rewriting a block forward (see module doc); `where` names it in hand-backs."""

    def build(original, backend, enabled):
        return rewrite_forward(original, backend, enabled, where)

    return build
