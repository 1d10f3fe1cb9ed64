"""EMULATED torch.npu: the device queries the flux_npu backend reads (contract emulator)."""

import time

from npu_emulator.record import CONFIG


def is_available():
    return True


def device_count():
    return 1


def current_device():
    return 0


def set_device(device):
    return None


def get_device_name(device=None):
    return CONFIG.get("device_name", "Ascend910B2 (emulated)")


def is_bf16_supported():
    return CONFIG.get("bf16", True)


def set_compile_mode(jit_compile=True):
    """torch_npu.npu.set_compile_mode: jit_compile=False selects the prebuilt binary kernels (the
    Atlas A2/A3 default), True online compilation (Ascend/op-plugin docs, set_compile_mode)."""
    if not isinstance(jit_compile, bool):
        raise TypeError(f"set_compile_mode(): jit_compile must be bool, not {type(jit_compile).__name__}")
    CONFIG["jit_compile"] = jit_compile


def is_jit_compile_false():
    """True when the binary kernels are in use (jit_compile=False), as torch_npu answers."""
    return not CONFIG.get("jit_compile", False)


def synchronize(device=None):
    return None


def empty_cache():
    return None


def manual_seed(seed):
    return None


def reset_peak_memory_stats(device=None):
    return None


def max_memory_allocated(device=None):
    return 0


class Event:
    """Wall-clock stand-in for torch.npu.Event (emulator timings mean nothing)."""

    def __init__(self, enable_timing=False):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        return None

    def elapsed_time(self, end):
        return (end._t - self._t) * 1000.0
