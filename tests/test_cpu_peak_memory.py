"""The CPU peak memory is the kernel's resident-set high-water mark (issue 19 item 2), not a
sampling thread's lower bound: a buffer that lives and dies between two reads is in the peak, and
a reset forgets what came before it."""

import sys

import pytest
import torch

from flux_npu.backends import cpu as cpu_backend

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")


def test_peak_sees_a_short_lived_buffer_and_reset_forgets_it():
    u = cpu_backend.BACKEND.utils
    u.reset_peak_memory()
    assert not u.peak_is_since_start
    before = u.peak_memory_bytes()
    big = torch.ones(256 * 2**20 // 4)  # 256 MiB, written, so resident
    big.add_(1)
    del big  # gone before anyone looks: a sampler reading now would miss it
    peak = u.peak_memory_bytes()
    assert peak - before >= 200 * 2**20, (before, peak)
    u.reset_peak_memory()  # the next measurement starts from the current RSS again
    assert u.peak_memory_bytes() < peak - 150 * 2**20
