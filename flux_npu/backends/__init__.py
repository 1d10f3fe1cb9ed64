"""Backend registry and selection.

Selection order: an explicit name > the `FLUX_NPU_BACKEND` environment variable > auto-detection
(registered backends by priority: npu, then cuda, then cpu), where detection asks each backend's
probe whether a device is actually present, not merely whether its vendor package imports.
The choice and the reason for it are logged once and kept for the report (`selection_report()`).
"""

from __future__ import annotations

import logging
import os

from .base import Backend, CPUDeviceUtils, DeviceUtils, Timer

logger = logging.getLogger("flux_npu")

ENV_VAR = "FLUX_NPU_BACKEND"

_REGISTRY: dict[str, Backend] = {}
_LAST_SELECTION: dict = {}
# Bumped whenever the registry changes: the op table re-resolves its cached default backend then
# (instead of reading FLUX_NPU_BACKEND on every op call).
_GENERATION = [0]
_DEFAULT_RESOLVED: list = []  # [generation, backend] of the last get_backend() without a name
# Called when a backend's runtime state is reset (the op table registers its plan invalidation
# here, so this package never imports flux_npu.ops: no import circle between the two).
_RESET_LISTENERS: list = []


def runtime_reset() -> None:
    """A backend's runtime state (e.g. its vendor import, device probes) was reset: re-resolve the
    default backend and let the op table drop the dispatch plans derived from that state."""
    _GENERATION[0] += 1
    for fn in list(_RESET_LISTENERS):
        fn()


class BackendError(RuntimeError):
    """An unknown or unavailable backend was asked for."""


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Register a backend description. Third parties call this with their own `Backend`."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend expects a flux_npu.Backend, got {type(backend).__name__}")
    if backend.name != backend.name.strip().lower() or not backend.name:
        # lookups lower-case the requested name, so a mixed-case entry could never be fetched
        raise BackendError(
            f"backend name {backend.name!r} must be non-empty lower case without surrounding spaces; "
            f"register it as {backend.name.strip().lower()!r} (dataclasses.replace(backend, name=...))"
        )
    if backend.name in _REGISTRY and not replace:
        raise BackendError(f"a backend named {backend.name!r} is already registered; pass replace=True to override it")
    _REGISTRY[backend.name] = backend
    _GENERATION[0] += 1
    return backend


def unregister_backend(name: str) -> None:
    _REGISTRY.pop(name.strip().lower(), None)
    _GENERATION[0] += 1


def registered_backends() -> list[Backend]:
    return sorted(_REGISTRY.values(), key=lambda b: (b.priority, b.name))


def available_backends() -> list[str]:
    """Names of the registered backends usable on this machine, in detection order."""
    return [b.name for b in registered_backends() if b.available]


def _describe_all() -> str:
    lines = []
    for b in registered_backends():
        reason = b.unavailable_reason()
        lines.append(f"  {b.name}: " + ("available" if reason is None else f"unavailable ({reason})"))
    return "\n".join(lines)


def get_backend(name: str | Backend | None = None) -> Backend:
    """Return the backend to use.

    `name` may be a registered name, a `Backend` (returned as is), or None: then `FLUX_NPU_BACKEND`,
    then auto-detection. Unknown or unavailable names raise `BackendError` naming the known
    backends and why each is or is not usable.
    """
    if isinstance(name, Backend):
        return name
    if name is not None and not isinstance(name, str):
        raise TypeError(f"backend must be a backend name (str), a Backend or None, got {type(name).__name__} "
                        f"{name!r}; registered backends: {', '.join(b.name for b in registered_backends())}")
    how = "explicit"
    if name is None and os.environ.get(ENV_VAR):
        name, how = os.environ[ENV_VAR].strip(), f"env {ENV_VAR}"
    if name is None:
        skipped = []
        for b in registered_backends():
            reason = b.unavailable_reason()
            if reason is None:
                _record(b, "auto-detect", skipped)
                _DEFAULT_RESOLVED[:] = [_GENERATION[0], b]
                return b
            skipped.append((b.name, reason))
        raise BackendError("no flux_npu backend is available:\n" + _describe_all())
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise BackendError(
            f"unknown flux_npu backend {name!r} (from {how}); known backends: "
            f"{', '.join(b.name for b in registered_backends())}.\n{_describe_all()}"
        )
    backend = _REGISTRY[key]
    reason = backend.unavailable_reason()
    if reason is not None:
        raise BackendError(
            f"flux_npu backend {key!r} (from {how}) is not available here: {reason}.\n"
            f"Pick another with {ENV_VAR}=<name> or get_backend('<name>'):\n{_describe_all()}"
        )
    _record(backend, how, [])
    if how != "explicit":
        _DEFAULT_RESOLVED[:] = [_GENERATION[0], backend]
    return backend


def _record(backend: Backend, how: str, skipped) -> None:
    key = (backend.name, how)
    if _LAST_SELECTION.get("key") != key:
        why = "; ".join(f"{n}: {r}" for n, r in skipped)
        logger.info("flux_npu backend %s (%s)%s", backend.name, how, f" [skipped {why}]" if why else "")
    _LAST_SELECTION.update(key=key, backend=backend.name, how=how, skipped=list(skipped))


def selection_report() -> dict:
    """How the last `get_backend()` chose: {'backend', 'how', 'skipped': [(name, reason)]}."""
    return {k: v for k, v in _LAST_SELECTION.items() if k != "key"}


def _register_builtin() -> None:
    from . import cpu, cuda, npu

    for mod in (npu, cuda, cpu):
        register_backend(mod.BACKEND, replace=True)


_register_builtin()

__all__ = [
    "Backend",
    "BackendError",
    "CPUDeviceUtils",
    "DeviceUtils",
    "Timer",
    "available_backends",
    "get_backend",
    "register_backend",
    "registered_backends",
    "selection_report",
    "unregister_backend",
]
