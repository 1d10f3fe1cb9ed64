"""Patches that swap Flux's hot ops for the active backend's kernels (see engine.py)."""

from .engine import (
    NOT_FOUND,
    PATCHED,
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
)

__all__ = [
    "NOT_FOUND",
    "PATCHED",
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
]
