"""What the emulated torch_npu saw (EMULATOR bookkeeping, read by tests)."""

from __future__ import annotations

CALLS: list = []  # one dict per emulated op call: op, args (non-tensors), tensors, explicit
FLOAT64: list = []  # (op, argument name) for each float64 tensor that reached an emulated op
CONFIG: dict = {}  # set by install.emulated_npu_backend(): device_name, bf16, rotary_mode


def calls(op=None):
    return [c for c in CALLS if op is None or c["op"] == op]


def clear():
    CALLS.clear()
    FLOAT64.clear()
