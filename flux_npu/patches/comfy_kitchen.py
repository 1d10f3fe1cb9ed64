"""A flux_npu backend in comfy-kitchen's registry (issue 15 item 2).

Current ComfyUI sends RoPE (`apply_rope`, `apply_rope1`) through `comfy.quant_ops.ck`, i.e.
comfy-kitchen, outside training (its Flux has no `adaln` call as of 2026-08; ours is registered for
other callers of comfy-kitchen's `adaln`). comfy-kitchen picks, per call, the first
backend in its priority list whose declared constraints (`FunctionConstraints`: devices, dtypes,
call rules) accept the arguments. So instead of displacing that route, `patch()` registers a backend
named `flux_npu_<backend>` there whose functions are our ops, declares what they take as data, and
puts it at the priority the user chose (`patch(comfy_kitchen="first" | "last" | index | None)`;
"first" by default; None: not registered). Calls our backend declines go to comfy-kitchen's next
backend, by its own rules. Undo disables the backend and puts the previous priority list back.

While this route is on, a ComfyUI `apply_rope` / `apply_rope1` that itself calls comfy-kitchen is
left as written (comfy-kitchen serves it with our backend; in training, where ComfyUI skips
comfy-kitchen, its plain torch code runs — and the patched `attention` applies RoPE with our op
itself). Without comfy-kitchen, or with `comfy_kitchen=None`, those functions are replaced as in the
older layout.
"""

from __future__ import annotations

import importlib.util
import types
import weakref

import torch

from .. import ops
from .registry import register_patch_set
from .routes import RowStats, run_counted
from .spec import PATCHED, SKIPPED, PatchSet, exact

NAME_PREFIX = "flux_npu_"
FUNCTIONS = ("apply_rope", "apply_rope1", "adaln")
_ROUTE = {"priority": "first"}  # set by patch(comfy_kitchen=...)
_OWNERS: dict[str, weakref.ref] = {}  # backend name -> the live handle that registered it


def set_route(priority) -> None:
    """Where our backend goes in comfy-kitchen's priority list: "first", "last", an index, or None."""
    if priority is not None and priority not in ("first", "last") and not (
        isinstance(priority, int) and not isinstance(priority, bool) and priority >= 0
    ):
        raise ValueError(f"patch(comfy_kitchen=...) takes 'first', 'last', a list index >= 0 or None; got {priority!r}")
    _ROUTE["priority"] = priority


def route_on() -> bool:
    """Whether our kernels reach ComfyUI through comfy-kitchen (installed, and not switched off)."""
    if _ROUTE["priority"] is None:
        return False
    try:
        return importlib.util.find_spec("comfy_kitchen") is not None
    except (ImportError, ValueError):
        return False


def calls_comfy_kitchen(fn) -> bool:
    """Whether fn's own code calls comfy-kitchen (`comfy.quant_ops.ck.<name>(...)`)."""
    code = getattr(fn, "__code__", None)
    return code is not None and "ck" in code.co_names and "quant_ops" in code.co_names


def trim_pe(freqs_cis, x):
    """ComfyUI's rule for frequencies of more positions than x has (its `_apply_rope1`, and
    comfy-kitchen's `trim_rope_freqs`): x rotates with the first L of them (dim 2 of the BFL
    (B, 1, L, D/2, 2, 2) form). The Flux KV cache (FluxKVCache: reference-image keys cached, queries
    without them) calls attention with pe of k's length and a shorter q."""
    if (isinstance(freqs_cis, torch.Tensor) and isinstance(x, torch.Tensor) and x.dim() > 2 and freqs_cis.dim() > 2
            and x.shape[2] != 1 and freqs_cis.shape[2] > x.shape[2]):
        return freqs_cis[:, :, :x.shape[2]]
    return freqs_cis


def _pe_fits(freqs_cis, x) -> bool:
    freqs_cis = trim_pe(freqs_cis, x)
    return (
        isinstance(freqs_cis, torch.Tensor) and isinstance(x, torch.Tensor) and freqs_cis.dim() >= 4
        and tuple(freqs_cis.shape[-2:]) == (2, 2) and freqs_cis.shape[-3] * 2 == x.shape[-1]
        and freqs_cis.shape[-4] == x.shape[-2]
    )


def _broadcasts(t, x) -> bool:
    try:
        return tuple(torch.broadcast_shapes(t.shape, x.shape)) == tuple(x.shape)
    except RuntimeError:
        return False


def _constraints(backend):
    """What our functions take, declared as comfy-kitchen data: the backend's device, its float
    dtypes, and the few shape rules (BFL rotation matrices for q's shape; AdaLN modulation in x's
    dtype, broadcasting to x)."""
    from comfy_kitchen.constraints import FunctionConstraints, ParamConstraint, ValidationResult

    floats = frozenset(d for d in (torch.float32, torch.float16, torch.bfloat16) if d in backend.dtypes)
    devices = frozenset({backend.device_type})

    def rope_rule(*names):
        def rule(kwargs):
            for n in names:
                if not _pe_fits(kwargs.get("freqs_cis"), kwargs.get(n)):
                    return ValidationResult.fail("freqs_cis", f"not (..., L, D/2, 2, 2) for {n} (flux_npu)")
            return ValidationResult.ok()

        return rule

    def adaln_rule(kwargs):
        x = kwargs.get("x")
        for n in ("scale", "shift"):
            t = kwargs.get(n)
            if not isinstance(t, torch.Tensor) or t.dtype != x.dtype or not _broadcasts(t, x):
                return ValidationResult.fail(n, "not in x's dtype or not broadcasting to x (flux_npu)")
        return ValidationResult.ok()

    p = ParamConstraint(dtypes=floats)
    return {
        "apply_rope": FunctionConstraints(params={"xq": p, "xk": p, "freqs_cis": p}, default_devices=devices,
                                          call_rules=(rope_rule("xq", "xk"),)),
        "apply_rope1": FunctionConstraints(params={"x": p, "freqs_cis": p}, default_devices=devices,
                                           call_rules=(rope_rule("x"),)),
        "adaln": FunctionConstraints(params={"x": p, "scale": p, "shift": p}, default_devices=devices,
                                     call_rules=(adaln_rule,)),
    }


def _functions(backend, stats: RowStats):
    def apply_rope(xq, xk, freqs_cis):
        return run_counted(stats, lambda: (ops.apply_rope(xq, trim_pe(freqs_cis, xq), backend=backend),
                                           ops.apply_rope(xk, trim_pe(freqs_cis, xk), backend=backend)), (), {})

    def apply_rope1(x, freqs_cis):
        return run_counted(stats, lambda: ops.apply_rope(x, trim_pe(freqs_cis, x), backend=backend), (), {})

    def adaln(x, scale, shift, eps=1e-6):
        return run_counted(stats, lambda: ops.layer_norm_modulate(x, shift, scale, eps, backend=backend), (), {})

    return types.SimpleNamespace(apply_rope=apply_rope, apply_rope1=apply_rope1, adaln=adaln)


def register(handle, module) -> None:
    """PatchSet.apply for the comfy_kitchen module: register our backend, recorded for undo."""
    priority = _ROUTE["priority"]
    if priority is None:
        handle.add_row(module.__name__, "registry", SKIPPED, "patch(comfy_kitchen=None): no flux_npu backend there")
        return
    registry = getattr(module, "registry", None)
    if registry is None or not hasattr(registry, "register") or not hasattr(registry, "set_priority"):
        handle.add_row(module.__name__, "registry", SKIPPED, "no comfy-kitchen registry with register/set_priority")
        return
    name = NAME_PREFIX + handle.backend.name
    owner = _OWNERS.get(name)
    if owner is not None and owner() is not None and owner().active:
        handle.add_row(module.__name__, "registry", SKIPPED,
                       f"{name} already registered by another live flux_npu handle")
        return
    try:
        caps = _constraints(handle.backend)
    except Exception as exc:  # an older comfy-kitchen without FunctionConstraints / ValidationResult
        handle.add_row(module.__name__, "registry", SKIPPED, f"cannot declare constraints: {type(exc).__name__}: {exc}")
        return
    before = list(getattr(registry, "_priority", ["ascend", "cuda", "triton", "eager"]))
    stats = RowStats()
    registry.register(name, _functions(handle.backend, stats), caps)
    registry.enable(name)  # registered (and disabled) by an earlier, undone handle
    rest = [b for b in before if b != name]
    at = 0 if priority == "first" else len(rest) if priority == "last" else min(priority, len(rest))
    after = rest[:at] + [name] + rest[at:]
    registry.set_priority(after)

    _OWNERS[name] = weakref.ref(handle)

    def undo():
        _OWNERS.pop(name, None)
        registry.disable(name)
        if list(getattr(registry, "_priority", after)) == after:  # nobody reordered it since
            registry.set_priority(before)

    handle.on_undo(undo)
    handle.add_row(module.__name__, "registry", PATCHED,
                   f"backend {name} registered for {', '.join(FUNCTIONS)} (-> ops.apply_rope, "
                   f"ops.layer_norm_modulate) at priority {at} of {after}", stats)


register_patch_set(PatchSet(target="bfl", matches=exact("comfy_kitchen"), specs=[], describe="comfy-kitchen registry",
                            apply=register))
