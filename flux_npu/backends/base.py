"""The one description of a device backend.

A backend is data, not a class hierarchy: a frozen record of what a device can do (dtypes, float64),
how to reach it (device type, distributed backend, autocast type), a probe that says whether it
is usable here and, if not, why, and the few device utilities a benchmark needs. Kernels are not
part of the record: they live in the op table (`flux_npu.ops.registry`), keyed by (op, backend
name), so a backend can be described, listed and probed without importing Triton or torch_npu.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class DeviceUtils:
    """Device utilities a benchmark needs. The default works for any torch device module that
    mirrors `torch.cuda` (`torch.cuda`, `torch.npu`): synchronize, events, peak memory."""

    def __init__(self, device_type: str):
        self.device_type = device_type

    @property
    def module(self):
        return getattr(torch, self.device_type)

    def synchronize(self) -> None:
        self.module.synchronize()

    def timer(self) -> Timer:
        return _EventTimer(self.module)

    def reset_peak_memory(self) -> None:
        self.module.reset_peak_memory_stats()

    def peak_memory_bytes(self) -> int:
        return int(self.module.max_memory_allocated())

    def device_name(self) -> str:
        try:
            return str(self.module.get_device_name())
        except Exception as exc:  # a probe must never crash a report
            return f"unknown ({exc})"


class Timer:
    """start(); ...; stop() -> seconds. Implementations synchronize as their device needs."""

    def start(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def stop(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError


class _EventTimer(Timer):
    def __init__(self, module):
        self._module = module

    def start(self) -> None:
        self._begin = self._module.Event(enable_timing=True)
        self._end = self._module.Event(enable_timing=True)
        self._begin.record()

    def stop(self) -> float:
        self._end.record()
        self._end.synchronize()
        return self._begin.elapsed_time(self._end) / 1000.0


class _WallTimer(Timer):
    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        return time.perf_counter() - self._t0


class CPUDeviceUtils(DeviceUtils):
    """CPU: nothing to synchronize, wall-clock timing, and peak memory from the kernel (torch has no
    CPU allocator statistics): the process's resident-set high-water mark, VmHWM, which Linux resets
    to the current RSS when "5" is written to /proc/self/clear_refs. So a peak is exact, not sampled
    (no sampling thread). Elsewhere, `resource.getrusage`'s ru_maxrss: the peak since the process
    started, which cannot be reset (`peak_is_since_start` says so)."""

    def __init__(self):
        super().__init__("cpu")
        self.peak_is_since_start = False

    def synchronize(self) -> None:
        return None

    def timer(self) -> Timer:
        return _WallTimer()

    @staticmethod
    def _hwm_bytes():
        """VmHWM of this process (Linux), else None."""
        try:
            with open("/proc/self/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024  # kB
        except (OSError, ValueError, IndexError):
            pass
        return None

    def reset_peak_memory(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
            self.peak_is_since_start = self._hwm_bytes() is None
        except OSError:
            self.peak_is_since_start = True

    def peak_memory_bytes(self) -> int:
        hwm = None if self.peak_is_since_start else self._hwm_bytes()
        if hwm is not None:
            return hwm
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, kB elsewhere

    def device_name(self) -> str:
        """The CPU model (from /proc/cpuinfo where there is one) and the cores visible."""
        import os
        import platform

        model = ""
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        model = model or platform.processor() or platform.machine() or "cpu"
        return f"{model} ({os.cpu_count()} cores visible)"


@dataclass(frozen=True)
class Backend:
    """A device backend.

    name: registry key (`cpu`, `cuda`, `npu`, or a third party's).
    device_type: the torch device type whose tensors this backend's fused ops accept. Kernels
        decide by a tensor's device, never by what is importable; tests may replace it
        (`backend.with_device_type("cpu")`) to run a backend's code path on CPU tensors.
    probe: returns None when usable here, else a human-readable reason.
    dtypes: dtypes the device computes in.
    supports_float64: whether float64 compute is available (NPUs mostly lack it).
    dist_backend: torch.distributed backend name (gloo / nccl / hccl).
    autocast_device_type: the `device_type` for `torch.autocast`.
    priority: auto-detection order, lower first.
    utils_factory: builds the DeviceUtils (called lazily; may import the vendor module).
    kernel_modules: modules that register this backend's kernels in the op table; imported on
        the first dispatch to this backend (so Triton / torch_npu load lazily).
    options: free-form backend options as (key, value) pairs; `capability_rows` (a callable
        returning (capability, value) rows, e.g. per-SoC limits) is shown by `flux-npu info`.
    """

    name: str
    device_type: str
    probe: Callable[[], str | None]
    dtypes: frozenset[torch.dtype]
    supports_float64: bool
    dist_backend: str
    autocast_device_type: str
    priority: int = 100
    utils_factory: Callable[[], DeviceUtils] = field(default=None, compare=False, repr=False)
    description: str = ""
    kernel_modules: tuple = ()
    options: tuple = ()

    def __post_init__(self):
        # A small int naming this description by value: the op table keys its cached dispatch
        # plans on it (hashing all fields on every op call would cost more than the lookup).
        object.__setattr__(self, "plan_key", _plan_key(self))

    def unavailable_reason(self) -> str | None:
        try:
            return self.probe()
        except Exception as exc:  # a probe that crashes is a reason, not a crash
            return f"probe failed: {type(exc).__name__}: {exc}"

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None

    @property
    def utils(self) -> DeviceUtils:
        return _utils_for(self)

    def device(self, index: int | None = None) -> torch.device:
        return torch.device(self.device_type if index is None else f"{self.device_type}:{index}")

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether this backend's fused kernels may take `tensor` (decided by its device)."""
        return tensor.device.type == self.device_type

    def compute_float_dtype(self) -> torch.dtype:
        """The widest float dtype to compute in: float64 where supported, else float32."""
        return torch.float64 if self.supports_float64 else torch.float32

    def with_device_type(self, device_type: str) -> Backend:
        return dataclasses.replace(self, device_type=device_type)

    def option(self, key, default=None):
        return dict(self.options).get(key, default)


_PLAN_KEYS: dict = {}
_FRESH_KEYS = itertools.count(1 << 40)


def _plan_key(backend: Backend) -> int:
    try:
        return _PLAN_KEYS.setdefault(backend, len(_PLAN_KEYS))
    except TypeError:  # an unhashable option value: this instance gets a key of its own
        return next(_FRESH_KEYS)


_UTILS_CACHE: dict = {}


def _utils_for(backend: Backend) -> DeviceUtils:
    key = (backend.name, backend.device_type)
    if key not in _UTILS_CACHE:
        factory = backend.utils_factory or (lambda: DeviceUtils(backend.device_type))
        _UTILS_CACHE[key] = factory()
    return _UTILS_CACHE[key]
