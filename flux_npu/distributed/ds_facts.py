"""The facts DeepSpeed-config rewriting rests on: the error and Change types, DeepSpeed's NPU
fixes by version, the op builders each optimizer needs, and the Target (backend, DeepSpeed
version, bf16 support, op builders) a config is rewritten for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config that cannot work on the target (or that DeepSpeed rejects)."""


class _Unset:
    def __repr__(self):
        return "<unset>"

    def __bool__(self):
        return False


UNSET = _Unset()  # the `old` (or `new`) of a Change for a key that was (or is now) absent


class Change(NamedTuple):
    path: str
    old: Any
    new: Any
    reason: str


# -- facts the rules rest on ------------------------------------------------------------------
# (version, why) pairs: DeepSpeed NPU fixes, from DISTRIBUTED.md and the PRs it cites.
OVERLAP_COMM_RACE_FIXED = "0.14.3"  # PR #5606: ZeRO-1/2 overlap_comm buffer race (losses differ on NPU)
NPU_FUSED_ADAM_FIXED = "0.14.5"  # PR #5777: NPU FusedAdam accuracy
NPU_INIT_BROKEN = ("0.17.3", "0.17.5")  # PR #7560: init_process_group "'device' object has no attribute 'index'"
ZERO2_OVERLAP_NAN_FIXED = "0.19.0"  # PR #7965: overlap-comm buffer lifetime NaN in ZeRO-2

SIZE_KEYS = (
    "reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
    "sub_group_size",
)

# Optimizer type -> the op builder DeepSpeed loads for it on the device (engine.py
# `_configure_basic_optimizer`; deepspeed/ops/{adam,lamb,lion}).
_DEVICE_BUILDER = {"adam": "FusedAdamBuilder", "adamw": "FusedAdamBuilder", "lamb": "FusedLambBuilder",
                   "lion": "FusedLionBuilder"}
_CPU_OFFLOAD_BUILDER = {"adam": "CPUAdamBuilder", "adamw": "CPUAdamBuilder", "adagrad": "CPUAdagradBuilder",
                        "lion": "CPULionBuilder"}


def _version(v):
    from packaging.version import Version

    return v if isinstance(v, Version) else Version(str(v))


def installed_deepspeed_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("deepspeed")
    except Exception:
        return None


def accelerator_op_builders(backend: str) -> frozenset | None:
    """The op builders the installed DeepSpeed ships for `backend`'s accelerator (DeepSpeed's
    `get_op_builder` falls back to NotImplementedBuilder for any other name, which raises at
    engine initialization: DeepSpeed issue #8626). None when unknown (cuda: the full set, built
    from source; or DeepSpeed missing)."""
    module = {"npu": "deepspeed.ops.op_builder.npu", "cpu": "deepspeed.ops.op_builder.cpu"}.get(backend)
    if module is None:
        return None
    try:
        import importlib

        mod = importlib.import_module(module)
    except Exception:
        return None
    return frozenset(n for n in dir(mod) if n.endswith("Builder") and n not in ("NotImplementedBuilder",)
                     and not n.startswith(("NPUOp", "CPUOp")))


def soc_supports_bf16(soc: str) -> bool:
    """Ascend SoC name -> bf16 support: Atlas A2/A3 training series (910B*, 910_93*) yes; the first
    910 (910A / 910ProA / 910PremiumA) no (CONTRACTS.md; DISTRIBUTED.md)."""
    s = soc.strip().lower().replace("ascend", "")
    if "910b" in s or "910_93" in s or "910c" in s:
        return True
    if s in ("910", "910a", "910proa", "910prob", "910premiuma") or s.startswith("910a"):
        return False
    raise DeepSpeedConfigError(
        f"unknown Ascend SoC {soc!r}: give one like 910A (no bf16) or 910B / Ascend910B3 / Ascend910_9391 (bf16)")


@dataclass(frozen=True)
class Target:
    """What the config will run on: backend name, DeepSpeed version there, bf16 support (None:
    unknown), op builders of DeepSpeed's accelerator for that backend (None: unknown)."""

    backend: str
    deepspeed_version: str
    bf16: bool | None = None
    op_builders: frozenset | None = None

    @classmethod
    def resolve(cls, backend=None, deepspeed_version=None, bf16=None, soc=None, op_builders=None) -> Target:
        name = _backend_name(backend)
        version = deepspeed_version or installed_deepspeed_version()
        if version is None:
            raise DeepSpeedConfigError(
                "DeepSpeed is not installed and no target version was given: pip install 'flux-npu[deepspeed]' "
                "or pass deepspeed_version=")
        if soc is not None:
            bf16 = soc_supports_bf16(soc)
        if bf16 is None and name == "npu":
            bf16 = _probe_npu_bf16()
        if bf16 is None and name == "cpu":
            bf16 = True  # DeepSpeed's CPU accelerator: is_bf16_supported() is True
        if op_builders is None:
            op_builders = accelerator_op_builders(name)
        return cls(name, str(version), bf16, op_builders)


def _backend_name(backend) -> str:
    from ..backends import Backend, get_backend, registered_backends

    if isinstance(backend, Backend):
        return backend.name
    if backend is None:
        return get_backend().name
    name = str(backend).strip().lower()
    known = [b.name for b in registered_backends()]
    if name not in known:
        raise DeepSpeedConfigError(f"unknown backend {backend!r}; known: {', '.join(known)}")
    return name  # availability is not required: configs are often written for another machine


def _probe_npu_bf16() -> bool | None:
    import torch

    try:
        import torch_npu  # noqa: F401  (torch.npu exists once torch_npu is imported)
    except Exception:
        return None
    npu = getattr(torch, "npu", None)
    try:
        if npu is not None and npu.is_available():
            return bool(npu.is_bf16_supported())
    except Exception:
        return None
    return None


# -- path helpers -----------------------------------------------------------------------------

def _get(d, path, default=UNSET):
    cur = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _set(d, path, value):
    parts = path.split(".")
    cur = d
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value


def _delete(d, path):
    parts = path.split(".")
    cur = _get(d, ".".join(parts[:-1])) if len(parts) > 1 else d
    if isinstance(cur, dict):
        cur.pop(parts[-1], None)


def _true(v) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")
