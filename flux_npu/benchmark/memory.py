"""Memory for `flux-npu bench model`: out-of-memory recognition and the per-configuration memory
limit (the CPU peak is the kernel's: backends.base.CPUDeviceUtils)."""

from __future__ import annotations

import contextlib
import gc

import torch

from ..backends import Backend


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                               or "cannot allocate memory" in text)


def oom_message(exc: BaseException) -> str:
    """A short OOM reason: the size the allocator was asked for, when it says."""
    import re

    text = str(exc)
    m = re.search(r"tried to allocate (\d+) bytes", text, re.I)
    if m:
        return f"tried to allocate {int(m.group(1)) / 1e9:.3g} GB ({type(exc).__name__})"
    m = re.search(r"tried to allocate ([\d.]+ [KMGT]i?B)", text, re.I)
    if m:
        return f"tried to allocate {m.group(1)} ({type(exc).__name__})"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[0][:160] if lines else type(exc).__name__)


@contextlib.contextmanager
def memory_limit(backend: Backend, limit_gb: float | None):
    """Impose a real allocation limit for one configuration: on a GPU/NPU the allocator's
    per-process fraction; on CPU (Linux) an address-space rlimit of the current size plus
    `limit_gb`, so that allocations beyond it fail with the allocator's own error. On CPU the cap
    counts address space, so heap arenas already reserved earlier in the process absorb some
    allocations, and a tight cap also starves oneDNN's JIT used by bf16 GEMMs ("could not create
    a primitive"): use it in a fresh process for reproducible OOM points."""
    if not limit_gb:
        yield
        return
    if backend.device_type == "cpu":
        import resource

        import psutil

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = psutil.Process().memory_info().vms + int(limit_gb * 1e9)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return
    mod = getattr(torch, backend.device_type)
    total = mod.get_device_properties(mod.current_device()).total_memory
    mod.set_per_process_memory_fraction(min(1.0, limit_gb * 1e9 / total))
    try:
        yield
    finally:
        mod.set_per_process_memory_fraction(1.0)


def _free(backend: Backend):
    gc.collect()
    mod = getattr(torch, backend.device_type, None)
    if backend.device_type != "cpu" and mod is not None and hasattr(mod, "empty_cache"):
        mod.empty_cache()


# Below this an address-space cap leaves no room for the threads and libraries a run starts (a
# cap of 0.003 GB aborted in libgomp, 0.001 GB segfaulted): refused instead of crashing.
MIN_LIMIT_GB = 0.016


def check_memory_limit(presets, dt, limit_gb, backend: Backend, full_pipeline: bool) -> None:
    """Refuse, before anything runs, a memory limit no configuration could run under."""
    if limit_gb is None:
        return
    if not limit_gb > 0:
        raise ValueError(f"--memory-limit-gb {limit_gb} must be positive (leave it out for no limit)")
    if limit_gb < MIN_LIMIT_GB:
        raise ValueError(f"--memory-limit-gb {limit_gb} is too small to run anything: below {MIN_LIMIT_GB} GB the "
                         f"process cannot start its threads; use at least {MIN_LIMIT_GB}")
    if backend.device_type == "cpu":
        return  # on CPU the cap counts what a configuration allocates after the model is built
    from .pipeline import param_bytes

    for p in presets:
        need = param_bytes(p, dt, full_pipeline) / 1e9
        if limit_gb < need:
            raise ValueError(f"--memory-limit-gb {limit_gb} is smaller than the weights of preset {p} alone "
                             f"({need:.2f} GB in {str(dt).replace('torch.', '')}); the model could not be built "
                             f"under it: raise the limit to more than {need:.2f} or pick a smaller preset")
