"""flux-npu: run unchanged Flux training and inference code on Ascend NPU, CUDA and CPU.

    import flux_npu
    handle = flux_npu.patch()          # swap Flux's hot ops for the active backend's kernels
    print(handle.report_table())       # what was patched, and run-time hand-backs to stock code
    handle.undo()

    flux_npu.patch(exclude=["attention"])   # keep stock (or your chosen) attention, fuse the rest

or `import flux_npu.auto` at the top of a script. Backends: `flux_npu.get_backend()`,
`flux_npu.available_backends()`; ops: `flux_npu.ops.<name>`.
"""

from . import ops
from .backends import (
    Backend,
    BackendError,
    available_backends,
    get_backend,
    register_backend,
    registered_backends,
    selection_report,
)
from .patches import PatchHandle, patch, patch_module

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendError",
    "PatchHandle",
    "available_backends",
    "get_backend",
    "ops",
    "patch",
    "patch_module",
    "register_backend",
    "registered_backends",
    "selection_report",
    "__version__",
]
