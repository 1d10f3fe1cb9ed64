"""What a patch is, as data: the statuses of a report row, the op names a user can switch,
`Spec` (one replacement inside a matched module), `PatchSet` (the specs for the modules a
name pattern or a structure test matches) and the drift check of an original's signature."""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..ops.catalogue import SWITCHABLE

PATCHED = "patched"
SKIPPED = "skipped"
NOT_FOUND = "not-found"
PENDING = "pending"  # not imported yet; the import hook patches it when it is
DEFERRED = "deferred"  # found half-imported; patched when its import finishes

# The ops a user can switch on or off with patch(ops=...) / patch(exclude=...): the catalogue's
# switchable ones (qk_norm_rope is used where both rms_norm and apply_rope are on).
OP_NAMES = SWITCHABLE


def _op_names(value, what):
    if isinstance(value, str):
        return {value}
    try:
        names = list(value)
    except TypeError:
        raise TypeError(f"patch({what}=...) takes an op name or a list of op names, got {type(value).__name__} "
                        f"{value!r}; known ops: {', '.join(OP_NAMES)}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"patch({what}=...) takes op names (strings), got {bad!r}; known ops: {', '.join(OP_NAMES)}")
    return set(names)


def select_ops(ops=None, exclude=None, warn: bool = True) -> frozenset[str]:
    """The set of op names to route: `ops` (default all) minus `exclude`; unknown names raise, and
    an empty result (every chosen op excluded too) warns: nothing would be patched."""
    chosen = set(OP_NAMES) if ops is None else _op_names(ops, "ops")
    dropped = set() if exclude is None else _op_names(exclude, "exclude")
    unknown = sorted((chosen | dropped) - set(OP_NAMES))
    if unknown:
        raise ValueError(f"unknown op name(s) {unknown} in patch(ops=/exclude=); known ops: {', '.join(OP_NAMES)}")
    if warn and not chosen - dropped:
        import warnings

        warnings.warn(f"patch(ops={sorted(chosen)}, exclude={sorted(dropped)}) leaves no op to route: nothing "
                      "will be patched" + (f" ({sorted(chosen & dropped)} both chosen and excluded)"
                                           if chosen & dropped else ""), UserWarning, stacklevel=3)
    return frozenset(chosen - dropped)


@dataclass(frozen=True)
class Row:
    target: str
    symbol: str
    status: str
    reason: str

    def as_dict(self):
        return {"target": self.target, "symbol": self.symbol, "status": self.status, "reason": self.reason}


@dataclass
class Spec:
    """One replacement inside a matched module.

    symbol: `name` (module level) or `Class.attr`.
    build(original, backend) -> replacement.
    what: what the replacement routes where (for the report).
    build(original, backend, enabled) -> replacement also works: `enabled` is the frozenset of
        op names chosen by patch(ops=/exclude=), for a replacement that routes several ops.
    params: parameter names the original must have, in order (drift check); None: no check.
    rebind: also replace by-name imports of a module-level original in modules of the same
        top-level package (and in modules imported later).
    instance(module, model, backend, handle, spec, original): the per-instance variant, used when
        `patch(model=...)` is given. Default for `Class.method`: set the method on each instance.
    ops: the op names (OP_NAMES) the replacement routes; the spec is skipped when none is chosen.
    optional: a symbol only some versions define; its absence is not reported.
    """

    symbol: str
    build: Callable[..., Any]
    what: str
    params: Sequence[str] | None = None
    rebind: bool = False
    instance: Callable | None = None
    ops: tuple[str, ...] = OP_NAMES
    optional: bool = False


@dataclass
class PatchSet:
    """Specs for the modules whose name `matches`. `import_names` are exact module names that
    `patch()` imports (when findable) so they are patched right away; `recognise(module)` finds
    the layout by structure under any name; `describe` names the set in report rows."""

    target: str  # the group name used by patch(targets=[...]): "diffusers", "bfl", "transformers"
    matches: Callable[[str], bool]
    specs: list[Spec]
    import_names: Sequence[str] = ()
    describe: str = ""
    recognise: Callable[[types.ModuleType], bool] | None = None
    # apply(handle, module): a set that does something else than replace symbols (registering a
    # backend elsewhere); it records its own undo with handle.on_undo
    apply: Callable[[Any, types.ModuleType], None] | None = None

    def applies_to(self, name: str, module) -> bool:
        if self.matches(name):
            return True
        if self.recognise is None or not isinstance(module, types.ModuleType):
            return False
        try:
            return bool(self.recognise(module))
        except Exception:  # a module with odd attributes is simply not ours
            return False


def exact(*names: str) -> Callable[[str], bool]:
    names_set = frozenset(names)
    return lambda mod: mod in names_set


def suffix_pattern(*suffixes: str) -> Callable[[str], bool]:
    """Module names equal to a suffix or ending with '.' + suffix (e.g. 'flux.math')."""
    rx = re.compile(r"(^|\.)(" + "|".join(re.escape(s) for s in suffixes) + r")$")
    return lambda mod: bool(rx.search(mod))


def _callable_of(obj):
    return obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj


def signature_drift(original, params: Sequence[str] | None) -> str | None:
    if params is None:
        return None
    fn = _callable_of(original)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        return f"cannot read its signature ({exc})"
    names = [p for p in sig.parameters]
    if names[: len(params)] != list(params):
        return f"signature drifted: expected ({', '.join(params)}, ...), found ({', '.join(names)})"
    return None
