"""Input checks of the cuda backend's Triton kernels: pure Python on shapes, dtypes and devices,
so they run on meta tensors (`flux-npu info`) and never import triton unless asked whether it
imports. Each returns None to accept or the reason it declines."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..caps import Caps

# Mirrors flux_npu.kernels.cuda._triton.MAX_ROW (a test checks they agree).
MAX_ROW = 16384
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """None if triton imports here, else why not (asked once per process)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    return None


@functools.lru_cache(maxsize=1)
def triton_installed() -> bool:
    """Whether a triton package is findable (no import: cheap, for reports on meta tensors)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ValueError, AttributeError):  # sys.modules["triton"] is None or has no spec
        return False


def _triton_library(backend, device_type, _op) -> str | None:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "") != "1":
        return "CPU tensors run Triton kernels only under TRITON_INTERPRET=1"
    if device_type == "meta":  # the info report: say whether triton is installed, without importing it
        return None if triton_installed() else "triton is not installed; pip install triton"
    return triton_import_error()


def _cuda_device(backend, device_type, tensors) -> str | None:
    return capability_reason(backend, tensors) if device_type == "cuda" else None


# What every Triton kernel takes, as data: the common reasons derive from it (kernels.caps).
TRITON = Caps("triton", dtypes=TRITON_DTYPES, dtype_note=": the Triton kernels take float32, bfloat16 and float16",
              max_row=MAX_ROW, nonempty=True, library=_triton_library, device_reason=_cuda_device)


def triton_reason(backend, *tensors) -> str | None:
    """The checks every Triton kernel shares (the `TRITON` declaration): triton present, tensors on
    the backend's device (CPU tensors only under the interpreter), dtypes the kernels compute in,
    the device's compute capability."""
    return TRITON.reason(backend, *tensors)


def capability_reason(backend, tensors) -> str | None:
    from ...backends.cuda import compute_capability

    t = next(t for t in tensors if isinstance(t, torch.Tensor))
    cc = compute_capability(t.device.index if t.device.index is not None else torch.cuda.current_device())
    if cc is None:
        return None
    low = backend.option("min_compute_capability", (7, 0))
    if cc < tuple(low):
        return f"compute capability {cc[0]}.{cc[1]} is below Triton's {low[0]}.{low[1]}"
    bf16 = backend.option("bf16_compute_capability", (8, 0))
    if cc < tuple(bf16) and any(isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 for x in tensors):
        return f"bfloat16 needs compute capability {bf16[0]}.{bf16[1]}, this device has {cc[0]}.{cc[1]}"
    return None


def row_reason(n: int) -> str | None:
    return TRITON.row_reason(n)


def freqs_reason(x: torch.Tensor, freqs, sequence_dim: int) -> str | None:
    """Whether the RoPE kernel takes these frequencies for x (shape rules as the reference)."""
    if x.dim() > 4:
        return f"x has {x.dim()} dims; the RoPE kernel takes at most 4"
    if x.shape[-1] % 2:
        return "odd last dim"
    if isinstance(freqs, torch.Tensor):
        if freqs.dim() < 3 or tuple(freqs.shape[-2:]) != (2, 2) or freqs.shape[-3] * 2 != x.shape[-1]:
            return f"BFL freqs must be (..., S, D/2, 2, 2), got {tuple(freqs.shape)}"
        if freqs.dim() - 3 > x.dim() - 1:
            return f"freqs {tuple(freqs.shape)} have more leading dims than x {tuple(x.shape)}"
        try:
            if torch.broadcast_shapes(freqs.shape[:-3], x.shape[:-1]) != x.shape[:-1]:
                return f"freqs {tuple(freqs.shape)} broadcast x {tuple(x.shape)} to a larger shape"
        except RuntimeError:
            return f"freqs {tuple(freqs.shape)} do not broadcast against x {tuple(x.shape)}"
        tensors = (freqs,)
    elif isinstance(freqs, (tuple, list)) and len(freqs) == 2 and all(isinstance(t, torch.Tensor) for t in freqs):
        if x.dim() != 4 or sequence_dim not in (1, 2):
            return f"(cos, sin) form needs a 4-D x and sequence_dim 1 or 2 (got {x.dim()}-D, {sequence_dim})"
        want = (x.shape[sequence_dim], x.shape[-1])
        if any(tuple(t.shape) != want for t in freqs):
            return f"cos/sin must be (S, D) = {want}"
        tensors = tuple(freqs)
    else:
        return "freqs are neither a BFL rotation tensor nor a (cos, sin) pair"
    if any(t.requires_grad for t in tensors):
        return "freqs require grad (the kernel gives frequencies no gradient)"
    return None


def group_split(x_shape, t_shape) -> int | None:
    """Number k of x's leading dims that `t` (broadcast against x) varies along, when t is
    constant along all later ones ((B, 1, D) against (B, S, D): k = 1); None otherwise."""
    lead_x = tuple(x_shape[:-1])
    if len(t_shape) > len(x_shape) or not len(t_shape):
        return None
    lead_t = (1,) * (len(x_shape) - len(t_shape)) + tuple(t_shape[:-1])
    k = 0
    while k < len(lead_x) and lead_t[k] == lead_x[k]:
        k += 1
    if any(d != 1 for d in lead_t[k:]):
        return None
    return k
