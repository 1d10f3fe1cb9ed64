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

import ast
import copy
import inspect
import textwrap
import types

import torch

from .. import ops
from .routes import (
    backend_name,
    calls_plainly,
    handback,
    key_padding_mask,
    note_route,
    rms_module,
    user_attention_backend,
)

LN = "__flux_npu_lnmod"
GATED = "__flux_npu_gated"
RMS = "__flux_npu_rms"
ATTN = "__flux_npu_attention"
ADARES = "__flux_npu_adares"
ADARES_OUT = "__flux_npu_normed"
LN_MOD = "__flux_npu_lnmod_apply_mod"
GATED_MOD = "__flux_npu_gated_apply_mod"
APPLY_MOD = "apply_mod"  # ComfyUI's modulation helper: apply_mod(tensor, m_mult, m_add=None, modulation_dims=None)
QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


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


def _scale_first(node) -> bool:
    """In a `_modulated` hit, whether `1 + S` is written (so evaluated) before the normed operand."""
    return _is_one_plus(node.left.left) is not None


def _is_gate(node) -> bool:
    """A gate: a name, attribute, subscript or call (`mod.gate`, `gate_msa.unsqueeze(1)`) whose text
    names a gate. Not a product: in x-flux's LoRA form `X + G * A + G * B * w` the last term's
    `G * B` is not a gate of `w`."""
    return isinstance(node, (ast.Name, ast.Attribute, ast.Subscript, ast.Call)) and "gate" in ast.unparse(node).lower()


def _gated(node):
    """`X + G * Y` with a gate G -> (X, G, Y), else None."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        mul = node.right
        if isinstance(mul, ast.BinOp) and isinstance(mul.op, ast.Mult) and _is_gate(mul.left):
            return node.left, mul.left, mul.right
    return None


def _call(name, *args):
    return ast.Call(func=ast.Name(id=name, ctx=ast.Load()), args=list(args), keywords=[])


def _kwcall(name, *pairs):
    """`name(k1=v1, k2=v2, ...)`: keyword arguments run in the order written, so the pairs are given
    in the order the original expression evaluated them (a shift computed by a call with side
    effects, or drawing random numbers, still runs after the scale when it did before)."""
    return ast.Call(func=ast.Name(id=name, ctx=ast.Load()), args=[],
                    keywords=[ast.keyword(arg=k, value=v) for k, v in pairs])


def _ln_call(norm, x, shift, scale, scale_first):
    """The _lnmod call for `(1 + S) * N(X) + T` (scale_first) or `N(X) * (1 + S) + T`."""
    first = ([("scale", scale), ("norm", norm), ("x", x)] if scale_first
             else [("norm", norm), ("x", x), ("scale", scale)])
    return _kwcall(LN, *first, ("shift", shift))


def call_args(node) -> dict:
    """{parameter: expression} of a helper call built by _kwcall (or positionally by _call)."""
    return {k.arg: k.value for k in node.keywords}


class _Expressions(ast.NodeTransformer):
    """`(1 + S) * N(X) + T` with N matched by `norm_call` (default `self.N`) -> `ln_name(N, X, T, S)`;
    `X + G * Y` with a gate G -> `gated_name(X, G, Y)`. Counts each kind."""

    def __init__(self, norm_call=_self_call, ln_name=LN, gated_name=GATED):
        self.norm_call, self.ln_name, self.gated_name = norm_call, ln_name, gated_name
        self.ln = self.gated = 0

    def visit_BinOp(self, node):
        self.generic_visit(node)
        hit = _modulated(node, lambda a: self.norm_call(a) is not None)
        if hit is not None:
            norm, x = self.norm_call(hit[0])
            self.ln += 1
            call = _ln_call(norm, x, hit[2], hit[1], _scale_first(node))
            call.func.id = self.ln_name
            return ast.copy_location(call, node)
        hit = _gated(node)
        if hit is not None:
            self.gated += 1
            return ast.copy_location(_kwcall(self.gated_name, *zip(("x", "gate", "y"), hit, strict=True)), node)
        return node


class _ProcessorCalls(ast.NodeTransformer):
    """In an attention processor: `attn.norm_q(X)` (and norm_k / norm_added_q / norm_added_k)
    -> `_rms(attn.norm_q, X)`; `dispatch_attention_fn(...)` -> `_attention(...)`, same arguments."""

    def __init__(self, norms: bool, attention: bool):
        self.norms, self.attention = norms, attention
        self.rms = self.attn = 0

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        if (
            self.norms and isinstance(f, ast.Attribute) and f.attr in QK_NORMS and isinstance(f.value, ast.Name)
            and len(node.args) == 1 and not node.keywords
        ):
            self.rms += 1
            return ast.copy_location(_call(RMS, f, node.args[0]), node)
        if self.attention and isinstance(f, ast.Name) and f.id == "dispatch_attention_fn":
            self.attn += 1
            return ast.copy_location(ast.Call(func=ast.Name(id=ATTN, ctx=ast.Load()), args=node.args,
                                              keywords=node.keywords), node)
        return node


def _apply_mod_call(node):
    """`apply_mod(A, M, ADD[, D])` (ComfyUI) -> (A, M, ADD, D-or-None node), else None."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == APPLY_MOD
            and not node.keywords and len(node.args) in (3, 4)):
        return None
    a, m, add = node.args[:3]
    return a, m, add, node.args[3] if len(node.args) == 4 else ast.Constant(value=None)


def _is_none(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


class _ApplyMod(ast.NodeTransformer):
    """ComfyUI's AdaLN written with apply_mod: `apply_mod(self.N(X), (1 + S), T, D)` ->
    `LN_MOD(apply_mod, self.N, X, T, S, D)`; `H += apply_mod(Y, G, None, D)` with a gate G ->
    `H = GATED_MOD(apply_mod, H, G, Y, D, True)` (in place, as written, when it hands back) and
    `X + apply_mod(Y, G, None, D)` -> `GATED_MOD(apply_mod, X, G, Y, D, False)`. The helpers fuse
    only where D (modulation_dims) is None at run time."""

    def __init__(self):
        self.ln = self.gated = 0

    def _gate_call(self, node):
        hit = _apply_mod_call(node)
        if hit is not None and _is_none(hit[2]) and _is_gate(hit[1]):
            return hit
        return None

    def visit_Call(self, node):
        self.generic_visit(node)
        hit = _apply_mod_call(node)
        if hit is not None:
            scale = _is_one_plus(hit[1])
            call = _self_call(hit[0])
            if scale is not None and call is not None and not _is_none(hit[2]):
                self.ln += 1
                # keywords in the order apply_mod(self.N(X), 1 + S, T, D) evaluates them
                return ast.copy_location(
                    _kwcall(LN_MOD, ("apply_mod", ast.Name(id=APPLY_MOD, ctx=ast.Load())), ("norm", call[0]),
                            ("x", call[1]), ("scale", scale), ("shift", hit[2]), ("dims", hit[3])),
                    node)
        return node

    def visit_AugAssign(self, node):
        self.generic_visit(node)
        hit = self._gate_call(node.value)
        if isinstance(node.op, ast.Add) and isinstance(node.target, ast.Name) and hit is not None:
            self.gated += 1
            x = ast.Name(id=node.target.id, ctx=ast.Load())
            value = _kwcall(GATED_MOD, ("apply_mod", ast.Name(id=APPLY_MOD, ctx=ast.Load())), ("x", x),
                            ("y", hit[0]), ("gate", hit[1]), ("dims", hit[3]), ("inplace", ast.Constant(value=True)))
            return ast.copy_location(ast.Assign(targets=[ast.Name(id=node.target.id, ctx=ast.Store())],
                                                value=value), node)
        return node

    def visit_BinOp(self, node):
        self.generic_visit(node)
        hit = self._gate_call(node.right) if isinstance(node.op, ast.Add) else None
        if hit is not None:
            self.gated += 1
            return ast.copy_location(_kwcall(GATED_MOD, ("apply_mod", ast.Name(id=APPLY_MOD, ctx=ast.Load())),
                                             ("x", node.left), ("y", hit[0]), ("gate", hit[1]), ("dims", hit[3]),
                                             ("inplace", ast.Constant(value=False))), node)
        return node


def _merge_apply_mod_pairs(body, counts):
    """`V = self.N(X)` then `V = apply_mod(V, (1 + S), T, D)` -> `V = LN_MOD(apply_mod, self.N, X, T, S, D)`."""
    out, i = [], 0
    while i < len(body):
        s = body[i]
        for field in ("body", "orelse", "finalbody"):
            if isinstance(getattr(s, field, None), list) and not isinstance(s, ast.FunctionDef):
                setattr(s, field, _merge_apply_mod_pairs(getattr(s, field), counts))
        nxt = body[i + 1] if i + 1 < len(body) else None
        v = _single_target(s)
        call = _self_call(s.value) if v is not None else None
        hit = _apply_mod_call(nxt.value) if call is not None and _single_target(nxt) == v else None
        if (
            hit is not None and isinstance(hit[0], ast.Name) and hit[0].id == v and not _is_none(hit[2])
            and _is_one_plus(hit[1]) is not None and not _loads([hit[1], hit[2], hit[3]], v)
        ):
            new = ast.Assign(targets=nxt.targets, value=_kwcall(
                LN_MOD, ("apply_mod", ast.Name(id=APPLY_MOD, ctx=ast.Load())), ("norm", call[0]), ("x", call[1]),
                ("scale", _is_one_plus(hit[1])), ("shift", hit[2]), ("dims", hit[3])))
            out.append(ast.copy_location(new, s))
            counts["ln"] += 1
            i += 2
            continue
        out.append(s)
        i += 1
    return out


def _single_target(stmt):
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    return None


def _loads(stmts, name) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)
               for s in stmts for n in ast.walk(s))


_LOOPS = (ast.For, ast.AsyncFor, ast.While)


class _Reads:
    """Where each name is read (or deleted) in a function, and which loops enclose each statement:
    enough to tell whether a temporary the rewrite drops can be read again after its statement pair
    (later in the source, after the `if` or `for` holding the pair, or by the next loop iteration)."""

    def __init__(self, fdef):
        self.uses, self.loops = {}, {}
        self.scoped = {n for node in ast.walk(fdef) if isinstance(node, (ast.Global, ast.Nonlocal))
                       for n in node.names}
        for node in ast.walk(fdef):
            if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Load, ast.Del)):
                self.uses.setdefault(node.id, []).append(node)
        self._walk(fdef.body, ())

    def _walk(self, body, loops):
        for s in body:
            self.loops[id(s)] = loops
            inner = (*loops, s) if isinstance(s, _LOOPS) else loops
            for field in ("body", "orelse", "finalbody", "handlers"):
                sub = getattr(s, field, None)
                if isinstance(sub, list) and not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    self._walk(sub, inner)

    def read_later(self, name, first, last) -> bool:
        """Whether `name`, assigned in statement `first`, can be read outside the pair first..last."""
        if name in self.scoped:
            return True
        inside = {id(n) for st in (first, last) for n in ast.walk(st)}
        end = (last.end_lineno, last.end_col_offset)
        loops = self.loops.get(id(first), ())
        in_loop = {id(n) for loop in loops for n in ast.walk(loop)}
        return any(id(u) not in inside and ((u.lineno, u.col_offset) > end or id(u) in in_loop)
                   for u in self.uses.get(name, ()))


def _merge_pairs(body, counts, reads):
    """The two-statement forms, within one statement list (recursing into nested blocks)."""
    out, i = [], 0
    while i < len(body):
        s = body[i]
        for field in ("body", "orelse", "finalbody"):
            if isinstance(getattr(s, field, None), list) and not isinstance(s, ast.FunctionDef):
                setattr(s, field, _merge_pairs(getattr(s, field), counts, reads))
        for h in getattr(s, "handlers", None) or ():
            h.body = _merge_pairs(h.body, counts, reads)
        nxt = body[i + 1] if i + 1 < len(body) else None
        v = _single_target(s)
        if v is not None and nxt is not None and _single_target(nxt) == v:
            call = _self_call(s.value)
            hit = _modulated(nxt.value, lambda a, v=v: isinstance(a, ast.Name) and a.id == v) if call else None
            if hit is not None and not _loads([hit[1], hit[2]], v):
                # N(X) ran first, then the second statement: S before T in both forms
                new = ast.Assign(targets=nxt.targets, value=_kwcall(LN, ("norm", call[0]), ("x", call[1]),
                                                                    ("scale", hit[1]), ("shift", hit[2])))
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
                and (x == v or not reads.read_later(v, s, nxt))
            ):
                # G * Y ran first, then X was read
                new = ast.Assign(targets=nxt.targets, value=_kwcall(GATED, ("gate", s.value.left),
                                                                    ("y", s.value.right), ("x", add.left)))
                out.append(ast.copy_location(new, s))
                counts["gated"] += 1
                i += 2
                continue
        out.append(s)
        i += 1
    return out


def _helper_call(node, name):
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name


# statements whose expressions always run, in full, once
_SIMPLE = (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Expr, ast.Return)
# expressions whose parts may run conditionally, more than once, or in another scope
_CONDITIONAL = (ast.IfExp, ast.BoolOp, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _unconditional(node):
    """The nodes below `node` that run whenever it runs (not inside a conditional, lambda or comprehension)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _CONDITIONAL):
            continue
        yield child
        yield from _unconditional(child)


def _pure(node) -> bool:
    """An expression of names, attributes, subscripts, constants and arithmetic only (no call, walrus,
    await or yield): evaluating it earlier or later computes the same and does nothing else."""
    return all(isinstance(n, (ast.Name, ast.Attribute, ast.Subscript, ast.Slice, ast.Constant, ast.Tuple,
                              ast.UnaryOp, ast.unaryop, ast.BinOp, ast.operator, ast.expr_context))
               for n in ast.walk(node))


def _fuse_adaln_residual(body, counts):
    """`H = _gated(X, G, Y)` then a statement holding `_lnmod(N, H, T, S)` -> `H, V = _adares(X, G, Y,
    N, T, S)` and that statement with the _lnmod call replaced by V (recursing into blocks). The
    fused call evaluates T and S before the rest of the second statement, so both must be pure."""
    out, i = [], 0
    while i < len(body):
        s = body[i]
        for field in ("body", "orelse", "finalbody"):
            if isinstance(getattr(s, field, None), list) and not isinstance(s, ast.FunctionDef):
                setattr(s, field, _fuse_adaln_residual(getattr(s, field), counts))
        for hd in getattr(s, "handlers", None) or ():
            hd.body = _fuse_adaln_residual(hd.body, counts)
        h = _single_target(s)
        nxt = body[i + 1] if i + 1 < len(body) else None
        if h is not None and isinstance(nxt, _SIMPLE) and _helper_call(s.value, GATED):
            ln = next((n for n in _unconditional(nxt) if _helper_call(n, LN)
                       and isinstance(call_args(n).get("x"), ast.Name) and call_args(n)["x"].id == h), None)
            parts = call_args(ln) if ln is not None else {}
            if (
                ln is not None and not _loads([parts["norm"], parts["shift"], parts["scale"]], h)
                and _pure(parts["norm"]) and _pure(parts["shift"]) and _pure(parts["scale"])
            ):
                v = _single_target(nxt) if nxt.value is ln else None
                if v is None or v == h:
                    v = f"{ADARES_OUT}{counts['adares']}"
                gated = call_args(s.value)  # x, gate, y in the order the original evaluated them
                ln_order = [k for k in call_args(ln) if k in ("shift", "scale")]
                fused = ast.Assign(
                    targets=[ast.Tuple(elts=[ast.Name(id=h, ctx=ast.Store()), ast.Name(id=v, ctx=ast.Store())],
                                       ctx=ast.Store())],
                    value=_kwcall(ADARES, *gated.items(), ("norm", parts["norm"]),
                                  *((k, parts[k]) for k in ln_order)),
                )
                out.append(ast.copy_location(fused, s))
                if nxt.value is not ln or _single_target(nxt) != v:
                    out.append(_Replace(ln, ast.Name(id=v, ctx=ast.Load())).visit(nxt))
                counts["adares"] += 1
                counts["ln"] -= 1
                counts["gated"] -= 1
                i += 2
                continue
        out.append(s)
        i += 1
    return out


class _Replace(ast.NodeTransformer):
    def __init__(self, old, new):
        self.old, self.new = old, new

    def visit(self, node):
        if node is self.old:
            return ast.copy_location(self.new, node)
        return super().visit(node)


def _plain_ln(norm, x) -> bool:
    return (
        type(norm) is torch.nn.LayerNorm
        and calls_plainly(norm)
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


def make_helpers(backend, where: str, enabled, dispatch=None):
    """The run-time helpers the rewritten function calls; each takes the fused op when it applies
    and computes what the original expression computes (counting a hand-back) when it does not.
    An op the user excluded (patch(exclude=...)) gets the plain original expression."""
    use_ln, use_gated = "layer_norm_modulate" in enabled, "gated_residual" in enabled
    use_rms, use_attn = "rms_norm" in enabled, "attention" in enabled

    def ln_ok(norm, x, shift, scale):
        return (
            isinstance(x, torch.Tensor) and _plain_ln(norm, x) and _broadcasts_to(shift, x)
            and _broadcasts_to(scale, x) and shift.dtype == scale.dtype == x.dtype
        )

    def gated_ok(x, gate, y):
        return (
            isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and isinstance(gate, torch.Tensor)
            and y.shape == x.shape and x.dtype == y.dtype == gate.dtype and _broadcasts_to(gate, x)
        )

    def lnmod(norm, x, shift, scale):
        if use_ln and ln_ok(norm, x, shift, scale):
            return ops.layer_norm_modulate(x, shift, scale, norm.eps, backend=backend)
        if use_ln:
            handback("layer_norm_modulate", backend, f"{where}: not a plain LayerNorm (without hooks or an instance "
                                                     "forward) + same-dtype modulation")
        return (1 + scale) * norm(x) + shift

    def gated(x, gate, y):
        if use_gated and gated_ok(x, gate, y):
            return ops.gated_residual(x, gate, y, backend=backend)
        if use_gated:
            handback("gated_residual", backend, f"{where}: shapes or dtypes of x + gate * y differ")
        return x + gate * y

    def adares(norm, x, gate, y, shift, scale):
        # the fused op where both halves would take theirs (h has x's shape and dtype, so the
        # norm's conditions read on x hold for h); else each half decides on its own
        if use_ln and use_gated and gated_ok(x, gate, y) and ln_ok(norm, x, shift, scale):
            return ops.adaln_residual(x, gate, y, shift, scale, norm.eps, backend=backend)
        h = gated(x, gate, y)
        return h, lnmod(norm, h, shift, scale)

    def rms(norm, x):
        return rms_module(norm, x, backend, where, use_rms)

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                  attention_kwargs=None, *, backend=None, parallel_config=None):
        chosen = user_attention_backend(types.SimpleNamespace(_attention_backend=backend))
        if use_attn and chosen is None and parallel_config is None:
            if dropout_p == 0.0 and not is_causal and not enable_gqa and not attention_kwargs:
                mask = key_padding_mask(attn_mask)
                note_route(f"{where} attention", "ops.attention")
                return ops.attention(query, key, value, mask=mask, scale=scale, layout="BSHD", backend=ops_backend)
            handback("attention", ops_backend, f"{where}: dropout, causal, GQA or attention_kwargs requested")
        note_route(f"{where} attention", f"diffusers dispatch_attention_fn ({backend_name(chosen)})")
        return dispatch(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa, attention_kwargs=attention_kwargs, backend=backend,
                        parallel_config=parallel_config)

    def lnmod_apply_mod(apply_mod, norm, x, shift, scale, dims):
        if dims is None and use_ln and ln_ok(norm, x, shift, scale):
            return ops.layer_norm_modulate(x, shift, scale, norm.eps, backend=backend)
        if use_ln:
            handback("layer_norm_modulate", backend, f"{where}: modulation_dims set (per-segment modulation)"
                     if dims is not None else f"{where}: not a plain LayerNorm + same-dtype modulation")
        return apply_mod(norm(x), (1 + scale), shift, dims)

    def gated_apply_mod(apply_mod, x, gate, y, dims, inplace):
        if dims is None and use_gated and gated_ok(x, gate, y):
            return ops.gated_residual(x, gate, y, backend=backend)
        if use_gated:
            handback("gated_residual", backend, f"{where}: modulation_dims set (per-segment modulation)"
                     if dims is not None else f"{where}: shapes or dtypes of x + gate * y differ")
        if inplace:  # `x += apply_mod(...)` as written: x is changed in place
            x += apply_mod(y, gate, None, dims)
            return x
        return x + apply_mod(y, gate, None, dims)

    ops_backend = backend
    return lnmod, gated, rms, attention, adares, lnmod_apply_mod, gated_apply_mod


def parse_function(fn):
    """(the FunctionDef of fn's own source, its first line number) for a plain function we may
    rewrite; NothingToFuse (a skipped row) for a closure, unreadable source or a decorated one."""
    if fn.__code__.co_freevars:
        raise NothingToFuse(f"uses a closure ({', '.join(fn.__code__.co_freevars)}): not rewritten")
    try:
        lines, first = inspect.getsourcelines(fn)
    except (OSError, TypeError) as exc:
        raise NothingToFuse(f"source not readable ({exc})") from exc
    fdef = ast.parse(textwrap.dedent("".join(lines))).body[0]
    if not isinstance(fdef, ast.FunctionDef) or fdef.decorator_list:
        raise NothingToFuse("decorated or not a plain function: not rewritten")
    private = sorted({n for n in _identifiers(fdef) if n.startswith("__") and not n.endswith("__")})
    if private:
        # Python mangles `self.__k` to `self._Cls__k` when it compiles the class body; the rewrite
        # compiles the function outside its class, where the name would stay `__k`
        raise NothingToFuse(f"uses private name(s) {', '.join(private)} (mangled inside its class): not rewritten")
    if not _same_code(_compile_in_maker(fn, copy.deepcopy(fdef), first, ()), fn.__code__):
        raise NothingToFuse(f"its source file {inspect.getsourcefile(fn)} no longer holds the code that runs "
                            "(edited after import?): not rewritten")
    return fdef, first


def _identifiers(tree):
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            yield n.id
        elif isinstance(n, ast.Attribute):
            yield n.attr
        elif isinstance(n, ast.arg):
            yield n.arg
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield n.name
        elif isinstance(n, ast.alias):
            yield n.asname or n.name
        elif isinstance(n, ast.keyword) and n.arg:
            yield n.arg


# the compiler picks between these by context (a method vs a nested function) for the same source
_SAME_OP = {"LOAD_METHOD": "LOAD_ATTR"}


def _instructions(code):
    import dis

    ins = list(dis.get_instructions(code))
    index = {i.offset: n for n, i in enumerate(ins)}
    jumps = set(dis.hasjrel) | set(dis.hasjabs)

    def arg(i):
        if isinstance(i.argval, types.CodeType):
            return "<code>"
        if i.opcode in jumps:  # offsets differ with the cache sizes of the two forms above: compare targets
            return f"-> {index.get(i.argval, i.argval)}"
        # "NULL + torch" vs "torch": whether a NULL is pushed for the call that follows, the same choice
        return i.argrepr.replace("NULL|self + ", "").replace("NULL + ", "")

    return [(_SAME_OP.get(i.opname, i.opname), arg(i)) for i in ins]


def _same_code(a, b) -> bool:
    """Whether two code objects do the same: instructions, names, constants (nested code compared the
    same way)."""
    if not (a.co_names == b.co_names and a.co_varnames == b.co_varnames
            and a.co_argcount == b.co_argcount and a.co_kwonlyargcount == b.co_kwonlyargcount
            and a.co_posonlyargcount == b.co_posonlyargcount and len(a.co_consts) == len(b.co_consts)
            and _instructions(a) == _instructions(b)):
        return False
    for x, y in zip(a.co_consts, b.co_consts, strict=True):
        if isinstance(x, types.CodeType) and isinstance(y, types.CodeType):
            if not _same_code(x, y):
                return False
        elif type(x) is not type(y) or repr(x) != repr(y):
            return False
    return True


def _future_flags(code) -> int:
    """The `from __future__` compiler flags the original was compiled with (not this module's)."""
    import __future__

    return sum(f.compiler_flag for f in (getattr(__future__, n) for n in __future__.all_feature_names)
               if code.co_flags & f.compiler_flag)


def _compile_in_maker(original, fdef, first: int, helper_names):
    """Compile `fdef` inside a maker function taking `helper_names` as arguments (so the helpers are
    closure variables, not module globals), with the original's file, line numbers and future flags;
    returns the maker's code object's inner function code."""
    maker = _maker(fdef, first, helper_names)
    code = compile(maker, inspect.getsourcefile(original) or "<flux_npu rewrite>", "exec",
                   flags=_future_flags(original.__code__), dont_inherit=True)
    make = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    return next(c for c in make.co_consts if isinstance(c, types.CodeType) and c.co_name == fdef.name)


def _maker(fdef, first, helper_names):
    maker = ast.FunctionDef(
        name="__flux_npu_make",
        args=ast.arguments(posonlyargs=[], args=[ast.arg(n) for n in helper_names], kwonlyargs=[],
                           kw_defaults=[], defaults=[]),
        body=[fdef, ast.Return(ast.Name(id=fdef.name, ctx=ast.Load()))], decorator_list=[], returns=None,
    )
    if "type_params" in ast.FunctionDef._fields:  # Python 3.12+
        maker.type_params = []
    module = ast.Module(body=[maker], type_ignores=[])
    ast.fix_missing_locations(module)
    ast.increment_lineno(module, first - 1)
    return module


def compile_rewritten(original, fdef, first: int, helper_names, helpers):
    """Compile the rewritten FunctionDef inside a maker taking the helpers by name (so they are
    closure variables, not module globals), with the original file and line numbers, and return the
    new function carrying the original's defaults, qualname and `__wrapped_original__`."""
    module = _maker(fdef, first, helper_names)
    code = compile(module, inspect.getsourcefile(original) or "<flux_npu rewrite>", "exec",
                   flags=_future_flags(original.__code__), dont_inherit=True)
    scope: dict = {}
    exec(code, original.__globals__, scope)  # noqa: S102  (defines only __flux_npu_make in `scope`, not in the module)
    new = scope["__flux_npu_make"](*helpers)
    new.__defaults__ = original.__defaults__
    new.__kwdefaults__ = original.__kwdefaults__
    new.__qualname__ = original.__qualname__
    new.__wrapped_original__ = original
    return new


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
