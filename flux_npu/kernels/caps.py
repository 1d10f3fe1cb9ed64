"""Kernel capabilities as data (the idea of xformers' fmha operator attributes and comfy-kitchen's
`FunctionConstraints`): each kernel declares what it takes, the common decline reasons are derived
from that declaration, and `flux-npu info` prints it. Only genuinely special conditions (mask
forms, RoPE layouts, SoC limits of one op) stay hand-written in the kernel's own check.

A family declares the shared part once (`TRITON` in kernels/cuda/_checks.py, `TORCH_NPU` in
kernels/npu/_support.py); a kernel narrows it with `using(...)` (its vendor op, its dtypes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._common import foreign_device

_SHORT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}


@dataclass(frozen=True)
class Caps:
    """What a kernel takes. `reason(backend, *tensors, row=n)` is None or why not, in this order:
    a tensor not on the backend's device; (library_first) the library or vendor op missing; a
    floating-point tensor of another dtype; an empty tensor (nonempty); (not library_first) the
    library; the device's own limits (`device_reason`, e.g. CUDA compute capability); the row
    length `row` above max_row (or empty rows)."""

    family: str  # what runs it: "triton", "torch_npu", "torch"
    dtypes: tuple = ()  # dtypes of the floating-point tensor arguments; () = any
    dtype_note: str = ""  # the end of the dtype reason, e.g. "the Triton kernels take ..."
    vendor_op: str = ""  # the library op the kernel calls, which must exist
    max_row: int | None = None  # longest last dim one program handles
    nonempty: bool = False
    library: Callable | None = None  # (backend, device_type, vendor_op) -> reason | None
    library_first: bool = False
    device_reason: Callable | None = None  # (backend, device_type, tensors) -> reason | None

    def using(self, **changes) -> Caps:
        return dataclasses.replace(self, **changes)

    def reason(self, backend, *tensors, row: int | None = None) -> str | None:
        why = foreign_device(backend, *tensors)
        if why:
            return why
        device_type = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), None)
        if self.library_first and self.library is not None:
            why = self.library(backend, device_type, self.vendor_op)
            if why:
                return why
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            if self.dtypes and t.is_floating_point() and t.dtype not in self.dtypes:
                return f"dtype {t.dtype}{self.dtype_note}"
            if self.nonempty and t.numel() == 0:
                return "empty tensor (nothing to launch)"
        if not self.library_first and self.library is not None:
            why = self.library(backend, device_type, self.vendor_op)
            if why:
                return why
        if self.device_reason is not None:
            why = self.device_reason(backend, device_type, tensors)
            if why:
                return why
        return None if row is None else self.row_reason(row)

    def row_reason(self, n: int) -> str | None:
        if self.max_row is None:
            return None
        if n > self.max_row:
            return f"row of {n} elements is longer than one block holds ({self.max_row})"
        if n < 1:
            return "empty rows"
        return None

    def describe(self) -> str:
        """One line for `flux-npu info`."""
        parts = [self.family + (f".{self.vendor_op}" if self.vendor_op else "")]
        if self.dtypes:
            parts.append("dtypes " + ",".join(_SHORT.get(d, str(d)) for d in self.dtypes))
        if self.max_row is not None:
            parts.append(f"rows <= {self.max_row}")
        if self.nonempty:
            parts.append("non-empty")
        return "; ".join(parts)
