"""The one tolerance table and error measure, shared by the tests, the parity suite and the
benchmarks' self-checks.

Relative error is ||out - ref|| / ||ref|| over the whole tensor (the difference in float32, float64
for float64 inputs); a NaN or Inf anywhere makes it infinite, so NaN never passes."""

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


def _norm(x: torch.Tensor) -> float:
    """||x||: the vectorised norm of x's own dtype, redone with float64 accumulation when that
    result could have under- or overflowed (a float64 reduction is ~15x slower on CPU)."""
    n = torch.linalg.vector_norm(x).item()
    if x.dtype != torch.float64 and not 1e-15 < n < 1e15:
        n = torch.linalg.vector_norm(x, dtype=torch.float64).item()
    return n


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    o, r = out.detach(), ref.detach()
    if o.device != r.device:
        o, r = o.cpu(), r.cpu()
    # a NaN or Inf makes the sum non-finite; only then is the element-wise check needed (large sums overflow too)
    if not math.isfinite(o.sum().item()) and not torch.isfinite(o).all():
        return math.inf
    ct = torch.promote_types(o.dtype, r.dtype)
    if ct.is_floating_point:
        # The difference in float32 (float64 for float64) is the exact difference rounded once
        # (relative 6e-8, far below any tolerance). No float64 copies: a Flux-width gradient (38 M
        # elements) costs one float32 temporary, not three float64 ones, and a fraction of the time.
        ct = ct if ct.itemsize >= 4 else torch.float32
        num, denom = _norm(o.to(ct) - r.to(ct)), _norm(r)
    else:  # integer, bool, complex: plain float64 (complex128) maths
        o64 = o.to(torch.complex128 if ct.is_complex else torch.float64)
        r64 = r.to(o64.dtype)
        num, denom = (o64 - r64).norm().item(), r64.norm().item()
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
