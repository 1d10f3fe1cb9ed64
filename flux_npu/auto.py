"""`import flux_npu.auto` at the top of a script patches Flux for the selected backend.

The backend comes from FLUX_NPU_BACKEND or auto-detection; FLUX_NPU_TARGETS (comma-separated:
diffusers,bfl,transformers) narrows the targets; FLUX_NPU_TRANSFER_TO_NPU=1 also applies
torch_npu.contrib.transfer_to_npu (npu only; global side effects). Modules imported after this
line are patched as they load. The handle is `flux_npu.auto.HANDLE` (report(), undo());
FLUX_NPU_REPORT=1 prints its report to stderr.
"""

import os
import sys

from .patches import patch

_targets = [t.strip() for t in os.environ.get("FLUX_NPU_TARGETS", "").split(",") if t.strip()] or None
HANDLE = patch(
    targets=_targets,
    transfer_to_npu=os.environ.get("FLUX_NPU_TRANSFER_TO_NPU", "") not in ("", "0"),
)

if os.environ.get("FLUX_NPU_REPORT", "") not in ("", "0"):
    print(HANDLE.report_table(), file=sys.stderr)
