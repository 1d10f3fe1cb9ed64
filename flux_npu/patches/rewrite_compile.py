"""Reading and compiling a forward for the block rewrite (rewrite.py): `parse_function` refuses what
cannot be rewritten safely (a closure, unreadable or decorated source, private names, a source file
that no longer compiles to the code that runs) with NothingToFuse, and `compile_rewritten` compiles
the rewritten FunctionDef against the original's globals, file, line numbers and future flags."""

from __future__ import annotations

import ast
import copy
import inspect
import textwrap
import types


class NothingToFuse(Exception):
    """The forward has no LayerNorm+modulate or gated-residual expression we rewrite."""


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
