"""Live bookkeeping of replacements: which handle patched which (owner, attribute), the record
undo() restores from, and the small helpers that resolve a symbol, build a replacement and keep it
from running after its handle was undone."""

from __future__ import annotations

import functools
import inspect
import threading
import types
import weakref
from dataclasses import dataclass
from typing import Any

from .routes import RowStats, run_counted
from .spec import Spec

_LOCK = threading.RLock()
# (id(owner), attr) -> handle that patched it. Weak: an instance-level handle (and the model its
# records reference) must die with the user's last reference, not live on in this table.
_LIVE: weakref.WeakValueDictionary[tuple, Any] = weakref.WeakValueDictionary()  # values: PatchHandle
_HANDLES: list[Any] = []  # module/class-level PatchHandles (the import hook serves them)


@dataclass
class _Record:
    owner: Any
    attr: str
    original: Any
    replacement: Any
    had_own: bool  # the attribute lived in owner.__dict__ (else it was inherited: delete on undo)
    installed: Any = None  # the object actually stored (a staticmethod wrapper, a bound method)


def _resolve(module, symbol):
    """(owner, attr, current value) of `symbol` in `module`, or raise AttributeError."""
    parts = symbol.split(".")
    owner = module
    for p in parts[:-1]:
        owner = getattr(owner, p)
    attr = parts[-1]
    if isinstance(owner, type):
        # look up in the class's own dict first so staticmethods/classmethods keep their wrapper
        for klass in owner.__mro__:
            if attr in klass.__dict__:
                return owner, attr, klass.__dict__[attr]
        raise AttributeError(attr)
    return owner, attr, getattr(owner, attr)


def _build(spec: Spec, original, backend, enabled):
    try:
        n = len(inspect.signature(spec.build).parameters)
    except (TypeError, ValueError):
        n = 2
    return spec.build(original, backend, enabled) if n >= 3 else spec.build(original, backend)


def _build_failure(exc) -> str:
    if type(exc).__name__ == "NothingToFuse":  # a block forward without the expressions we fuse
        return f"nothing to fuse: {exc}; stock code kept"
    if type(exc).__name__ == "KeepsOriginal":  # the chosen ops leave nothing for the replacement to do
        return f"stock code kept: {exc}"
    return f"cannot build replacement: {type(exc).__name__}: {exc}"


def _guard(replacement, original, alive, stats: RowStats | None = None):
    """A replacement that runs only while its handle is live and the original otherwise: someone
    else may put our replacement back after undo() (a mock.patch that exits out of order). With
    `stats`, its calls and hand-backs are counted there (the report row's served / handed back)."""
    if not callable(replacement) or not callable(original):
        return replacement

    def guarded(*args, **kwargs):
        if alive[0]:
            if stats is not None:
                return run_counted(stats, replacement, args, kwargs)
            return replacement(*args, **kwargs)
        return original(*args, **kwargs)

    functools.update_wrapper(guarded, replacement)
    return guarded


_MISSING = object()


def _current(owner, attr):
    """What owner.attr holds now, where we stored it (own dict for classes/modules)."""
    if isinstance(owner, (type, types.ModuleType)):
        return owner.__dict__.get(attr, _MISSING)
    return getattr(owner, attr, _MISSING)
