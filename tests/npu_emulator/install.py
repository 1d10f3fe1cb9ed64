"""Install / remove the torch_npu CONTRACT EMULATOR for the duration of a test.

    with emulated_npu_backend() as backend:   # the npu Backend bound to CPU tensors
        flux_npu.patch(backend=backend) ...

On entry: the stand-in package directory goes first on sys.path, `import torch_npu` then loads
the emulator (which attaches `torch.npu`), the npu backend's cached runtime state (torch_npu
import, SoC, op-signature probes) and the op table's cached default backend are reset, and the
npu kernels are registered. On exit all of it is removed again, so the rest of the test session
sees no torch_npu and auto-detection picks cpu again.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import torch

from . import record

SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site")
DEFAULT_DEVICE = "Ascend910B2 (emulated)"


def _forget_modules():
    for name in [n for n in sys.modules if n == "torch_npu" or n.startswith("torch_npu.")]:
        del sys.modules[name]


def _reset_flux_npu_state():
    from flux_npu.backends import npu as npu_backend
    from flux_npu.ops import registry

    npu_backend.reset_runtime_cache()
    registry.reset_default_backend()  # the op table's cached default backend
    return npu_backend, registry


@contextlib.contextmanager
def emulated_npu_backend(device_name: str = DEFAULT_DEVICE, bf16: bool = True, rotary_mode: bool = True):
    """Yield `flux_npu.backends.npu.BACKEND.with_device_type("cpu")` with the emulator installed.

    device_name / bf16: what the emulated `torch.npu.get_device_name()` / `is_bf16_supported()`
    answer (e.g. "Ascend910A (emulated)", False for a 910A). rotary_mode=False emulates a
    torch_npu build whose npu_rotary_mul predates the `rotary_mode` argument.
    """
    mod = sys.modules.get("torch_npu")
    if mod is not None and not getattr(mod, "EMULATED", False):
        raise RuntimeError("a real torch_npu is imported in this process; the contract emulator will not shadow it")
    had_npu = hasattr(torch, "npu")
    record.CONFIG.clear()
    record.CONFIG.update(device_name=device_name, bf16=bf16, rotary_mode=rotary_mode)
    record.clear()
    _forget_modules()
    sys.path.insert(0, SITE)
    importlib.invalidate_caches()
    try:
        torch_npu = importlib.import_module("torch_npu")
        assert getattr(torch_npu, "EMULATED", False), f"imported {torch_npu.__file__}, not the emulator"
        if not rotary_mode:
            torch_npu.npu_rotary_mul = torch_npu._ops.legacy_npu_rotary_mul
        npu_backend, registry = _reset_flux_npu_state()
        registry._ensure_loaded(npu_backend.BACKEND)
        yield npu_backend.BACKEND.with_device_type("cpu")
    finally:
        while SITE in sys.path:
            sys.path.remove(SITE)
        _forget_modules()
        if not had_npu and hasattr(torch, "npu"):
            delattr(torch, "npu")
        importlib.invalidate_caches()
        _reset_flux_npu_state()
        record.CONFIG.clear()
