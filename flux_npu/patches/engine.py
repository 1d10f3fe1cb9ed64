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

import importlib
import importlib.util
import sys
import types

import torch

from ..backends import get_backend
from . import bfl, diffusers_flux, diffusers_more, transformers_t5, xflux_ip  # noqa: F401  (registration)
from . import comfy_kitchen as comfy_kitchen_route
from .handle import PatchHandle
from .importing import _ImportHook
from .records import _HANDLES, _LIVE, _LOCK, _build, _build_failure, _guard, _resolve  # noqa: F401
from .registry import _SETS, register_patch_set  # noqa: F401  (re-exported)
from .routes import RowStats, handback, note_route, reset_routes, routes, torch_compiling  # noqa: F401
from .spec import (  # noqa: F401  (re-exported)
    DEFERRED,
    NOT_FOUND,
    OP_NAMES,
    PATCHED,
    PENDING,
    SKIPPED,
    PatchSet,
    Row,
    Spec,
    _callable_of,
    exact,
    select_ops,
    signature_drift,
    suffix_pattern,
)


def known_targets() -> list[str]:
    return list(_SETS)


# -- public entry points ----------------------------------------------------------------------


def _select_targets(targets) -> list[str]:
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
          lazy: bool = False, comfy_kitchen="first") -> PatchHandle:
    """Swap the hot ops of Flux code for the backend's kernels.

    backend: a name, a Backend, or None (FLUX_NPU_BACKEND, then auto-detect).
    targets: subset of {'diffusers', 'bfl', 'transformers'} (default: all).
    model: patch only this model instance (its submodules) instead of modules/classes.
    transfer_to_npu: also import torch_npu.contrib.transfer_to_npu (global side effects; npu only).
    ops / exclude: which ops to route (names in OP_NAMES; default all), e.g. exclude=["attention"]
        keeps the stock (or the user's chosen) attention and fuses the rest.
    lazy: do not import target libraries; patch them when the script imports them (import hook).
    comfy_kitchen: where a flux_npu backend goes in comfy-kitchen's priority list when comfy-kitchen
        is imported ("first", "last", an index; None: not registered, and ComfyUI's comfy-kitchen
        RoPE functions are replaced instead); see patches/comfy_kitchen.py.
    """
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch(model=...) takes a torch.nn.Module (the model to patch), got {type(model).__name__} "
                        f"{model!r}; leave it out to patch the modules and classes")
    comfy_kitchen_route.set_route(comfy_kitchen)
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
            stats = RowStats()
            fn = _guard(built, _callable_of(original), handle._alive, stats)
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
                    if isinstance(sub, owner) and handle.set_attr(sub, attr, types.MethodType(fn, sub)) is None:
                        count += 1
            handle.add_row(module.__name__, spec.symbol, PATCHED if count else SKIPPED,
                           f"{what} on {count} instance(s)" if count else f"no {owner.__name__} in the model",
                           stats if count else None)


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
    if not isinstance(module, types.ModuleType):
        raise TypeError(f"patch_module() takes an imported module (e.g. `import myfork; patch_module(myfork)`), got "
                        f"{type(module).__name__} {module!r}")
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
