"""Patches that swap Flux's hot ops for the active backend's kernels (see engine.py)."""

from . import xflux_ip  # noqa: F401  (registers the x-flux IP-adapter patch set)
from .engine import (
    DEFERRED,
    NOT_FOUND,
    OP_NAMES,
    PATCHED,
    PENDING,
    SKIPPED,
    PatchHandle,
    PatchSet,
    Row,
    Spec,
    known_targets,
    live_handles,
    patch,
    patch_module,
    register_patch_set,
    reset_routes,
    routes,
    select_ops,
)

__all__ = [
    "DEFERRED",
    "NOT_FOUND",
    "OP_NAMES",
    "PATCHED",
    "PENDING",
    "SKIPPED",
    "PatchHandle",
    "PatchSet",
    "Row",
    "Spec",
    "known_targets",
    "live_handles",
    "patch",
    "patch_module",
    "register_patch_set",
    "reset_routes",
    "routes",
    "select_ops",
]
