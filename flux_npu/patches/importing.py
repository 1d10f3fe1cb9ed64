"""How patches reach modules imported later: an import hook that shows every freshly executed
module to the live handles, and a one-shot hook on a half-imported module's spec that runs when
its import finishes."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Callable

from .records import _HANDLES

logger = logging.getLogger("flux_npu")

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
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(cls._installed)
            cls._installed = None


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        name = getattr(module, "__name__", "")
        again = [h for h in _HANDLES if h.has_seen(name)]  # a reload, or a re-import after del sys.modules
        self._loader.exec_module(module)
        for h in list(_HANDLES):
            try:
                h.on_reexec(module) if h in again else h.on_import(module)
            except Exception as exc:  # never break the user's import
                logger.warning("flux_npu: patching %s on import failed: %s", module.__name__, exc)
