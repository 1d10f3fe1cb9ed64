"""`import flux_npu.auto` at the top of a script patches Flux for the selected backend.

The backend comes from FLUX_NPU_BACKEND or auto-detection; FLUX_NPU_TARGETS (comma- or
space-separated: diffusers,bfl,transformers) narrows the targets; FLUX_NPU_OPS /
FLUX_NPU_EXCLUDE_OPS (op names, e.g. FLUX_NPU_EXCLUDE_OPS=attention) choose the ops routed;
unknown names are an error. Yes/no variables take 1/true/yes/on or 0/false/no/off (utils/env.py,
the parser `flux-npu run` uses too). FLUX_NPU_TRANSFER_TO_NPU=1 also applies
torch_npu.contrib.transfer_to_npu (npu only; global side effects). Nothing is imported on behalf
of the script: diffusers, transformers and BFL-layout code (ComfyUI, kohya, forks found by
structure) are patched by the import hook when the script imports them, so this line costs little
more than importing torch. The handle is `flux_npu.auto.HANDLE` (report(), undo());
FLUX_NPU_REPORT=1 prints a summary of the run to stderr when the script exits (report.run_summary:
the patched code it called, served / handed back, skips, the layouts it never imported in one line,
and the kernels that served each op as `flux-npu demo` shows them; no "pending" rows for modules
the hook patched meanwhile). `HANDLE.report_table()` has every row.
"""

import atexit
import sys

from .patches import patch
from .utils.env import env_flag, patch_switches

# every variable is read (and an unknown spelling or op name refused) before anything is patched
_SWITCHES = patch_switches()
_TRANSFER = env_flag("FLUX_NPU_TRANSFER_TO_NPU")
_REPORT = env_flag("FLUX_NPU_REPORT")

HANDLE = patch(transfer_to_npu=_TRANSFER, lazy=True, **_SWITCHES)


def _print_report():
    from .report import run_summary

    print(run_summary(HANDLE), file=sys.stderr)


if _REPORT:
    atexit.register(_print_report)
