"""Per-process entry of `flux-npu run`: apply flux_npu.patch(), then run the user's script as __main__.

    python -m flux_npu.distributed.bootstrap script.py [args...]     # what torchrun starts

Environment (set by the launcher): FLUX_NPU_BACKEND (the backend), FLUX_NPU_TRANSFER_TO_NPU=1 (also
import torch_npu's transfer_to_npu), FLUX_NPU_REPORT_DIR (write `patch-rank<R>.json` there: the
patch rows at start, and at exit the dispatch statistics that show the patched ops ran). Rank 0
prints the patch report to stderr once.

CPU + DeepSpeed through accelerate: accelerate picks a process-group backend only for devices it
knows (hccl, nccl, ...) unless `cpu=True`, which turns DeepSpeed off; with `LOCAL_RANK` set and no
device its state then says one process while DeepSpeed runs two, so gather and data sharding break
(accelerate/state.py `_prepare_backend`). On the cpu backend the bootstrap creates accelerate's
PartialState first with the backend's process-group backend (gloo), and records that in the report.
CPU without DeepSpeed: accelerate only forms a multi-CPU run when told it is a CPU run
(ACCELERATE_USE_CPU, set by the launcher, which AcceleratorState reads); PartialState(cpu=True) is
created first as well, for scripts that build a PartialState themselves before the Accelerator.
It also makes accelerate apply an OmegaConf / x-flux DeepSpeed block it would ignore (accelerate_fix).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import runpy
import sys

ENV_TRANSFER = "FLUX_NPU_TRANSFER_TO_NPU"
ENV_REPORT_DIR = "FLUX_NPU_REPORT_DIR"


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _accelerate_cpu_backend(handle) -> None:
    if handle.backend.name != "cpu" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu_flag = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    if not (deepspeed or cpu_flag):
        return
    try:
        from accelerate.state import PartialState
    except ImportError:
        return
    if deepspeed:
        PartialState(backend=handle.backend.dist_backend)
        why = (f"created first with backend={handle.backend.dist_backend!r}: accelerate picks no process-group "
               "backend for DeepSpeed on CPU, so its world size would read 1")
    else:
        # a script that builds PartialState() itself, before Accelerator, would not read ACCELERATE_USE_CPU
        PartialState(cpu=True)
        why = "created first with cpu=True (ACCELERATE_USE_CPU): otherwise each CPU rank's accelerate sees one process"
    handle.add_row("accelerate.state", "PartialState", "patched", why)


def _write_report(path, handle, stats=None) -> None:
    data = {
        "rank": _rank(),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0") or 0),
        "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1),
        "pid": os.getpid(),
        "backend": handle.backend.name,
        "patches": [r.as_dict() for r in handle.report()],
    }
    if stats is not None:
        data["dispatch"] = {kind: [{"key": list(k), "count": n} for k, n in counter.items()]
                            for kind, counter in stats.items()}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m flux_npu.distributed.bootstrap script.py [args...]", file=sys.stderr)
        return 2
    script, script_args = argv[0], argv[1:]
    if not os.path.isfile(script):
        print(f"flux-npu bootstrap: error: script {script!r} not found", file=sys.stderr)
        return 2

    import flux_npu
    from flux_npu import ops

    from flux_npu.utils.env import env_flag, patch_switches

    # the same switches as `import flux_npu.auto` (FLUX_NPU_OPS / _EXCLUDE_OPS / _TARGETS), one parser
    handle = flux_npu.patch(transfer_to_npu=env_flag(ENV_TRANSFER), **patch_switches())
    if importlib.util.find_spec("accelerate") is not None:
        from .accelerate_fix import install

        install(handle)
        _accelerate_cpu_backend(handle)
    if _rank() == 0:
        print(handle.report_table(), file=sys.stderr, flush=True)
    report_dir = os.environ.get(ENV_REPORT_DIR)
    if report_dir:
        os.makedirs(report_dir, exist_ok=True)
        path = os.path.join(report_dir, f"patch-rank{_rank()}.json")
        _write_report(path, handle)
        atexit.register(lambda: _write_report(path, handle, ops.dispatch_stats()))

    sys.argv = [script] + script_args
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
