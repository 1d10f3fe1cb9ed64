"""Versions of the libraries flux-npu works with, read without importing heavy modules."""

from __future__ import annotations

from importlib import metadata

PACKAGES = ("torch", "torch_npu", "triton", "diffusers", "transformers", "accelerate", "peft", "deepspeed")


def package_version(name: str) -> str:
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
