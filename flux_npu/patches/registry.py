"""The registry of patch sets, keyed by target group ("diffusers", "bfl", "transformers", ...).
Codebase modules register here; the engine reads it."""

from __future__ import annotations

from .spec import PatchSet

_SETS: dict[str, list[PatchSet]] = {}


def register_patch_set(ps: PatchSet) -> PatchSet:
    _SETS.setdefault(ps.target, []).append(ps)
    return ps
