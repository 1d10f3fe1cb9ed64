"""Ascend's accuracy rule for a port, as msprobe applies it: against a high-precision reference of
the same inputs, the device's error may be at most RATIO_LIMIT times the benchmark device's (the
GPU, or whichever device recorded the golden), and its maximum elementwise relative error at most
MAX_REL_RATIO_LIMIT times the benchmark's. Used by `suite.check` on format-/3 goldens."""

from __future__ import annotations

import math

import torch

RATIO_LIMIT = 2.0
MAX_REL_RATIO_LIMIT = 10.0
LOW_PRECISION = (torch.bfloat16, torch.float16)

# msprobe's benchmark standard (api_accuracy_checker/precision_standard/standard_config.py, 26.2.0):
# relative errors are taken only where |reference| exceeds a per-dtype "small value", and a ratio's
# denominator is at least a per-dtype minimum error, so that a benchmark error of ~0 does not make
# any device error an infinite ratio.
SMALL_VALUE = {torch.float16: 2**-10, torch.bfloat16: 2**-10, torch.float32: 2**-20}
MINIMUM_ERROR = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float32: 2**-14}


def max_rel_err(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """max |out - ref| / |ref| over the elements whose |ref| exceeds SMALL_VALUE[dtype] (msprobe's
    normal-value domain), in float64. inf when out has a NaN or Inf; 0 when no element qualifies."""
    o = out.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(o).all():
        return math.inf
    keep = r.abs() > SMALL_VALUE.get(dtype, 2**-20)
    if not bool(keep.any()):
        return 0.0
    return ((o - r).abs()[keep] / r.abs()[keep]).max().item()


def _ratio(a: float, b: float, floor: float = 0.0) -> float:
    """a / max(b, floor); NaN anywhere is inf (never passes); 0 / 0 is 0."""
    if math.isnan(a) or math.isnan(b):
        return math.inf
    b = max(b, floor)
    if b > 0:
        return a / b
    return 0.0 if a == 0 else math.inf


def rate(tr, out: torch.Tensor, golden: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> None:
    """Fill a TensorResult's rule fields: this device's (`out`) and the golden device's errors
    against `ref64`, relative-norm and maximum elementwise, and their ratios."""
    from ..testing import rel_err

    tr.ref_rel, tr.golden_ref_rel = rel_err(out, ref64), rel_err(golden, ref64)
    tr.max_rel, tr.golden_max_rel = max_rel_err(out, ref64, dtype), max_rel_err(golden, ref64, dtype)
    tr.ratio = _ratio(tr.ref_rel, tr.golden_ref_rel)
    tr.max_rel_ratio = _ratio(tr.max_rel, tr.golden_max_rel, MINIMUM_ERROR.get(dtype, 0.0))


def reference64(spec, inputs: dict, module=None, backward: bool = True, param_grad_filter=None):
    """The case computed in float64 by the plain-torch references (blocks: unpatched diffusers) on
    the CPU, from the same low-precision inputs and parameters cast up exactly: the
    high-precision reference both devices' errors are measured against."""
    import copy

    from ..backends import get_backend
    from .suite import compute

    # detached copies: `compute` on the CPU may have made the caller's tensors leaves with grads
    t64 = {k: v.detach().double() if v.is_floating_point() else v.detach() for k, v in inputs.items()}
    m64 = None
    if module is not None:
        m64 = copy.deepcopy(module).double()
        for p in m64.parameters():
            p.grad = None
    return compute(spec, t64, get_backend("cpu"), module=m64, backward=backward, stock=True,
                   param_grad_filter=param_grad_filter)
