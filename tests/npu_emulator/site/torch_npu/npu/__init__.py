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
