"""Mixed-precision rules shared by every op and backend.

1. Reductions and elementwise maths accumulate in float32 (`compute_dtype`), whatever the input.
2. An op's output has its input's dtype unless the op says otherwise (rms_norm's `out_dtype`).
3. float64 is used only where the tensor's device computes it: the BFL reference builds RoPE
   frequencies in float64, which NPUs lack, so a backend without float64 builds them in float32
   on its device (`rope_compute_dtype`); the precision this costs is measured in the tests.
4. Autocast runs under the backend's `autocast_device_type` (`torch.autocast(b.autocast_device_type, ...)`).
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for an input dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rope_compute_dtype(backend, device: torch.device) -> torch.dtype:
    """float64 unless `device` belongs to a backend without float64 compute."""
    if device.type == backend.device_type and not backend.supports_float64:
        return torch.float32
    return torch.float64
