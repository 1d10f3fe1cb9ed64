"""Kernels, one package per backend, one file per op. Importing a backend's package registers its
kernels in the op table (`flux_npu.ops.registry`); the backend's `kernel_modules` name it, and
dispatch imports it on first use, so Triton and torch_npu load only when their backend runs."""

from __future__ import annotations

import importlib
import importlib.util


def import_op_files(package: str, first: tuple = ()) -> None:
    """Import `package`'s kernel file of every catalogue op (`kernels/<backend>/<op>.py`, where it
    has one), the modules in `first` before them (registration order is priority within an op).
    The op list is the catalogue's, so a new op's kernel file needs no line here."""
    from ..ops.catalogue import OPS

    for name in first:
        importlib.import_module(f"{package}.{name}")
    for op in OPS:
        if importlib.util.find_spec(f"{package}.{op}") is not None:
            importlib.import_module(f"{package}.{op}")
