"""The op table: (op, backend name) -> kernels, each able to say why it declines an input.

Dispatch walks the kernels registered for the active backend in order; the first whose `check`
returns None serves the call. When none fits, the plain-torch reference serves it and each reason
is counted (`dispatch_stats()`), or, in strict mode, a `KernelDeclined` error lists them all.

The walk runs once per input signature, not once per call: the public op builds a key from what
its validation and the kernels' checks read (dtypes, shapes, devices, the non-tensor arguments;
never values or strides), and the first call with that key validates the arguments, walks the
checks and stores a `Plan` (which kernel serves, or why none does). Later calls with the same
key run the planned kernel after one dict lookup and one integer increment. Plans are dropped
whenever what they were derived from changes: a kernel or backend is registered, a backend's
runtime state is reset (`invalidate_plans()`).

Statistics are exact per call: each plan counts its calls in a plain int, and `dispatch_stats()`
adds them up on demand. Calls traced by torch.compile are not counted (the graph replays them
without Python); while tracing, dispatch walks the checks directly with no table state touched,
so the compiled graph is guarded only on shapes and dtypes, as the stock model's is.

The active backend is, in order: the innermost `use_backend(...)` context / applied patch handle,
else `flux_npu.get_backend()`, resolved once and cached until a backend is (un)registered or
`reset_default_backend()` is called (FLUX_NPU_BACKEND is read then, not per call; likewise
FLUX_NPU_STRICT is read at import and by `set_strict(None)`).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import backends as _backends
from ..backends import Backend, get_backend
from .catalogue import OPS  # the op names, in dispatch order

_is_compiling = torch.compiler.is_compiling


class KernelDeclined(RuntimeError):
    """Strict mode: no kernel of the active backend accepted the input."""


@dataclass(frozen=True)
class Kernel:
    """One implementation of `op` for `backend`.

    fn(backend, *args, **kwargs) computes the op with the same arguments as the public entry point.
    check(backend, *args, **kwargs) returns None when the kernel takes the input, else the reason.
    traced(backend, *args), when given, replaces fn while torch.compile traces (the cuda kernels:
    eager calls launch through an autograd.Function, traced ones call the custom ops).
    A check may read the arguments' dtypes, shapes, devices and the non-tensor arguments, never
    tensor values or strides: its answer is cached per input signature. (The one exception, an
    attention float mask, is not cached: `ops.attention` decides such calls one by one.)
    """

    op: str
    backend: str
    name: str
    fn: Callable
    check: Callable | None = None
    doc: str = ""
    traced: Callable | None = None
    caps: object = None  # the kernel's declared capabilities (kernels.caps.Caps), shown by `flux-npu info`

    def why_not(self, backend: Backend, *args, **kwargs) -> str | None:
        if self.check is None:
            return None
        return self.check(backend, *args, **kwargs)


class Plan:
    """What dispatch decided for one (op, backend, input signature): the kernel function that
    serves (None: the reference), its name, the joined decline reasons (None: no fallback) and
    how many calls it served since the last statistics reset."""

    __slots__ = ("fn", "name", "reason", "n", "op", "backend")

    def __init__(self, op, backend, fn, name, reason):
        self.op, self.backend, self.fn, self.name, self.reason, self.n = op, backend, fn, name, reason, 0


_TABLE: dict[tuple[str, str], list[Kernel]] = {}
_LOADED: set = set()
_LOAD_ERRORS: dict[str, str] = {}  # backend name -> why one of its kernel modules failed to import
_PLANS: dict[tuple, Plan] = {}
_BASE = {"served": Counter(), "fallback": Counter()}  # counts not held by a live plan
_STATE = threading.local()
_DEFAULT: dict = {}
_NAMED: dict = {}  # backend name -> Backend, valid for one backend-registry generation
_STRICT = [False]


def _strict_from_env() -> bool:
    from ..utils.env import env_flag

    return env_flag("FLUX_NPU_STRICT")


_STRICT[0] = _strict_from_env()


def invalidate_plans() -> None:
    """Forget every cached plan (their counts are kept). Called when kernels or backends are
    registered and when a backend's runtime state (e.g. the torch_npu import) is reset."""
    for p in list(_PLANS.values()):
        _fold(p)
    _PLANS.clear()


_backends._RESET_LISTENERS.append(invalidate_plans)


def _fold(p: Plan) -> None:
    if p.n:
        _BASE["served"][(p.op, p.backend, p.name)] += p.n
        if p.reason is not None:
            _BASE["fallback"][(p.op, p.backend, p.reason)] += p.n
        p.n = 0


def register_kernel(op: str, backend: str, name: str, check: Callable | None = None, doc: str = "",
                    traced: Callable | None = None, caps=None):
    """Decorator: register `fn` as kernel `name` of `op` on `backend` (appended: earlier wins);
    `traced`, if given, serves calls traced by torch.compile instead of `fn`; `caps`, the kernel's
    declared capabilities (its check derives the common reasons from them), for `flux-npu info`."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    if backend != backend.lower():
        raise ValueError(f"backend names are lower case: register the kernel for {backend.lower()!r}, not {backend!r}")

    def deco(fn):
        kernels = _TABLE.setdefault((op, backend), [])
        kernels[:] = [k for k in kernels if k.name != name]
        kernels.append(Kernel(op, backend, name, fn, check, doc or (fn.__doc__ or "").strip().split("\n")[0], traced,
                              caps))
        invalidate_plans()
        return fn

    return deco


def _ensure_loaded(backend: Backend) -> None:
    """Import the backend's kernel modules once, then let each warm its runtime caches (its
    module-level `prepare()`, e.g. the torch_npu import and SoC probe), so that the first call
    traced by torch.compile finds them filled instead of importing inside the trace. An import
    failure is kept as a reason that every dispatch to this backend reports (and strict mode
    raises), not swallowed after the first call."""
    if backend.name not in _LOADED:
        _LOADED.add(backend.name)
        errors = []
        for mod in backend.kernel_modules:
            try:
                importlib.import_module(mod)
            except Exception as exc:
                errors.append(f"kernel module {mod} failed to import ({type(exc).__name__}: {exc}); "
                              "fix or reinstall it, then call flux_npu.ops.registry.reload_kernels(backend)")
        if errors:
            _LOAD_ERRORS[backend.name] = "; ".join(errors)
        invalidate_plans()
    for mod in backend.kernel_modules:
        prepare = getattr(sys.modules.get(mod), "prepare", None)
        if prepare is not None:
            prepare()
    prepare = backend.option("prepare")  # the backend description's own warm-up (e.g. cuda's SDPA routes)
    if prepare is not None:
        prepare(backend)


def reload_kernels(backend: Backend) -> None:
    """Forget a failed (or done) kernel import of `backend` and import its modules again."""
    _LOADED.discard(backend.name)
    _LOAD_ERRORS.pop(backend.name, None)
    _ensure_loaded(backend)


def kernels_for(op: str, backend: Backend) -> list[Kernel]:
    _ensure_loaded(backend)
    return list(_TABLE.get((op, backend.name), ()))


def fused_ops(backend: Backend) -> list[str]:
    """Ops with at least one registered kernel on `backend` (its "fused" capabilities)."""
    _ensure_loaded(backend)
    return [op for op in OPS if _TABLE.get((op, backend.name))]


def _walk(op: str, b: Backend, args: tuple) -> tuple[Kernel | None, list[str]]:
    reasons = []
    for k in _TABLE.get((op, b.name), ()):
        why = k.check(b, *args) if k.check is not None else None
        if why is None:
            return k, reasons
        reasons.append(f"{k.name}: {why}")
    err = _LOAD_ERRORS.get(b.name)
    if err:
        reasons.append(err)
    return None, reasons


def explain(op: str, backend: Backend, *args, **kwargs) -> tuple[str | None, list[str]]:
    """(name of the kernel that would serve, [reasons of those that decline]) for these inputs."""
    _ensure_loaded(backend)
    reasons = []
    for k in _TABLE.get((op, backend.name), ()):
        why = k.why_not(backend, *args, **kwargs)
        if why is None:
            return k.name, reasons
        reasons.append(f"{k.name}: {why}")
    err = _LOAD_ERRORS.get(backend.name)
    if err:
        reasons.append(err)
    if not reasons:
        reasons.append(f"no {op} kernel registered for backend {backend.name}")
    return None, reasons


# -- active backend ---------------------------------------------------------------------------


def _stack() -> list:
    s = getattr(_STATE, "stack", None)
    if s is None:
        s = _STATE.stack = []
    return s


def reset_default_backend() -> None:
    """Resolve the default backend (FLUX_NPU_BACKEND, else auto-detection) again at next use."""
    _DEFAULT.clear()
    _NAMED.clear()


def active_backend() -> Backend:
    s = getattr(_STATE, "stack", None)
    if s:
        return s[-1]
    gen = _backends._GENERATION[0]
    if _DEFAULT.get("gen") != gen:
        last = _backends._DEFAULT_RESOLVED
        if last and last[0] == gen:  # the application already called get_backend() for the default
            backend = last[1]
        elif _is_compiling():
            # detection probes devices and imports vendor packages: not something to trace
            raise RuntimeError(_NOT_PREPARED.format(what="no default backend is resolved yet"))
        else:
            backend = get_backend()
        _DEFAULT.clear()
        _DEFAULT.update(gen=gen, backend=backend)
    return _DEFAULT["backend"]


_NOT_PREPARED = (
    "flux_npu: {what} while torch.compile traces (detection probes devices and imports kernel packages, which "
    "cannot be traced); call flux_npu.ops.prepare(backend) or flux_npu.patch(...) before compiling"
)


def prepare(backend=None) -> Backend:
    """Resolve `backend` (None: the default), import its kernels and warm their runtime caches, so
    that ops called inside a torch.compile region only read them. `patch()` does this itself."""
    b = resolve_backend(backend)
    _ensure_loaded(b)
    return b


def resolve_backend(backend) -> Backend:
    """A Backend for `backend`: None (the active one), a Backend (as is) or a registered name."""
    if backend is None:
        return active_backend()
    if isinstance(backend, Backend):
        return backend
    gen = _backends._GENERATION[0]
    if _NAMED.get("gen") != gen:
        _NAMED.clear()
        _NAMED["gen"] = gen
    b = _NAMED.get(backend) if isinstance(backend, str) else None
    if b is None:
        if _is_compiling():
            raise RuntimeError(_NOT_PREPARED.format(what=f"backend {backend!r} is not resolved yet"))
        b = get_backend(backend)  # raises BackendError naming the known backends
        if isinstance(backend, str):
            _NAMED[backend] = b
    return b


@contextlib.contextmanager
def use_backend(backend):
    """Make `backend` (a name or Backend) the active one for ops called inside the block."""
    b = get_backend(backend)
    _stack().append(b)
    try:
        yield b
    finally:
        _stack().pop()


# -- strict mode and statistics ---------------------------------------------------------------


def set_strict(on: bool | None = True) -> None:
    """Strict mode: raise KernelDeclined when a registered kernel declines an input, instead of
    falling back to the reference. (An op with no kernel at all on a backend is served by the
    reference in either mode: that is its implementation there, not a fallback.) `None` reads
    FLUX_NPU_STRICT again."""
    _STRICT[0] = _strict_from_env() if on is None else bool(on)


def dispatch_stats() -> dict:
    """{'served': Counter((op, backend, kernel)), 'fallback': Counter((op, backend, reason))}:
    exact call counts of eager calls since the last reset."""
    served, fallback = Counter(_BASE["served"]), Counter(_BASE["fallback"])
    for p in list(_PLANS.values()):
        if p.n:
            served[(p.op, p.backend, p.name)] += p.n
            if p.reason is not None:
                fallback[(p.op, p.backend, p.reason)] += p.n
    return {"served": served, "fallback": fallback}


def record_fallback(op: str, backend: str, reason: str) -> None:
    """Count a hand-back to stock code that happened outside `dispatch` (a patch whose replacement
    passed these inputs to the original). Shown by `dispatch_stats()['fallback']` like a declined
    kernel; strict mode raises KernelDeclined with the reason instead."""
    if _STRICT[0]:
        raise KernelDeclined(f"{op} on backend {backend}: handed back to the original code ({reason})")
    _BASE["fallback"][(op, backend, reason)] += 1


def reset_dispatch_stats() -> None:
    for c in _BASE.values():
        c.clear()
    for p in list(_PLANS.values()):
        p.n = 0


def _plan(op: str, b: Backend, args: tuple, key) -> Plan:
    """Walk the checks for `args` (already validated) and make a plan; store it under `key`
    unless the key is None (an input whose signature could not be hashed)."""
    if b.name not in _LOADED:
        _ensure_loaded(b)
    k, reasons = _walk(op, b, args)
    plan = Plan(op, b.name, None if k is None else k.fn, "reference" if k is None else k.name,
                "; ".join(reasons) if (k is None and reasons) else None)
    if key is not None:
        _PLANS[key] = plan
    return plan


def _strict_error(plan: Plan) -> KernelDeclined:
    return KernelDeclined(f"{plan.op} on backend {plan.backend}: no kernel accepted the input ({plan.reason})")


def run_plan(plan: Plan, b: Backend, reference: Callable, args: tuple):
    """Run a plan: count it, raise in strict mode if it is a fallback, call the kernel or reference."""
    if plan.reason is not None and _STRICT[0]:
        raise _strict_error(plan)
    plan.n += 1
    fn = plan.fn
    return reference(*args) if fn is None else fn(b, *args)


def traced(op: str, b: Backend, reference: Callable, args: tuple):
    """Dispatch while torch.compile traces: the checks are walked in the trace (dynamo turns
    their answers into shape/dtype guards), nothing global is read or written."""
    if b.name not in _LOADED:
        raise RuntimeError(_NOT_PREPARED.format(what=f"the kernels of backend {b.name!r} are not loaded yet"))
    k, reasons = _walk(op, b, args)
    if k is not None:
        return (k.traced or k.fn)(b, *args)
    if reasons and _STRICT[0]:
        raise KernelDeclined(f"{op} on backend {b.name}: no kernel accepted the input ({'; '.join(reasons)})")
    return reference(*args)


def dispatch(op: str, reference: Callable, backend, args: tuple, kwargs: dict | None = None):
    """Run `op` on the active (or given) backend's first kernel that accepts the input, else the
    reference, walking the checks on every call (the public ops plan through `_PLANS` instead).
    Arguments go by position, in the public op's order; they are not validated here."""
    if kwargs:
        raise TypeError(f"dispatch({op!r}): pass the arguments by position, in the public op's order")
    b = resolve_backend(backend)
    if _is_compiling():
        return traced(op, b, reference, args)
    return run_unplanned(_plan(op, b, args, None), b, reference, args)


def run_unplanned(plan: Plan, b: Backend, reference: Callable, args: tuple):
    """Run a plan that is not stored (counted straight into the statistics)."""
    if plan.reason is not None and _STRICT[0]:
        raise _strict_error(plan)
    plan.n = 1
    _fold(plan)
    fn = plan.fn
    return reference(*args) if fn is None else fn(b, *args)
