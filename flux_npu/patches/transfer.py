"""Opt-in: torch_npu.contrib.transfer_to_npu, for scripts written for CUDA.

Importing that module rewrites the process: `torch.cuda` becomes `torch_npu.npu` (so
`torch.cuda.is_available()` is True on an Ascend box), integer / 'cuda' device arguments of tensor
factories, `.to()` / `.cuda()` and autocast go to npu, the nccl entry of torch.distributed's
device->backend map is removed (hccl is used), `torch.jit.script` / `script_method` become no-ops
and torch's `has_triton()` answers False. These effects are global and cannot be undone, so it is
never switched on by a plain import: `patch(transfer_to_npu=True)` (or FLUX_NPU_TRANSFER_TO_NPU=1
with `import flux_npu.auto`) on the npu backend asks for it, and the patch report names what it
changes. It must be applied before the script creates its models and process groups, which is why
`patch()` applies it first."""

from __future__ import annotations

import importlib

SIDE_EFFECTS = (
    "global and not undoable: torch.cuda -> torch_npu.npu (torch.cuda.is_available() True), "
    "'cuda' device arguments -> npu, nccl -> hccl in torch.distributed, "
    "torch.jit.script/script_method disabled, torch has_triton() -> False"
)

MODULE = "torch_npu.contrib.transfer_to_npu"


def apply_transfer_to_npu(handle) -> None:
    """Import MODULE when the handle's backend is npu; record a row saying what happened."""
    if handle.backend.name != "npu":
        handle.add_row(MODULE, "*", "skipped", f"only for the npu backend (active: {handle.backend.name})")
        return
    try:
        importlib.import_module(MODULE)
    except Exception as exc:
        handle.add_row(MODULE, "*", "skipped", f"cannot import {MODULE}: {type(exc).__name__}: {exc}")
        return
    handle.add_row(MODULE, "*", "patched", SIDE_EFFECTS)
