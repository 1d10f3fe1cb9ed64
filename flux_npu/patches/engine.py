"""The patch engine: recorded, undoable replacements of symbols in existing Flux code.

A *patch set* names the modules it applies to (an exact name or a pattern such as any
`*.flux.math`) and a list of *specs*: a symbol in that module (`attention`, `EmbedND.forward`),
the parameters the replacement relies on (checked against the installed code: a drifted target is
skipped with the reason, never a crash) and a builder `original -> replacement`.

`patch()` applies every set of the chosen targets to the modules already imported (importing the
exact-name ones it can find), installs an import hook so modules imported later are patched as
they load, and returns a `PatchHandle`. Every replacement is recorded as (owner, attribute,
original); `undo()` puts the originals back, by identity, in reverse order. A name imported by
value elsewhere (`from flux.math import attention`) is replaced there too (`rebind`), and recorded.
Applying twice is harmless: a symbol already patched by a live handle is skipped with that reason.

A patch set can also *recognise* a module by its structure (the functions and classes it defines,
with their signatures), so a fork of the BFL layout under any module name is found, on `patch()`
and by the import hook. `patch(ops=[...])` / `patch(exclude=[...])` choose which ops are routed
(a spec is applied when any of its ops is chosen; partial specs are told which are).

Undo is careful about other patchers: a symbol is restored only if it still holds our replacement
(else theirs stays, with a warning), and every replacement checks that its handle is live, so one
that someone else puts back after `undo()` (e.g. `unittest.mock.patch` exiting out of order) runs
the original. A target module found half-imported (patch() called while it executes) is patched
the moment its import finishes. Instance-level handles are not kept by the module-level registry.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import logging
import re
import sys
import threading
import types
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..backends import Backend, get_backend

logger = logging.getLogger("flux_npu")

PATCHED = "patched"
SKIPPED = "skipped"
NOT_FOUND = "not-found"
PENDING = "pending"  # not imported yet; the import hook patches it when it is
DEFERRED = "deferred"  # found half-imported; patched when its import finishes

# The ops a user can switch on or off with patch(ops=...) / patch(exclude=...): the catalogue's
# public names (qk_norm_rope is used where both rms_norm and apply_rope are on).
OP_NAMES = ("attention", "apply_rope", "rope_freqs", "rms_norm", "layer_norm_modulate", "gated_residual")


def select_ops(ops=None, exclude=None) -> frozenset[str]:
    """The set of op names to route: `ops` (default all) minus `exclude`; unknown names raise."""
    chosen = set(OP_NAMES) if ops is None else set([ops] if isinstance(ops, str) else ops)
    dropped = set() if exclude is None else set([exclude] if isinstance(exclude, str) else exclude)
    unknown = sorted((chosen | dropped) - set(OP_NAMES))
    if unknown:
        raise ValueError(f"unknown op name(s) {unknown} in patch(ops=/exclude=); known ops: {', '.join(OP_NAMES)}")
    return frozenset(chosen - dropped)


def handback(op: str, backend, reason: str) -> None:
    """Count a replacement handing its call back to the original (dispatch_stats()['fallback']).
    Skipped while torch.compile traces: the counter is Python bookkeeping that would break the graph."""
    if torch_compiling():
        return
    from ..ops import record_fallback

    record_fallback(op, backend.name, reason)


_ROUTES: Counter[tuple] = Counter()  # (what, route) -> calls: which implementation a patched call used


def note_route(what: str, route: str) -> None:
    """Count which implementation served a patched call that has several (shown by report_table)."""
    if not torch_compiling():
        _ROUTES[(what, route)] += 1


def routes() -> dict[tuple, int]:
    return dict(_ROUTES)


def reset_routes() -> None:
    _ROUTES.clear()


def torch_compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


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


# -- registry of patch sets -------------------------------------------------------------------

_SETS: dict[str, list[PatchSet]] = {}


def register_patch_set(ps: PatchSet) -> PatchSet:
    _SETS.setdefault(ps.target, []).append(ps)
    return ps


def known_targets() -> list[str]:
    _load_builtin_sets()
    return list(_SETS)


def _load_builtin_sets():
    from . import bfl, diffusers_flux, diffusers_more, transformers_t5  # noqa: F401  (registration)


# -- live bookkeeping -------------------------------------------------------------------------

_LOCK = threading.RLock()
# (id(owner), attr) -> handle that patched it. Weak: an instance-level handle (and the model its
# records reference) must die with the user's last reference, not live on in this table.
_LIVE: weakref.WeakValueDictionary[tuple, PatchHandle] = weakref.WeakValueDictionary()
_HANDLES: list[PatchHandle] = []  # module/class-level handles (the import hook serves them)


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


def _callable_of(obj):
    return obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj


def _build(spec: Spec, original, backend, enabled):
    try:
        n = len(inspect.signature(spec.build).parameters)
    except (TypeError, ValueError):
        n = 2
    return spec.build(original, backend, enabled) if n >= 3 else spec.build(original, backend)


def _build_failure(exc) -> str:
    if type(exc).__name__ == "NothingToFuse":  # a block forward without the expressions we fuse
        return f"nothing to fuse: {exc}; stock code kept"
    return f"cannot build replacement: {type(exc).__name__}: {exc}"


def _guard(replacement, original, alive):
    """A replacement that runs only while its handle is live and the original otherwise: someone
    else may put our replacement back after undo() (a mock.patch that exits out of order)."""
    if not callable(replacement) or not callable(original):
        return replacement

    def guarded(*args, **kwargs):
        if alive[0]:
            return replacement(*args, **kwargs)
        return original(*args, **kwargs)

    functools.update_wrapper(guarded, replacement)
    return guarded


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


_MISSING = object()


def _current(owner, attr):
    """What owner.attr holds now, where we stored it (own dict for classes/modules)."""
    if isinstance(owner, (type, types.ModuleType)):
        return owner.__dict__.get(attr, _MISSING)
    return getattr(owner, attr, _MISSING)


def _initializing(module) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


class _WatchedSpec(importlib.machinery.ModuleSpec):
    """A module's spec, class-swapped while its import runs: the import system sets
    `spec._initializing = False` right after the module finished executing (importlib's
    _load_unlocked), which is the post-import point of a module whose loader we never wrapped."""

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name == "_initializing" and not value:
            self.__class__ = importlib.machinery.ModuleSpec
            for fn in _WHEN_IMPORTED.pop(id(self), ()):
                try:
                    fn()
                except Exception as exc:  # never break the user's import
                    logger.warning("flux_npu: deferred patch of %s failed: %s", self.name, exc)


_WHEN_IMPORTED: dict[int, list[Callable[[], None]]] = {}


def _when_imported(module, fn) -> bool:
    """Run fn() once `module` (now half-imported) finishes importing; False if that cannot be
    hooked (a custom spec class), in which case the import hook's next event retries."""
    spec = getattr(module, "__spec__", None)
    if type(spec) not in (importlib.machinery.ModuleSpec, _WatchedSpec):
        return False
    _WHEN_IMPORTED.setdefault(id(spec), []).append(fn)
    spec.__class__ = _WatchedSpec
    return True


class PatchHandle:
    """What one `patch()` call did: `report()`, `undo()`, context manager."""

    def __init__(self, backend: Backend, targets: Sequence[str], model=None,
                 enabled: frozenset[str] = frozenset(OP_NAMES)):
        self.backend = backend
        self.targets = list(targets)
        self.enabled = frozenset(enabled)
        self._model = weakref.ref(model) if model is not None else None
        self._records: list[_Record] = []
        self._rows: list[Row] = []
        self._seen_modules: set = set()
        self._rebind_scopes: dict[int, tuple] = {}
        self._deferred: list[tuple] = []  # (patch set, module) found half-imported, no spec hook
        self._alive = [True]  # read by every replacement (see _guard)
        self._active = True

    @property
    def model(self):
        return self._model() if self._model is not None else None

    # report ------------------------------------------------------------------------------
    def add_row(self, target, symbol, status, reason):
        self._rows.append(Row(target, symbol, status, reason))

    def report(self) -> list[Row]:
        """Rows (target, symbol, status, reason), in the order they happened."""
        return list(self._rows)

    def runtime_handbacks(self) -> list[tuple]:
        """(op, reason, count) of this backend's run-time hand-backs so far: patched code that
        passed a call to the original and kernels that declined an input (dispatch_stats)."""
        from ..ops import dispatch_stats

        fb = dispatch_stats()["fallback"]
        return sorted((op, reason, n) for (op, b, reason), n in fb.items() if b == self.backend.name)

    def report_table(self) -> str:
        from ..utils.table import format_table

        rows = [(r.target, r.symbol, r.status, r.reason) for r in self._rows]
        level = "instance" if self._model is not None else "module/class"
        ops_note = "" if self.enabled == frozenset(OP_NAMES) else f", ops: {', '.join(sorted(self.enabled)) or 'none'}"
        head = f"flux_npu patches (backend {self.backend.name}, {level} level{ops_note})"
        text = head + "\n" + format_table(("target", "symbol", "status", "reason"), rows)
        if _ROUTES:
            text += "\nrun-time routes (calls so far):\n"
            text += format_table(("patched call", "served by", "calls"),
                                 [(w, r, str(n)) for (w, r), n in sorted(_ROUTES.items())])
        hb = self.runtime_handbacks()
        if hb:
            text += "\nrun-time hand-backs to stock code / reference (dispatch_stats()['fallback']):\n"
            text += format_table(("op", "reason", "calls"), [(op, reason, str(n)) for op, reason, n in hb])
        return text

    def __str__(self):
        return self.report_table()

    @property
    def active(self) -> bool:
        return self._active

    def patched_symbols(self) -> list[tuple]:
        return [(r.owner, r.attr) for r in self._records]

    # applying ----------------------------------------------------------------------------
    def _set(self, owner, attr, replacement) -> None:
        key = (id(owner), attr)
        if attr == "__class__":  # a per-instance class swap (see _apply_instance): restore by setattr
            original = owner.__class__
            owner.__class__ = replacement
            self._records.append(_Record(owner, attr, original, replacement, True, replacement))
            _LIVE[key] = self
            return
        had_own = attr in getattr(owner, "__dict__", {}) if not isinstance(owner, types.ModuleType) else True
        if isinstance(owner, type) or isinstance(owner, types.ModuleType):
            original = owner.__dict__[attr] if had_own else getattr(owner, attr)
        else:
            original = owner.__dict__.get(attr) if had_own else None
            if not had_own and attr not in getattr(owner, "__dict__", {}):
                # an attribute an nn.Module keeps elsewhere (a submodule processor): restore by setattr
                cur = getattr(owner, attr, _MISSING)
                if cur is not _MISSING and not callable(getattr(type(owner), attr, None)):
                    original, had_own = cur, True
        setattr(owner, attr, replacement)
        self._records.append(_Record(owner, attr, original, replacement, had_own, _current(owner, attr)))
        _LIVE[key] = self

    def set_attr(self, owner, attr, replacement) -> str | None:
        """Replace owner.attr, recorded. Returns a reason if it was already patched."""
        with _LOCK:
            other = _LIVE.get((id(owner), attr))
            if other is not None and other._active:
                who = "this handle" if other is self else "another live flux_npu handle"
                return f"already patched by {who}"
            self._set(owner, attr, replacement)
            return None

    def undo(self) -> None:
        """Restore every original (identity), newest first. Safe to call twice. A symbol that
        someone else replaced after us keeps their value (warned and reported); our replacement,
        if they later put it back, runs the original from then on."""
        with _LOCK:
            if not self._active:
                return
            self._alive[0] = False
            for rec in reversed(self._records):
                if _LIVE.get((id(rec.owner), rec.attr)) is self:
                    del _LIVE[(id(rec.owner), rec.attr)]
                if _current(rec.owner, rec.attr) is not rec.installed:
                    where = getattr(rec.owner, "__name__", type(rec.owner).__name__)
                    msg = (f"flux_npu undo: {where}.{rec.attr} was replaced by someone else after flux_npu patched it; "
                           "their value is left in place (flux_npu's replacement, if restored later, "
                           "runs the original)")
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
                    self.add_row(where, rec.attr, SKIPPED, "left as is on undo: " + msg.split(": ", 1)[1])
                    continue
                if rec.had_own:
                    setattr(rec.owner, rec.attr, rec.original)
                else:
                    try:
                        delattr(rec.owner, rec.attr)
                    except AttributeError:
                        pass
            self._records.clear()
            self._active = False
            if self in _HANDLES:
                _HANDLES.remove(self)
            if not _HANDLES:
                _ImportHook.uninstall()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False

    # module-level application --------------------------------------------------------------
    def apply_set(self, ps: PatchSet, module) -> None:
        name = module.__name__
        key = (ps.target, name, id(ps))
        if key in self._seen_modules:
            return
        if _initializing(module):
            # patch() ran while this module is still executing (e.g. called from inside it): its
            # symbols may not exist yet. Patch it when its import finishes, not now.
            if (ps, module) in self._deferred:
                return
            self._deferred.append((ps, module))
            if not _when_imported(module, lambda: self._finish_deferred(ps, module)):
                pass  # retried by the import hook's next event (_retry_deferred)
            self.add_row(name, "*", DEFERRED,
                         "module still importing when patch() ran: patched when its import finishes")
            return
        self._seen_modules.add(key)
        for spec in ps.specs:
            self._apply_spec(ps, spec, module)

    def _finish_deferred(self, ps, module) -> None:
        if (ps, module) not in self._deferred:
            return
        self._deferred.remove((ps, module))
        if self._active and sys.modules.get(module.__name__) is module:
            with _LOCK:
                self.apply_set(ps, module)

    def _retry_deferred(self) -> None:
        for ps, module in list(self._deferred):
            if not _initializing(module):
                self._finish_deferred(ps, module)

    def _apply_spec(self, ps: PatchSet, spec: Spec, module) -> None:
        name = module.__name__
        if not set(spec.ops) & self.enabled:
            if spec.symbol.split(".")[0] in vars(module):
                self.add_row(name, spec.symbol, SKIPPED,
                             f"excluded by patch(ops=/exclude=) ({', '.join(spec.ops)}): stock code kept")
            return
        try:
            owner, attr, original = _resolve(module, spec.symbol)
        except AttributeError:
            if not spec.optional:
                self.add_row(name, spec.symbol, NOT_FOUND, "symbol missing in this version (code drifted): left as is")
            return
        other = _LIVE.get((id(owner), attr))
        if other is not None and other._active:  # say so before reading (our) replacement's source
            who = "this handle" if other is self else "another live flux_npu handle"
            self.add_row(name, spec.symbol, SKIPPED, f"already patched by {who}")
            return
        drift = signature_drift(original, spec.params)
        if drift:
            self.add_row(name, spec.symbol, SKIPPED, drift)
            return
        try:
            replacement = _build(spec, original, self.backend, self.enabled)
        except Exception as exc:  # a builder that cannot cope with this version: skip, say why
            self.add_row(name, spec.symbol, SKIPPED, _build_failure(exc))
            return
        what = getattr(replacement, "__flux_npu_what__", spec.what)
        replacement = _guard(replacement, _callable_of(original), self._alive)
        installed = staticmethod(replacement) if isinstance(original, staticmethod) else replacement
        reason = self.set_attr(owner, attr, installed)
        if reason:
            self.add_row(name, spec.symbol, SKIPPED, reason)
            return
        extra = ""
        if spec.rebind:
            places = self._rebind(_callable_of(original), replacement, module)
            if places:
                shown = ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")
                extra = f" (also rebound where imported by name: {shown})"
        self.add_row(name, spec.symbol, PATCHED, what + extra)

    def _rebind(self, original, replacement, module) -> list[str]:
        """Replace names bound to `original` in the other loaded modules of the same top-level
        package, and remember the scope so modules imported later are rebound too."""
        top = module.__name__.split(".")[0]
        self._rebind_scopes[id(original)] = (original, replacement, top)
        places = []
        for mod in list(sys.modules.values()):
            if mod is module or not isinstance(mod, types.ModuleType):
                continue
            mname = getattr(mod, "__name__", "") or ""
            if mname.split(".")[0] != top:
                continue
            for k, v in list(vars(mod).items()):
                if v is original and self.set_attr(mod, k, replacement) is None:
                    places.append(f"{mname}.{k}")
        return places

    def on_import(self, module) -> None:
        """Import hook callback: patch a newly imported module and rebind names it imported."""
        if not self._active:
            return
        if self._deferred:
            self._retry_deferred()
        name = getattr(module, "__name__", "") or ""
        for target in self.targets:
            for ps in _SETS.get(target, ()):
                if ps.applies_to(name, module):
                    self.apply_set(ps, module)
        top = name.split(".")[0]
        scopes = [(o, r) for o, r, scope in self._rebind_scopes.values() if scope == top]
        if not scopes:
            return
        for k, v in list(vars(module).items()):
            for original, replacement in scopes:
                if v is original and self.set_attr(module, k, replacement) is None:
                    self.add_row(name, k, PATCHED, "rebound on import to the patched replacement")
                elif v is replacement and (id(module), k) not in _LIVE:
                    # `from patched.module import name` ran after patching and bound the replacement
                    # itself: record it so undo() puts the original there too.
                    with _LOCK:
                        self._records.append(_Record(module, k, original, replacement, True, replacement))
                        _LIVE[(id(module), k)] = self
                    self.add_row(name, k, PATCHED, "imported the patched replacement by name (restored on undo)")


# -- import hook ------------------------------------------------------------------------------


class _ImportHook(importlib.abc.MetaPathFinder):
    """Wraps loaders so live handles see every module right after it executes."""

    _installed: _ImportHook | None = None

    def find_spec(self, fullname, path, target=None):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                loader = spec.loader
                if loader is not None and hasattr(loader, "exec_module") and not isinstance(loader, _HookedLoader):
                    spec.loader = _HookedLoader(loader)
                return spec
        return None

    @classmethod
    def install(cls):
        if cls._installed is None:
            cls._installed = cls()
            sys.meta_path.insert(0, cls._installed)

    @classmethod
    def uninstall(cls):
        if cls._installed is not None:
            try:
                sys.meta_path.remove(cls._installed)
            except ValueError:
                pass
            cls._installed = None


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for h in _HANDLES:
            try:
                h.on_import(module)
            except Exception as exc:  # never break the user's import
                logger.warning("flux_npu: patching %s on import failed: %s", module.__name__, exc)


# -- public entry points ----------------------------------------------------------------------


def _select_targets(targets) -> list[str]:
    _load_builtin_sets()
    if targets is None:
        return list(_SETS)
    if isinstance(targets, str):
        targets = [targets]
    unknown = [t for t in targets if t not in _SETS]
    if unknown:
        raise ValueError(f"unknown patch target(s) {unknown}; known targets: {', '.join(_SETS)}")
    return list(targets)


def _top_installed(modname: str) -> str | None:
    """None when the top-level package of modname can be found without importing anything, else
    the reason it cannot."""
    top = modname.split(".")[0]
    if top in sys.modules:
        return None
    try:
        return None if importlib.util.find_spec(top) is not None else f"{top} is not installed"
    except Exception as exc:  # a broken install must not break patch()
        return f"cannot look {top} up: {type(exc).__name__}: {exc}"


def _import_target(handle: PatchHandle, modname: str, lazy: bool) -> None:
    """Import an exact-name target module, or say (in a row) why it is not patched now."""
    if modname in sys.modules:
        return
    missing = _top_installed(modname)
    if missing:
        handle.add_row(modname, "*", NOT_FOUND, missing)
        return
    if lazy:
        handle.add_row(modname, "*", PENDING, "not imported yet: patched by the import hook when the script imports it")
        return
    try:
        found = importlib.util.find_spec(modname) is not None  # imports the parent packages
    except Exception as exc:  # not only ImportError: a broken dependency raises anything
        handle.add_row(modname, "*", SKIPPED, f"import failed: {type(exc).__name__}: {exc}")
        return
    if not found:
        handle.add_row(modname, "*", NOT_FOUND, f"module {modname} is not installed")
        return
    try:
        importlib.import_module(modname)
    except Exception as exc:
        handle.add_row(modname, "*", SKIPPED, f"import failed: {type(exc).__name__}: {exc}")


def patch(backend=None, targets=None, model=None, transfer_to_npu: bool = False, ops=None, exclude=None,
          lazy: bool = False) -> PatchHandle:
    """Swap the hot ops of Flux code for the backend's kernels.

    backend: a name, a Backend, or None (FLUX_NPU_BACKEND, then auto-detect).
    targets: subset of {'diffusers', 'bfl', 'transformers'} (default: all).
    model: patch only this model instance (its submodules) instead of modules/classes.
    transfer_to_npu: also import torch_npu.contrib.transfer_to_npu (global side effects; npu only).
    ops / exclude: which ops to route (names in OP_NAMES; default all), e.g. exclude=["attention"]
        keeps the stock (or the user's chosen) attention and fuses the rest.
    lazy: do not import target libraries; patch them when the script imports them (import hook).
    """
    enabled = select_ops(ops, exclude)
    b = get_backend(backend)
    names = _select_targets(targets)
    handle = PatchHandle(b, names, model, enabled)
    from ..ops.registry import _ensure_loaded

    _ensure_loaded(b)  # register the backend's kernels now, not inside the first (maybe compiled) forward
    with _LOCK:
        if transfer_to_npu:
            from .transfer import apply_transfer_to_npu

            apply_transfer_to_npu(handle)
        for target in names:
            for ps in _SETS[target]:
                if model is not None:
                    _apply_instance(handle, ps, model)
                    continue
                for modname in ps.import_names:
                    _import_target(handle, modname, lazy)
                matched = [m for n, m in list(sys.modules.items()) if m is not None and ps.applies_to(n, m)]
                for mod in matched:
                    handle.apply_set(ps, mod)
                if not matched and not ps.import_names:
                    handle.add_row(ps.describe or target, "*", PENDING,
                                   "no module of this layout imported yet: the import hook patches one when it is "
                                   "imported (found by name or by the symbols it defines)")
        if model is None:
            _HANDLES.append(handle)
            _ImportHook.install()
    return handle


def _apply_instance(handle: PatchHandle, ps: PatchSet, model) -> None:
    mods = [m for n, m in list(sys.modules.items()) if m is not None and ps.applies_to(n, m)]
    for module in mods:
        for spec in ps.specs:
            if not set(spec.ops) & handle.enabled:
                continue
            try:
                owner, attr, original = _resolve(module, spec.symbol)
            except AttributeError:
                if not spec.optional:
                    handle.add_row(module.__name__, spec.symbol, NOT_FOUND,
                                   "symbol missing in this version (code drifted)")
                continue
            drift = signature_drift(original, spec.params)
            if drift:
                handle.add_row(module.__name__, spec.symbol, SKIPPED, drift)
                continue
            if spec.instance is not None:
                spec.instance(module, model, handle.backend, handle, spec, original)
                continue
            if not isinstance(owner, type):
                handle.add_row(module.__name__, spec.symbol, SKIPPED,
                               "module-level symbol: instance-only patching cannot reach it "
                               "(call patch() without model=)")
                continue
            try:
                built = _build(spec, original, handle.backend, handle.enabled)
            except Exception as exc:
                handle.add_row(module.__name__, spec.symbol, SKIPPED, _build_failure(exc))
                continue
            what = getattr(built, "__flux_npu_what__", spec.what)
            fn = _guard(built, _callable_of(original), handle._alive)
            count = 0
            if attr.startswith("__"):
                # a special method (a processor's __call__) is looked up on the type, not the
                # instance: give each instance found a subclass of its own that has it
                sub_cls = type(owner.__name__, (owner,), {attr: fn, "__module__": owner.__module__})
                for obj in _instances_of(model, owner):
                    if handle.set_attr(obj, "__class__", sub_cls) is None:
                        count += 1
            else:
                for sub in model.modules():
                    if isinstance(sub, owner):
                        if handle.set_attr(sub, attr, types.MethodType(fn, sub)) is None:
                            count += 1
            handle.add_row(module.__name__, spec.symbol, PATCHED if count else SKIPPED,
                           f"{what} on {count} instance(s)" if count else f"no {owner.__name__} in the model")


def _instances_of(model, cls) -> list:
    """Objects of exactly `cls` in the model: its modules and their attention `processor`s."""
    found, seen = [], set()
    for sub in model.modules():
        for obj in (sub, getattr(sub, "processor", None)):
            if type(obj) is cls and id(obj) not in seen:
                seen.add(id(obj))
                found.append(obj)
    return found


def patch_module(module, backend=None, targets=("bfl",), ops=None, exclude=None) -> PatchHandle:
    """Patch a BFL-layout package imported under another name: `module` (or its `math` and
    `modules.layers` submodules) gets the BFL patch sets regardless of its name."""
    enabled = select_ops(ops, exclude)
    b = get_backend(backend)
    names = _select_targets(list(targets))
    handle = PatchHandle(b, names, None, enabled)
    candidates = [module]
    for sub in ("math", "modules.layers", "layers"):
        obj = module
        for part in sub.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, types.ModuleType):
            candidates.append(obj)
    with _LOCK:
        for target in names:
            for ps in _SETS[target]:
                for mod in candidates:
                    if _has_any(mod, ps):
                        handle.apply_set(ps, mod)
        if not handle.report():
            handle.add_row(getattr(module, "__name__", str(module)), "*", NOT_FOUND,
                           "no BFL-layout symbols (attention/rope/apply_rope, RMSNorm/QKNorm/EmbedND) found")
        _HANDLES.append(handle)
    return handle


def _has_any(mod, ps: PatchSet) -> bool:
    return any(s.symbol.split(".")[0] in vars(mod) for s in ps.specs if not s.optional)


def live_handles() -> list[PatchHandle]:
    return list(_HANDLES)
