"""msprobe-compatible op names: register flux_npu's public ops with Ascend's precision tool.

msprobe (`pip install mindstudio-probe`, `from msprobe.pytorch import PrecisionDebugger`) dumps
every torch API a script calls and lines two runs up by API name. A patched run calls our fused
ops (torch_npu's names on npu, Triton launches on cuda, plain torch on cpu), so without help the
dumps of the same script on a GPU and on a 910B have nothing to align at the ops that matter.
msprobe's custom-API hook (`PrecisionDebugger.register_custom_api(module, name, prefix)`) wraps a
module attribute; every patch calls `flux_npu.ops.<op>` through that attribute, so registering the
public ops gives each device the same dump names, `flux_npu.<op>.<n>.forward` / `.backward`.

Opt-in, one line after creating the debugger (msprobe needs its instance first):

    from msprobe.pytorch import PrecisionDebugger
    debugger = PrecisionDebugger(config_path="config.json")   # or dump_path=..., task=..., level="L1"
    import flux_npu.probe; flux_npu.probe.register_msprobe()

`unregister_msprobe()` restores the original functions. `flux-npu verify --msprobe` does the same
around a short patched block run and leaves the dump in the report directory.

msprobe itself patches more than our ops, process-wide, and keeps it after its debugger stops:
torch's APIs, dynamo's frame conversion (after any later `torch.compile` every torch API is wrapped
again, and fullgraph compiles fail on its thread-id hooks), `torch.jit.script` and Triton's launcher.
Dump in a process of its own, or last: verify runs its msprobe phase after every other phase.
"""

from __future__ import annotations

from . import ops as _ops
from .ops.registry import OPS

PREFIX = "flux_npu"
_REGISTERED: dict = {}  # op name -> the original function we replaced


def _debugger():
    try:
        from msprobe.pytorch import PrecisionDebugger
    except ImportError as exc:
        raise RuntimeError(
            "msprobe is not installed: pip install mindstudio-probe (it imports without torch_npu; "
            f"the import failed with {type(exc).__name__}: {exc})"
        ) from exc
    return PrecisionDebugger


def register_msprobe(prefix: str = PREFIX, op_names=OPS) -> list:
    """Register `flux_npu.ops.<op>` for each public op with msprobe's custom-API hook; returns the
    dump-name stems (`flux_npu.attention`, ...). Create msprobe's PrecisionDebugger first.
    Registering again is a no-op for ops already registered."""
    PrecisionDebugger = _debugger()
    unknown = [n for n in op_names if n not in OPS]
    if unknown:
        raise ValueError(f"register_msprobe: unknown op(s) {unknown}; public ops are {', '.join(OPS)}")
    names = []
    for name in op_names:
        if name not in _REGISTERED:
            original = getattr(_ops, name)
            try:
                PrecisionDebugger.register_custom_api(_ops, name, prefix)
            except Exception as exc:
                if "PrecisionDebugger" in str(exc) or "instance" in str(exc).lower():
                    raise RuntimeError(
                        "register_msprobe(): create msprobe's PrecisionDebugger(...) before registering flux_npu's "
                        f"ops (msprobe said: {exc})"
                    ) from exc
                raise
            _REGISTERED[name] = original
        names.append(f"{prefix}.{name}")
    return names


def unregister_msprobe() -> None:
    """Put the original `flux_npu.ops` functions back (also when msprobe's debugger is gone)."""
    for name, original in list(_REGISTERED.items()):
        setattr(_ops, name, original)
        del _REGISTERED[name]


def registered() -> list:
    return list(_REGISTERED)


def dump_flux_step(backend, dump_path: str, preset: str = "tiny", dtype=None, resolution: int = 64,
                   seed: int = 0) -> dict:
    """One patched forward + backward of a random-init diffusers Flux (`preset`) on `backend`,
    dumped by msprobe (statistics, level L1) into `dump_path`, with flux_npu's ops registered.
    The same seed gives the same inputs and weights on every device (drawn on the CPU), so two
    devices' dumps compare op by op (`msprobe compare -tp <npu dump.json> -gp <gpu dump.json>`).
    Returns {'dump_json', 'stack_json', 'flux_npu_entries': names of our ops in the dump, 'kernels'}."""
    import glob
    import os

    import torch

    from . import models, patch
    from .ops import registry

    PrecisionDebugger = _debugger()
    b = registry.resolve_backend(backend)
    dtype = dtype or (torch.bfloat16 if torch.bfloat16 in b.dtypes and b.device_type != "cpu" else torch.float32)
    device = b.device()
    model = models.build_diffusers_flux(preset, dtype=dtype, device=device, seed=seed)
    inputs = models.make_inputs(models.preset_config(preset), resolution=resolution, text_len=8, dtype=dtype,
                                device=device, seed=seed)
    debugger = PrecisionDebugger(dump_path=dump_path, task="statistics", level="L1")
    fresh = [n for n in OPS if n not in _REGISTERED]
    register_msprobe()
    registry.reset_dispatch_stats()
    try:
        with patch(backend=b, targets=["diffusers"]):
            debugger.start()
            out = model(**inputs.as_kwargs(), return_dict=False)[0]
            out.float().pow(2).mean().backward()
            debugger.stop()
            debugger.step()
    finally:
        for name in fresh:  # leave what the caller registered itself
            if name in _REGISTERED:
                setattr(_ops, name, _REGISTERED.pop(name))
    stats = registry.dispatch_stats()
    dumps = sorted(glob.glob(os.path.join(dump_path, "**", "dump.json"), recursive=True))
    stacks = sorted(glob.glob(os.path.join(dump_path, "**", "stack.json"), recursive=True))
    if not dumps:
        raise RuntimeError(f"msprobe wrote no dump.json under {dump_path}")
    import json

    with open(dumps[-1]) as f:
        data = json.load(f).get("data", {})
    return {
        "dump_json": dumps[-1],
        "stack_json": stacks[-1] if stacks else None,
        "flux_npu_entries": sorted(k for k in data if k.startswith(PREFIX + ".")),
        "kernels": {f"{op} {k}": n for (op, _b, k), n in sorted(stats["served"].items()) if n},
    }
