"""The statement-level part of the block rewrite (rewrite.py): two-statement forms merged into one
helper call (`V = self.N(X)` then `V = (1 + S) * V + T`; `V = G * Y` then `X = X + V`; ComfyUI's
apply_mod pair), the reads analysis (`_Reads`) that says when a dropped temporary could still be
read, and the fusion of a gated residual with the LayerNorm+modulate that reads it
(`_fuse_adaln_residual`, where shift and scale are pure)."""

from __future__ import annotations

import ast

from .rewrite_exprs import (
    ADARES,
    ADARES_OUT,
    APPLY_MOD,
    GATED,
    LN,
    LN_MOD,
    _apply_mod_call,
    _is_gate,
    _is_none,
    _is_one_plus,
    _kwcall,
    _modulated,
    _self_call,
    call_args,
)


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
