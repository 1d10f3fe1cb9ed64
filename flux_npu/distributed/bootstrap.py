"""Per-process entry of `flux-npu run`: apply flux_npu.patch(), then run the user's script as __main__.

    python -m flux_npu.distributed.bootstrap script.py [args...]     # what torchrun starts
    python -m flux_npu.distributed.bootstrap -m pkg.module [args...] # a module, as `python -m`

Environment (set by the launcher): FLUX_NPU_BACKEND (the backend), FLUX_NPU_TRANSFER_TO_NPU=1 (also
import torch_npu's transfer_to_npu), FLUX_NPU_REPORT_DIR (write `patch-rank<R>.json` there: the
patch rows at start, and at exit the dispatch statistics that show the patched ops ran). Rank 0
prints the patch report to stderr once.

CPU + DeepSpeed through accelerate: accelerate picks a process-group backend only for devices it
knows (hccl, nccl, ...) unless `cpu=True`, which turns DeepSpeed off; with `LOCAL_RANK` set and no
device its state then says one process while DeepSpeed runs two, so gather and data sharding break
(accelerate/state.py `_prepare_backend`). On the cpu backend the bootstrap wraps PartialState so that
the script's first one gets the backend's process-group backend (gloo) unless it names one, and
records that in the report. CPU without DeepSpeed: accelerate only forms a multi-CPU run when told it
is a CPU run (ACCELERATE_USE_CPU, set by the launcher, which AcceleratorState reads); the first
PartialState gets cpu=True too, for scripts that build one themselves before the Accelerator. Nothing
is created by the bootstrap: process-group creation stays with the script (a plain torch.distributed
script calls init_process_group itself), and accelerate's state exists only if the script uses it.
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
    """On cpu with several ranks, make the script's *first* PartialState (Accelerator() builds one)
    take the process-group backend accelerate would not pick itself. Nothing is created here: a plain
    torch.distributed script calls init_process_group itself (creating accelerate's state first made
    that fail with "trying to initialize the default process group twice"), and a script that never
    touches accelerate never gets its state."""
    if handle.backend.name != "cpu" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu_flag = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    if not (deepspeed or cpu_flag):
        return
    try:
        import inspect

        from accelerate.state import PartialState
    except ImportError:
        return
    original = PartialState.__dict__["__init__"]
    signature = inspect.signature(original)
    dist_backend = handle.backend.dist_backend

    def __init__(self, *args, **kwargs):
        import torch.distributed as dist

        # only the first construction decides (accelerate's state is shared), and only if the script has
        # not formed the process group itself (accelerate then adopts it) nor chosen for itself
        if not PartialState._shared_state and not (dist.is_available() and dist.is_initialized()):
            bound = signature.bind_partial(self, *args, **kwargs)
            if deepspeed and "backend" not in bound.arguments.get("kwargs", {}):
                kwargs["backend"] = dist_backend
            elif not deepspeed and "cpu" not in bound.arguments:
                kwargs["cpu"] = True
        return original(self, *args, **kwargs)

    __init__.__wrapped__ = original
    __init__.__module__ = __name__
    if deepspeed:
        why = (f"the first PartialState gets backend={dist_backend!r} unless the script picks one: accelerate "
               "picks no process-group backend for DeepSpeed on CPU, so its world size would read 1")
    else:
        # a script that builds PartialState() itself, before Accelerator, would not read ACCELERATE_USE_CPU
        why = ("the first PartialState gets cpu=True (ACCELERATE_USE_CPU): otherwise each CPU rank's accelerate "
               "sees one process")
    reason = handle.set_attr(PartialState, "__init__", __init__)
    handle.add_row("accelerate.state", "PartialState", "skipped" if reason else "patched", reason or why)


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
    module = bool(argv) and argv[0] == "-m"
    if module:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m flux_npu.distributed.bootstrap [-m module | script.py] [args...]", file=sys.stderr)
        return 2
    script, script_args = argv[0], argv[1:]
    if module:
        sys.path.insert(0, os.getcwd())  # what `python -m` puts first
        try:
            found = importlib.util.find_spec(script) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            print(f"flux-npu bootstrap: error: no module named {script!r} (from {os.getcwd()})", file=sys.stderr)
            return 2
    elif not os.path.isfile(script):
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
    if module:
        runpy.run_module(script, run_name="__main__", alter_sys=True)  # argv[0] becomes the file, as python -m
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
