"""What every NPU kernel check asks first, and the one-off probes of installed op signatures."""

from __future__ import annotations

import inspect

import torch

from ...backends import npu as _npu
from ..caps import Caps

NPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _torch_npu_library(backend, device_type, op_name) -> str | None:
    mod, why = _npu.torch_npu_or_reason()
    if mod is None:
        return why
    if op_name and not hasattr(mod, op_name):
        return f"this torch_npu ({getattr(mod, '__version__', '?')}) has no {op_name}"
    return None


# What the torch_npu kernels take, as data (kernels.caps); each kernel names its op with
# TORCH_NPU.using(vendor_op=...). No allocation and no host sync: it also runs on meta tensors.
TORCH_NPU = Caps("torch_npu", dtypes=NPU_DTYPES, dtype_note=" (torch_npu fused ops take float16, bfloat16 and float32)",
                 library=_torch_npu_library, library_first=True)
# npu kernels that are plain torch ops (addcmul, layer_norm): the device and dtype rules only
NPU_TORCH = TORCH_NPU.using(family="torch", library=None)


def prelude(backend, op_name: str, *tensors) -> str | None:
    """None when `tensors` are the backend's and torch_npu has `op_name`, else the reason."""
    return TORCH_NPU.using(vendor_op=op_name, dtypes=()).reason(backend, *tensors)


def dtype_declines(*tensors) -> str | None:
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype not in NPU_DTYPES:
            return f"dtype {t.dtype}{TORCH_NPU.dtype_note}"
    return None


def torch_npu():
    mod, why = _npu.torch_npu_or_reason()
    if mod is None:  # only reachable when a kernel is called without its check
        raise RuntimeError(why)
    return mod


def _param_names(mod, op_name: str):
    """Parameter names of torch_npu.<op_name>: from the registered schema
    (torch.ops.npu.<op>.default), else the Python signature, else None."""
    try:
        packet = getattr(torch.ops.npu, op_name)
        return [a.name for a in packet.default._schema.arguments]
    except Exception:
        pass
    fn = getattr(mod, op_name, None)
    if fn is None:
        return None
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def op_has_param(op_name: str, param: str) -> str | None:
    """None when torch_npu.<op_name> takes `param`, else the reason. Decided once per process
    (cached with the torch_npu import): schema, then signature, then the shipped docstring,
    whose first line is the signature in torch_npu builds."""
    key = ("param", op_name, param)
    cache = _npu._CACHE
    if key not in cache:
        mod, why = _npu.torch_npu_or_reason()
        if mod is None:
            cache[key] = why
        else:
            names = _param_names(mod, op_name)
            if names is None:
                doc = getattr(getattr(mod, op_name, None), "__doc__", None) or ""
                cache[key] = None if param in doc else (
                    f"cannot confirm that torch_npu.{op_name} takes {param!r} (neither its schema, signature nor "
                    "docstring names it; builds before the 7.0.0 op-plugin branch lack it)"
                )
            else:
                cache[key] = None if param in names else (
                    f"this torch_npu's {op_name} has no {param!r} argument (parameters: {', '.join(names)}); "
                    "it appears with the 7.0.0 op-plugin branch"
                )
    return cache[key]


def jit_compile_declines(feature: str) -> str | None:
    """The reason `feature` cannot run under the current torch_npu compile mode, else None.

    npu_rotary_mul's interleave mode exists only with jit_compile=False (torch_npu 2.14.0
    docstring: with jit_compile=True only half mode, D == 128); jit_compile=False (the prebuilt
    binary kernels) is the Atlas A2/A3 default, set by `torch_npu.npu.set_compile_mode` and read
    by `torch_npu.npu.is_jit_compile_false()` (Ascend/op-plugin docs). A build without that query
    is taken to run its default. Read when a signature is planned (the checks are cached per
    input signature): a script that changes the mode after its first forward calls
    `flux_npu.ops.registry.invalidate_plans()` afterwards."""
    mod, why = _npu.torch_npu_or_reason()
    if mod is None:
        return why
    probe = getattr(getattr(mod, "npu", None), "is_jit_compile_false", None)
    if probe is None:
        return None
    try:
        binary = bool(probe())
    except Exception:  # a query failure must not crash a check; the op then reports for itself
        return None
    if binary:
        return None
    return (f"torch_npu.npu.set_compile_mode(jit_compile=True) is in effect and {feature} exists only with "
            "jit_compile=False (torch_npu 2.14.0 docstring of npu_rotary_mul: jit_compile=True has the half mode "
            "only, which rotates (x[i], x[i + D/2]), not Flux's adjacent pairs); call "
            "torch_npu.npu.set_compile_mode(jit_compile=False), the Atlas A2/A3 default, to use the fused op")
