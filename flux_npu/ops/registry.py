"""The op table: (op, backend name) -> kernels, each able to say why it declines an input.

Dispatch walks the kernels registered for the active backend in order; the first whose `check`
returns None serves the call. When none fits, the plain-torch reference serves it and each reason
is counted (`dispatch_stats()`), or, in strict mode, a `KernelDeclined` error lists them all.

The active backend is, in order: the innermost `use_backend(...)` context / applied patch handle,
else `flux_npu.get_backend()` (resolved once and cached).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from ..backends import Backend, get_backend

OPS = (
    "attention",
    "rope_freqs",
    "apply_rope",
    "rms_norm",
    "layer_norm_modulate",
    "gated_residual",
    "qk_norm_rope",
)


class KernelDeclined(RuntimeError):
    """Strict mode: no kernel of the active backend accepted the input."""


@dataclass(frozen=True)
class Kernel:
    """One implementation of `op` for `backend`.

    fn(backend, *args, **kwargs) computes the op with the same arguments as the public entry point.
    check(backend, *args, **kwargs) returns None when the kernel takes the input, else the reason.
    """

    op: str
    backend: str
    name: str
    fn: Callable
    check: Optional[Callable] = None
    doc: str = ""

    def why_not(self, backend: Backend, *args, **kwargs) -> Optional[str]:
        if self.check is None:
            return None
        return self.check(backend, *args, **kwargs)


_TABLE: Dict[Tuple[str, str], List[Kernel]] = {}
_LOADED: set = set()
_STATS = {"served": Counter(), "fallback": Counter()}
_STATE = threading.local()
_DEFAULT: dict = {}
_STRICT = {"on": os.environ.get("FLUX_NPU_STRICT", "") not in ("", "0")}


def register_kernel(op: str, backend: str, name: str, check: Optional[Callable] = None, doc: str = ""):
    """Decorator: register `fn` as kernel `name` of `op` on `backend` (appended: earlier wins)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")

    def deco(fn):
        kernels = _TABLE.setdefault((op, backend), [])
        kernels[:] = [k for k in kernels if k.name != name]
        kernels.append(Kernel(op, backend, name, fn, check, doc or (fn.__doc__ or "").strip().split("\n")[0]))
        return fn

    return deco


def _ensure_loaded(backend: Backend) -> None:
    if backend.name in _LOADED:
        return
    _LOADED.add(backend.name)
    for mod in backend.kernel_modules:
        importlib.import_module(mod)


def kernels_for(op: str, backend: Backend) -> List[Kernel]:
    _ensure_loaded(backend)
    return list(_TABLE.get((op, backend.name), ()))


def fused_ops(backend: Backend) -> List[str]:
    """Ops with at least one registered kernel on `backend` (its "fused" capabilities)."""
    _ensure_loaded(backend)
    return [op for op in OPS if _TABLE.get((op, backend.name))]


def explain(op: str, backend: Backend, *args, **kwargs) -> Tuple[Optional[str], List[str]]:
    """(name of the kernel that would serve, [reasons of those that decline]) for these inputs."""
    reasons = []
    for k in kernels_for(op, backend):
        why = k.why_not(backend, *args, **kwargs)
        if why is None:
            return k.name, reasons
        reasons.append(f"{k.name}: {why}")
    if not reasons:
        reasons.append(f"no {op} kernel registered for backend {backend.name}")
    return None, reasons


# -- active backend ---------------------------------------------------------------------------


def _stack() -> list:
    s = getattr(_STATE, "stack", None)
    if s is None:
        s = _STATE.stack = []
    return s


def active_backend() -> Backend:
    s = _stack()
    if s:
        return s[-1]
    env = os.environ.get("FLUX_NPU_BACKEND", "")
    if _DEFAULT.get("env") != env or "backend" not in _DEFAULT:
        _DEFAULT.update(env=env, backend=get_backend())
    return _DEFAULT["backend"]


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


def set_strict(on: bool = True) -> None:
    """Strict mode: raise KernelDeclined when a registered kernel declines an input, instead of
    falling back to the reference. (An op with no kernel at all on a backend is served by the
    reference in either mode: that is its implementation there, not a fallback.)"""
    _STRICT["on"] = bool(on)


def dispatch_stats() -> dict:
    """{'served': Counter((op, backend, kernel)), 'fallback': Counter((op, backend, reason))}."""
    return {k: Counter(v) for k, v in _STATS.items()}


def record_fallback(op: str, backend: str, reason: str) -> None:
    """Count a hand-back to stock code that happened outside `dispatch` (a patch whose replacement
    passed these inputs to the original). Shown by `dispatch_stats()['fallback']` like a declined
    kernel; strict mode raises KernelDeclined with the reason instead."""
    if _STRICT["on"]:
        raise KernelDeclined(f"{op} on backend {backend}: handed back to the original code ({reason})")
    _STATS["fallback"][(op, backend, reason)] += 1


def reset_dispatch_stats() -> None:
    for c in _STATS.values():
        c.clear()


def dispatch(op: str, reference: Callable, backend, args: tuple, kwargs: dict):
    """Run `op` on the active (or given) backend's first kernel that accepts the input, else the
    reference, recording which served and why others declined."""
    b = active_backend() if backend is None else get_backend(backend)
    reasons = None
    table = _TABLE.get((op, b.name))
    if table is None and b.name not in _LOADED:
        _ensure_loaded(b)
        table = _TABLE.get((op, b.name))
    for k in table or ():
        why = k.check(b, *args, **kwargs) if k.check is not None else None
        if why is None:
            _STATS["served"][(op, b.name, k.name)] += 1
            return k.fn(b, *args, **kwargs)
        (reasons := reasons or []).append(f"{k.name}: {why}")
    _STATS["served"][(op, b.name, "reference")] += 1
    if reasons:
        reason = "; ".join(reasons)
        if _STRICT["on"]:
            raise KernelDeclined(f"{op} on backend {b.name}: no kernel accepted the input ({reason})")
        _STATS["fallback"][(op, b.name, reason)] += 1
    return reference(*args, **kwargs)
