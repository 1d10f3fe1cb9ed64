"""The Ascend NPU backend: torch_npu fused ops, hccl, autocast 'npu', no float64.

torch_npu is imported only by the probe, by `soc_capabilities()` and by the kernels' checks,
never at flux_npu import time. The import result (module or the reason it failed) is cached;
`reset_runtime_cache()` forgets it, together with what was learnt about the SoC and the
installed op signatures (for a process that installs or swaps torch_npu after first use).

Per-SoC limits (the Backend record's `dtypes` are the union over SoCs; what applies to the
device at hand comes from `soc_capabilities()`):
- Atlas A2 / A3 training (Ascend910B*, Ascend910_93*): bfloat16, npu_fusion_attention,
  npu_rotary_mul interleave mode.
- Ascend910A / 910ProA / 910ProB: no bfloat16 (float16 with loss scaling), and neither
  npu_fusion_attention nor the interleave RoPE mode is documented for them: the kernels decline
  there and the reference runs.
"""

from __future__ import annotations

import importlib

import torch

from .base import Backend, DeviceUtils

_CACHE: dict = {}


def reset_runtime_cache() -> None:
    """Forget the cached torch_npu import, SoC description and op-signature probes (and the op
    table's dispatch plans and default backend, which were derived from them)."""
    _CACHE.clear()
    from .. import backends

    backends.runtime_reset()


def _import_torch_npu():
    """Import torch_npu; return (module, None) or (None, reason)."""
    try:
        return importlib.import_module("torch_npu"), None
    except BaseException as exc:  # CANN missing surfaces as ImportError, OSError or RuntimeError
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return None, f"torch_npu not importable: {type(exc).__name__}: {exc}"


def torch_npu_or_reason():
    """(torch_npu, None) or (None, why not), imported once per process (see reset_runtime_cache)."""
    if "torch_npu" not in _CACHE:
        _CACHE["torch_npu"] = _import_torch_npu()
    return _CACHE["torch_npu"]


def _probe():
    mod, reason = _import_torch_npu()
    if mod is None:
        return reason
    npu = getattr(torch, "npu", None)
    if npu is None:
        return "torch_npu imported but torch.npu is missing"
    if not npu.is_available():
        return "torch_npu imported but torch.npu.is_available() is False (no NPU device visible)"
    if int(npu.device_count()) < 1:
        return "torch_npu imported but torch.npu.device_count() is 0"
    return None


# -- per-SoC capabilities -------------------------------------------------------------------------


def soc_family(device_name: str) -> str:
    """'A2' (Ascend910B*), 'A3' (Ascend910_93*), '910A' (Ascend910A / 910ProA / 910ProB),
    '310P' (inference cards) or 'unknown', from `torch.npu.get_device_name()`."""
    n = device_name.replace(" ", "")
    if "910_93" in n or "910C" in n:
        return "A3"
    if "910B" in n and "910ProB" not in n:
        return "A2"
    if "310" in n:
        return "310P"
    if "910" in n:
        return "910A"
    return "unknown"


def soc_capabilities(index: int | None = None) -> dict:
    """What the NPU at hand can do, or why that is unknown.

    Keys: available (bool), reason (None or why no device could be asked), device_name, soc
    (see `soc_family`), bf16, fusion_attention, rotary_interleave (bools, None when unknown),
    limits (human-readable lines naming the SoC-dependent limits that apply). Cached for the
    current device (index None); cheap to call from a kernel check afterwards.
    """
    key = ("soc", index)
    if key in _CACHE:
        return _CACHE[key]
    caps = dict(available=False, reason=None, device_name=None, soc="unknown", bf16=None,
                fusion_attention=None, rotary_interleave=None, limits=[])
    mod, reason = torch_npu_or_reason()
    npu = getattr(torch, "npu", None)
    if mod is None:
        caps["reason"] = reason
    elif npu is None or not npu.is_available():
        caps["reason"] = "no NPU device visible (torch.npu.is_available() is False)"
    else:
        try:
            name = str(npu.get_device_name() if index is None else npu.get_device_name(index))
        except Exception as exc:  # a capability query must never crash a report or a check
            caps["reason"] = f"torch.npu.get_device_name() failed: {type(exc).__name__}: {exc}"
        else:
            fam = soc_family(name)
            bf16 = None
            if hasattr(npu, "is_bf16_supported"):
                try:
                    bf16 = bool(npu.is_bf16_supported())
                except Exception:
                    bf16 = None
            if bf16 is None:
                bf16 = fam in ("A2", "A3") if fam != "unknown" else None
            a2 = fam in ("A2", "A3") if fam != "unknown" else None
            caps.update(available=True, device_name=name, soc=fam, bf16=bf16, fusion_attention=a2, rotary_interleave=a2)
            if bf16 is False:
                caps["limits"].append(
                    f"{name}: no bfloat16 (use float16 with loss scaling); bf16 inputs run the reference")
            if a2 is False:
                caps["limits"].append(
                    f"{name}: npu_fusion_attention and npu_rotary_mul(interleave) are documented for Atlas A2/A3 "
                    "only; attention and RoPE run the reference"
                )
            if fam == "unknown":
                caps["limits"].append(f"{name}: SoC not recognised; fused ops are tried as on Atlas A2")
            caps["limits"].append("no float64 compute: RoPE frequencies are built in float32 on the device")
            caps["limits"].append("HCCL AllReduce: no float64 on A2; no bfloat16 on 910A")
    _CACHE[key] = caps
    return caps


def capability_rows(index: int | None = None) -> list:
    """(capability, value) rows for `flux-npu info`."""
    c = soc_capabilities(index)
    if not c["available"]:
        return [("npu device", f"none ({c['reason']})")]

    def yn(v):
        return "unknown" if v is None else ("yes" if v else "no")

    rows = [
        ("npu device", c["device_name"]),
        ("soc family", c["soc"]),
        ("bfloat16", yn(c["bf16"])),
        ("npu_fusion_attention", yn(c["fusion_attention"])),
        ("npu_rotary_mul interleave", yn(c["rotary_interleave"])),
    ]
    rows += [("limit", line) for line in c["limits"]]
    return rows


def soc_declines(dtype: torch.dtype | None = None, feature: str | None = None) -> str | None:
    """Reason the SoC at hand cannot run `feature` ('fusion_attention' / 'rotary_interleave') or
    compute in `dtype`, else None. Unknown capabilities never decline."""
    c = soc_capabilities()
    if not c["available"]:
        return None
    if dtype == torch.bfloat16 and c["bf16"] is False:
        return f"bfloat16 is not supported on {c['device_name']} (SoC {c['soc']})"
    if feature is not None and c.get(feature) is False:
        return f"{feature} is not available on {c['device_name']} (documented for Atlas A2/A3 only)"
    return None


class NPUDeviceUtils(DeviceUtils):
    """torch.npu mirrors torch.cuda (events, synchronize, peak memory); the name says the SoC."""

    def __init__(self):
        super().__init__("npu")

    def device_name(self) -> str:
        c = soc_capabilities()
        if not c["available"]:
            return f"unknown ({c['reason']})"
        bf16 = {True: "bf16", False: "no bf16", None: "bf16 unknown"}[c["bf16"]]
        return f"{c['device_name']} ({c['soc']}, {bf16})"


BACKEND = Backend(
    name="npu",
    device_type="npu",
    probe=_probe,
    dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
    supports_float64=False,
    dist_backend="hccl",
    autocast_device_type="npu",
    priority=10,
    utils_factory=NPUDeviceUtils,
    kernel_modules=("flux_npu.kernels.npu",),
    description="Ascend NPUs through torch_npu (npu_fusion_attention, npu_rotary_mul, npu_rms_norm)",
    options=(("capability_rows", capability_rows),),
)
