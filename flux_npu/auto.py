"""`import flux_npu.auto` at the top of a script patches Flux for the selected backend.

The backend comes from FLUX_NPU_BACKEND or auto-detection; FLUX_NPU_TARGETS (comma-separated:
diffusers,bfl,transformers) narrows the targets; FLUX_NPU_OPS / FLUX_NPU_EXCLUDE_OPS
(comma-separated op names, e.g. FLUX_NPU_EXCLUDE_OPS=attention) choose the ops routed;
FLUX_NPU_TRANSFER_TO_NPU=1 also applies torch_npu.contrib.transfer_to_npu (npu only; global side
effects). Nothing is imported on behalf of the script: diffusers, transformers and BFL-layout code
(ComfyUI, kohya, forks found by structure) are patched by the import hook when the script imports
them, so this line costs little more than importing torch. The handle is `flux_npu.auto.HANDLE`
(report(), undo()); FLUX_NPU_REPORT=1 prints its report to stderr when the script exits (then it
shows what the import hook patched and the run-time hand-backs, not only what was pending).
"""

import atexit
import os
import sys

from .patches import patch


def _names(var):
    return [t.strip() for t in os.environ.get(var, "").split(",") if t.strip()] or None


HANDLE = patch(
    targets=_names("FLUX_NPU_TARGETS"),
    transfer_to_npu=os.environ.get("FLUX_NPU_TRANSFER_TO_NPU", "") not in ("", "0"),
    ops=_names("FLUX_NPU_OPS"),
    exclude=_names("FLUX_NPU_EXCLUDE_OPS"),
    lazy=True,
)


def _print_report():
    print(HANDLE.report_table(), file=sys.stderr)


if os.environ.get("FLUX_NPU_REPORT", "") not in ("", "0"):
    atexit.register(_print_report)
