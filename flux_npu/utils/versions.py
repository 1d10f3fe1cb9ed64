"""Versions of the libraries flux-npu works with, read without importing heavy modules."""

from __future__ import annotations

import sys
from importlib import metadata

PACKAGES = ("torch", "torch_npu", "triton", "diffusers", "transformers", "accelerate", "peft", "deepspeed")


def package_version(name: str) -> str:
    if name == "torch" and "torch" in sys.modules:
        # the imported build's own string: PyPI's CUDA wheels (torch 2.11.0+cu130) record "2.11.0" in
        # their metadata, dropping the build tag that says which CUDA (or CPU) build ran
        return str(sys.modules["torch"].__version__)
    try:
        return metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"


def versions() -> dict:
    out = {"flux_npu": _own_version()}
    out.update({p: package_version(p) for p in PACKAGES})
    return out


def _own_version() -> str:
    from .. import __version__

    return __version__


DRIVER_INFO = "/usr/local/Ascend/driver/version.info"  # written by the NPU driver's installer


def _first_line_value(path: str, key: str):
    """`key=value` from a small Ascend install file (version.info, ascend_toolkit_install.info)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f.read(1 << 16).splitlines():
                k, _, v = line.partition("=")
                if k.strip().lower() == key.lower() and v.strip():
                    return v.strip()
    except OSError:
        pass
    return None


def ascend_versions() -> dict:
    """CANN and NPU driver versions (torch_npu's own report where it has one, else the install
    files CANN and the driver write); {} on a machine without either."""
    import glob
    import importlib.util
    import os

    out = {}
    if importlib.util.find_spec("torch_npu") is not None:
        try:
            import torch
            import torch_npu  # noqa: F401
            from torch_npu.npu.utils import get_cann_version  # CANN >= 8.1.RC1

            out["CANN"] = get_cann_version(module="CANN") or getattr(torch.version, "cann", None)
            out["NPU driver"] = get_cann_version(module="DRIVER") or None
        except Exception:
            pass
    home = os.environ.get("ASCEND_TOOLKIT_HOME") or "/usr/local/Ascend/ascend-toolkit/latest"
    if not out.get("CANN"):
        for info in glob.glob(os.path.join(home, "*", "ascend_toolkit_install.info")):
            out["CANN"] = _first_line_value(info, "version")
            break
    if not out.get("NPU driver"):
        out["NPU driver"] = _first_line_value(DRIVER_INFO, "Version")
    return {k: v for k, v in out.items() if v}


TRANSFER_TO_NPU = "torch_npu.contrib.transfer_to_npu"


def environment() -> dict:
    """The environment part of `flux-npu info`, in the order `accelerate env` / `diffusers-cli env`
    print theirs, ready to paste into an issue (every value a string)."""
    import os
    import platform

    import torch

    env = {"flux-npu version": _own_version(), "Platform": platform.platform(),
           "Python version": platform.python_version()}
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else (
        f"ROCm {torch.version.hip}" if getattr(torch.version, "hip", None) else "CPU build")
    env["PyTorch version"] = f"{torch.__version__} ({build})"
    for name in ("torch_npu", "triton", "diffusers", "transformers", "accelerate", "peft", "deepspeed", "numpy"):
        env[f"{name} version"] = package_version(name)
    env.update({f"{k} version": v for k, v in ascend_versions().items()})
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    env["CPU cores usable"] = str(cores)
    try:
        import psutil

        env["System RAM"] = f"{psutil.virtual_memory().total / 2**30:.1f} GB"
    except Exception:
        pass
    try:
        one, five, fifteen = os.getloadavg()
        env["Host load (1/5/15 min)"] = f"{one:.2f} / {five:.2f} / {fifteen:.2f} on {cores} cores"
    except OSError:
        pass
    if torch.cuda.is_available():
        env["GPU type"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    npu = getattr(torch, "npu", None)
    try:
        if npu is not None and npu.is_available():
            env["NPU type"] = ", ".join(npu.get_device_name(i) for i in range(npu.device_count()))
    except Exception:
        pass
    if TRANSFER_TO_NPU in sys.modules:  # it patches torch for the npu and, with it, turns Triton off for compile
        env["transfer_to_npu"] = "imported: torch.compile sees no Triton (it forces has_triton() to False)"
    env["FLUX_NPU_BACKEND"] = os.environ.get("FLUX_NPU_BACKEND", "(unset: auto-detect)")
    return env


def render_environment(env: dict) -> str:
    return "\n".join(["Copy-and-paste the text below in your GitHub issue", ""]
                     + [f"- {k}: {v}" for k, v in env.items()])


def system_line(env: dict) -> str:
    """One line of what `environment()` found that versions alone do not say (verify's report)."""
    keys = ("CANN version", "NPU driver version", "NPU type", "GPU type", "transfer_to_npu", "Host load (1/5/15 min)",
            "System RAM")
    return "; ".join(f"{k} {env[k]}" for k in keys if k in env)
