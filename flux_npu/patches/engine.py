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
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import inspect
import logging
import re
import sys
import threading
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..backends import Backend, get_backend

logger = logging.getLogger("flux_npu")

PATCHED = "patched"
SKIPPED = "skipped"
NOT_FOUND = "not-found"


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
    params: parameter names the original must have, in order (drift check); None: no check.
    rebind: also replace by-name imports of a module-level original in modules of the same
        top-level package (and in modules imported later).
    instance(module, model, backend, handle) -> list of Row: the per-instance variant, used when
        `patch(model=...)` is given. Default for `Class.method`: set the method on each instance.
    """

    symbol: str
    build: Callable[[Any, Backend], Any]
    what: str
    params: Optional[Sequence[str]] = None
    rebind: bool = False
    instance: Optional[Callable] = None


@dataclass
class PatchSet:
    """Specs for the modules whose name `matches`. `import_names` are exact module names that
    `patch()` imports (when findable) so they are patched right away; `label` groups rows."""

    target: str  # the group name used by patch(targets=[...]): "diffusers", "bfl", "transformers"
    matches: Callable[[str], bool]
    specs: List[Spec]
    import_names: Sequence[str] = ()
    describe: str = ""


def exact(*names: str) -> Callable[[str], bool]:
    names_set = frozenset(names)
    return lambda mod: mod in names_set


def suffix_pattern(*suffixes: str) -> Callable[[str], bool]:
    """Module names equal to a suffix or ending with '.' + suffix (e.g. 'flux.math')."""
    rx = re.compile(r"(^|\.)(" + "|".join(re.escape(s) for s in suffixes) + r")$")
    return lambda mod: bool(rx.search(mod))


# -- registry of patch sets -------------------------------------------------------------------

_SETS: Dict[str, List[PatchSet]] = {}


def register_patch_set(ps: PatchSet) -> PatchSet:
    _SETS.setdefault(ps.target, []).append(ps)
    return ps


def known_targets() -> List[str]:
    _load_builtin_sets()
    return list(_SETS)


def _load_builtin_sets():
    from . import bfl, diffusers_flux, transformers_t5  # noqa: F401  (registration)


# -- live bookkeeping -------------------------------------------------------------------------

_LOCK = threading.RLock()
_LIVE: Dict[tuple, "PatchHandle"] = {}  # (id(owner), attr) -> handle that patched it
_HANDLES: List["PatchHandle"] = []


@dataclass
class _Record:
    owner: Any
    attr: str
    original: Any
    replacement: Any
    had_own: bool  # the attribute lived in owner.__dict__ (else it was inherited: delete on undo)


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


def signature_drift(original, params: Optional[Sequence[str]]) -> Optional[str]:
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


class PatchHandle:
    """What one `patch()` call did: `report()`, `undo()`, context manager."""

    def __init__(self, backend: Backend, targets: Sequence[str], model=None):
        self.backend = backend
        self.targets = list(targets)
        self.model = model
        self._records: List[_Record] = []
        self._rows: List[Row] = []
        self._seen_modules: set = set()
        self._rebind_scopes: Dict[int, tuple] = {}
        self._active = True

    # report ------------------------------------------------------------------------------
    def add_row(self, target, symbol, status, reason):
        self._rows.append(Row(target, symbol, status, reason))

    def report(self) -> List[Row]:
        """Rows (target, symbol, status, reason), in the order they happened."""
        return list(self._rows)

    def report_table(self) -> str:
        from ..utils.table import format_table

        rows = [(r.target, r.symbol, r.status, r.reason) for r in self._rows]
        head = f"flux_npu patches (backend {self.backend.name}, {'instance' if self.model is not None else 'module/class'} level)"
        return head + "\n" + format_table(("target", "symbol", "status", "reason"), rows)

    def __str__(self):
        return self.report_table()

    @property
    def active(self) -> bool:
        return self._active

    def patched_symbols(self) -> List[tuple]:
        return [(r.owner, r.attr) for r in self._records]

    # applying ----------------------------------------------------------------------------
    def _set(self, owner, attr, replacement) -> None:
        key = (id(owner), attr)
        had_own = attr in getattr(owner, "__dict__", {}) if not isinstance(owner, types.ModuleType) else True
        if isinstance(owner, type) or isinstance(owner, types.ModuleType):
            original = owner.__dict__[attr] if had_own else getattr(owner, attr)
        else:
            original = owner.__dict__.get(attr) if had_own else None
        setattr(owner, attr, replacement)
        self._records.append(_Record(owner, attr, original, replacement, had_own))
        _LIVE[key] = self

    def set_attr(self, owner, attr, replacement) -> Optional[str]:
        """Replace owner.attr, recorded. Returns a reason if it was already patched."""
        with _LOCK:
            other = _LIVE.get((id(owner), attr))
            if other is not None and other._active:
                who = "this handle" if other is self else "another live flux_npu handle"
                return f"already patched by {who}"
            self._set(owner, attr, replacement)
            return None

    def undo(self) -> None:
        """Restore every original (identity), newest first. Safe to call twice."""
        with _LOCK:
            if not self._active:
                return
            for rec in reversed(self._records):
                if rec.had_own:
                    setattr(rec.owner, rec.attr, rec.original)
                else:
                    try:
                        delattr(rec.owner, rec.attr)
                    except AttributeError:
                        pass
                if _LIVE.get((id(rec.owner), rec.attr)) is self:
                    del _LIVE[(id(rec.owner), rec.attr)]
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
        if (ps.target, name, id(ps)) in self._seen_modules:
            return
        self._seen_modules.add((ps.target, name, id(ps)))
        for spec in ps.specs:
            self._apply_spec(ps, spec, module)

    def _apply_spec(self, ps: PatchSet, spec: Spec, module) -> None:
        name = module.__name__
        try:
            owner, attr, original = _resolve(module, spec.symbol)
        except AttributeError:
            self.add_row(name, spec.symbol, NOT_FOUND, "symbol missing in this version (code drifted): left as is")
            return
        drift = signature_drift(original, spec.params)
        if drift:
            self.add_row(name, spec.symbol, SKIPPED, drift)
            return
        try:
            replacement = spec.build(original, self.backend)
        except Exception as exc:  # a builder that cannot cope with this version: skip, say why
            self.add_row(name, spec.symbol, SKIPPED, f"cannot build replacement: {type(exc).__name__}: {exc}")
            return
        if isinstance(original, staticmethod):
            replacement = staticmethod(replacement)
        reason = self.set_attr(owner, attr, replacement)
        if reason:
            self.add_row(name, spec.symbol, SKIPPED, reason)
            return
        extra = ""
        if spec.rebind:
            places = self._rebind(_callable_of(original), replacement, module)
            if places:
                shown = ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")
                extra = f" (also rebound where imported by name: {shown})"
        self.add_row(name, spec.symbol, PATCHED, spec.what + extra)

    def _rebind(self, original, replacement, module) -> List[str]:
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
        name = getattr(module, "__name__", "") or ""
        for target in self.targets:
            for ps in _SETS.get(target, ()):
                if ps.matches(name):
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
                        self._records.append(_Record(module, k, original, replacement, True))
                        _LIVE[(id(module), k)] = self
                    self.add_row(name, k, PATCHED, "imported the patched replacement by name (restored on undo)")


# -- import hook ------------------------------------------------------------------------------


class _ImportHook(importlib.abc.MetaPathFinder):
    """Wraps loaders so live handles see every module right after it executes."""

    _installed: Optional["_ImportHook"] = None

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
        for h in list(_HANDLES):
            try:
                h.on_import(module)
            except Exception as exc:  # never break the user's import
                logger.warning("flux_npu: patching %s on import failed: %s", module.__name__, exc)


# -- public entry points ----------------------------------------------------------------------


def _select_targets(targets) -> List[str]:
    _load_builtin_sets()
    if targets is None:
        return list(_SETS)
    if isinstance(targets, str):
        targets = [targets]
    unknown = [t for t in targets if t not in _SETS]
    if unknown:
        raise ValueError(f"unknown patch target(s) {unknown}; known targets: {', '.join(_SETS)}")
    return list(targets)


def patch(backend=None, targets=None, model=None, transfer_to_npu: bool = False) -> PatchHandle:
    """Swap the hot ops of Flux code for the backend's kernels.

    backend: a name, a Backend, or None (FLUX_NPU_BACKEND, then auto-detect).
    targets: subset of {'diffusers', 'bfl', 'transformers'} (default: all).
    model: patch only this model instance (its submodules) instead of modules/classes.
    transfer_to_npu: also import torch_npu.contrib.transfer_to_npu (global side effects; npu only).
    """
    b = get_backend(backend)
    names = _select_targets(targets)
    handle = PatchHandle(b, names, model)
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
                    if modname not in sys.modules:
                        try:
                            found = importlib.util.find_spec(modname) is not None
                        except (ImportError, ValueError):
                            found = False
                        if not found:
                            handle.add_row(modname, "*", NOT_FOUND, f"module {modname} is not installed")
                            continue
                        try:
                            importlib.import_module(modname)
                        except Exception as exc:
                            handle.add_row(modname, "*", SKIPPED, f"import failed: {type(exc).__name__}: {exc}")
                            continue
                matched = [m for n, m in list(sys.modules.items()) if m is not None and ps.matches(n)]
                for mod in matched:
                    handle.apply_set(ps, mod)
                if not matched and not ps.import_names:
                    handle.add_row(ps.describe or target, "*", NOT_FOUND,
                                   "no such module imported yet: will be patched on import")
        if model is None:
            _HANDLES.append(handle)
            _ImportHook.install()
    return handle


def _apply_instance(handle: PatchHandle, ps: PatchSet, model) -> None:
    mods = [m for n, m in list(sys.modules.items()) if m is not None and ps.matches(n)]
    for module in mods:
        for spec in ps.specs:
            try:
                owner, attr, original = _resolve(module, spec.symbol)
            except AttributeError:
                handle.add_row(module.__name__, spec.symbol, NOT_FOUND, "symbol missing in this version (code drifted)")
                continue
            drift = signature_drift(original, spec.params)
            if drift:
                handle.add_row(module.__name__, spec.symbol, SKIPPED, drift)
                continue
            if spec.instance is not None:
                spec.instance(module, model, handle.backend, handle, spec, original)
                continue
            if not isinstance(owner, type) or attr.startswith("__"):
                handle.add_row(module.__name__, spec.symbol, SKIPPED,
                               "module-level symbol: instance-only patching cannot reach it (call patch() without model=)")
                continue
            fn = spec.build(original, handle.backend)
            count = 0
            for sub in model.modules():
                if isinstance(sub, owner):
                    if handle.set_attr(sub, attr, types.MethodType(fn, sub)) is None:
                        count += 1
            handle.add_row(module.__name__, spec.symbol, PATCHED if count else SKIPPED,
                           f"{spec.what} on {count} instance(s)" if count else f"no {owner.__name__} in the model")


def patch_module(module, backend=None, targets=("bfl",)) -> PatchHandle:
    """Patch a BFL-layout package imported under another name: `module` (or its `math` and
    `modules.layers` submodules) gets the BFL patch sets regardless of its name."""
    b = get_backend(backend)
    names = _select_targets(list(targets))
    handle = PatchHandle(b, names)
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
    return any(hasattr(mod, s.symbol.split(".")[0]) for s in ps.specs)


def live_handles() -> List[PatchHandle]:
    return list(_HANDLES)
