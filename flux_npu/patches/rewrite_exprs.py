"""The expressions the block rewrite (rewrite.py) looks for and the calls it puts in their place:
the helper names, the matchers of single expressions (`(1 + S) * self.N(X) + T`, `X + G * Y`, a
gate, ComfyUI's `apply_mod(...)`) and the node transformers replacing them one expression at a time
(`_Expressions`, `_ProcessorCalls`, `_ApplyMod`). Statement pairs are rewrite_stmts.py's."""

from __future__ import annotations

import ast

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
    where D (modulation_dims) is None at run time, or per range where D's ranges tile the tokens."""

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
