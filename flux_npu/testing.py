"""The one tolerance table and error measure, shared by the tests, the parity suite and the
benchmarks' self-checks.

Relative error is ||out - ref|| / ||ref|| over the whole tensor, computed in float64; a NaN or
Inf anywhere makes it infinite, so NaN never passes."""

from __future__ import annotations

import math

import torch

TOLERANCES = {
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
    torch.float64: 1e-10,
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> float:
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {dtype}; known: {', '.join(str(d) for d in TOLERANCES)}")
    return TOLERANCES[dtype] * scale


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    o = out.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(o).all():
        return math.inf
    denom = r.norm().item()
    num = (o - r).norm().item()
    if denom == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / denom


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o = out.detach().to(torch.float64).cpu()
    if not torch.isfinite(o).all():
        return math.inf
    return (o - ref.detach().to(torch.float64).cpu()).abs().max().item() if o.numel() else 0.0


def assert_close(out, ref, dtype=None, scale: float = 1.0, what: str = "output") -> float:
    """Assert rel_err(out, ref) <= tolerance(dtype or out.dtype) * scale; returns the error."""
    tol = tolerance(dtype or out.dtype, scale)
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > tolerance {tol:.1e} ({dtype or out.dtype})"
    return err
