"""Translate the environment of a CUDA launch script for the backend that will run it.

`translate_env(env, backend)` returns `(additions, rows)`: the variables to add, and one row per
variable looked at, `(variable, value, action, detail)` with action one of `translated`, `kept`
(the Ascend variable was already set and wins), `no-equivalent` (reported, never translated),
`set` (DS_ACCELERATOR) or `checked` (an HCCL value outside its documented range). Nothing is removed
from the environment: CUDA variables stay for code that reads them.

The table follows /work/shared/torch_npu/DISTRIBUTED.md (Ascend CANN environment-variable
reference; torch_npu docs). DS_ACCELERATOR pins DeepSpeed's accelerator, which otherwise picks npu
as soon as torch_npu imports (deepspeed/accelerator/real_accelerator.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# CUDA/NCCL -> Ascend, for variables whose meaning carries over unchanged.
DIRECT = {
    "CUDA_VISIBLE_DEVICES": "ASCEND_RT_VISIBLE_DEVICES",
    "CUDA_LAUNCH_BLOCKING": "ASCEND_LAUNCH_BLOCKING",
    "PYTORCH_CUDA_ALLOC_CONF": "PYTORCH_NPU_ALLOC_CONF",
    "NCCL_SOCKET_IFNAME": "HCCL_SOCKET_IFNAME",
    "NCCL_BUFFSIZE": "HCCL_BUFFSIZE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "HCCL_ASYNC_ERROR_HANDLING",
    "NCCL_ASYNC_ERROR_HANDLING": "HCCL_ASYNC_ERROR_HANDLING",  # the pre-2.2 torch spelling
}

# NCCL_DEBUG level -> ASCEND_GLOBAL_LOG_LEVEL (0 debug, 1 info, 2 warning, 3 error).
NCCL_DEBUG_LEVELS = {"TRACE": "0", "INFO": "1", "WARN": "2", "VERSION": "3"}

# Prefixes / names with no HCCL meaning (InfiniBand, NVLink P2P, GPUDirect, SHARP, UCX).
NO_EQUIVALENT = re.compile(r"^(NCCL_IB_|NCCL_P2P_|NCCL_NET_GDR|NCCL_COLLNET|SHARP_|UCX_|NCCL_)")

# HCCL ranges (CANN environment-variable reference, via DISTRIBUTED.md).
HCCL_RANGES = {"HCCL_CONNECT_TIMEOUT": (120, 7200), "HCCL_EXEC_TIMEOUT": (68, 17340)}

DS_ACCELERATOR = {"npu": "npu", "cuda": "cuda", "cpu": "cpu"}


def _bytes_to_mb(value: str) -> str:
    """NCCL_BUFFSIZE is in bytes, HCCL_BUFFSIZE in MB (default 200)."""
    n = int(value, 0)
    return str(max(1, n // (1024 * 1024)))


def translate_env(env: Mapping[str, str], backend: str) -> tuple[dict[str, str], list[tuple]]:
    add: dict[str, str] = {}
    rows: list[tuple] = []
    backend = getattr(backend, "name", backend)
    if backend in DS_ACCELERATOR:
        current = env.get("DS_ACCELERATOR")
        if current and current != DS_ACCELERATOR[backend]:
            raise ValueError(f"DS_ACCELERATOR={current} contradicts the {backend} backend: unset it or pick "
                             f"--backend {current}")
        if not current:
            add["DS_ACCELERATOR"] = DS_ACCELERATOR[backend]
            rows.append(("DS_ACCELERATOR", add["DS_ACCELERATOR"], "set", "pins DeepSpeed's accelerator to the backend"))
    if backend != "npu":
        return add, rows
    for name in sorted(env):
        value = env[name]
        if name in DIRECT:
            target = DIRECT[name]
            new = _bytes_to_mb(value) if name == "NCCL_BUFFSIZE" else value
            _put(env, add, rows, name, value, target, new)
        elif name == "NCCL_DEBUG":
            level = NCCL_DEBUG_LEVELS.get(value.upper())
            if level is None:
                rows.append((name, value, "no-equivalent",
                             "unknown NCCL_DEBUG level; set ASCEND_GLOBAL_LOG_LEVEL yourself"))
            else:
                _put(env, add, rows, name, value, "ASCEND_GLOBAL_LOG_LEVEL", level)
        elif name.startswith("GLOO_"):
            rows.append((name, value, "kept", "gloo still serves CPU-side groups on NPU; left as is"))
        elif NO_EQUIVALENT.match(name):
            rows.append((name, value, "no-equivalent", "no HCCL meaning (InfiniBand/P2P/GDR/SHARP/UCX/NCCL tuning): "
                         "not translated; HCCL has its own settings (HCCL_* in the CANN reference)"))
    for name, (lo, hi) in HCCL_RANGES.items():
        value = add.get(name, env.get(name))
        if value is None:
            continue
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} must be a whole number of seconds in {lo}..{hi}") from None
        if not lo <= n <= hi:
            raise ValueError(f"{name}={n} is outside HCCL's range {lo}..{hi} seconds (CANN environment reference)")
        if name == "HCCL_EXEC_TIMEOUT" and n % 68:
            rows.append((name, value, "checked", f"HCCL rounds it down to a multiple of 68 s: {n // 68 * 68}"))
    return add, rows


def _put(env, add, rows, name, value, target, new):
    if target in env and env[target] != new:
        rows.append((name, value, "kept", f"{target}={env[target]} already set and wins"))
    elif target in env or target in add:
        rows.append((name, value, "kept", f"{target} already set"))
    else:
        add[target] = new
        rows.append((name, value, "translated", f"{target}={new}"))
