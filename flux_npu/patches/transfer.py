"""Opt-in: torch_npu.contrib.transfer_to_npu, for scripts written for CUDA.

It rewrites 'cuda' device strings, torch.cuda.* calls and the nccl backend name to their NPU
equivalents process-wide. Its side effects are global and cannot be undone, so it is never
switched on by a plain import: `patch(transfer_to_npu=True)` or `flux-npu run` on npu asks for it,
and the patch report names what it changes."""

from __future__ import annotations

import importlib

SIDE_EFFECTS = (
    "global and not undoable: 'cuda' device strings and torch.cuda.* -> npu, nccl -> hccl, "
    "torch.cuda.is_available() returns True, torch.cuda.DoubleTensor becomes float32, "
    "torch.jit.script disabled"
)

MODULE = "torch_npu.contrib.transfer_to_npu"


def apply_transfer_to_npu(handle) -> None:
    if handle.backend.name != "npu":
        handle.add_row(MODULE, "*", "skipped", f"only for the npu backend (active: {handle.backend.name})")
        return
    try:
        importlib.import_module(MODULE)
    except Exception as exc:
        handle.add_row(MODULE, "*", "skipped", f"cannot import {MODULE}: {type(exc).__name__}: {exc}")
        return
    handle.add_row(MODULE, "*", "patched", SIDE_EFFECTS)
