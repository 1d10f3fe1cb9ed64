"""Build the command and environment that run an unchanged script under flux-npu.

One process: `python -m flux_npu.distributed.bootstrap script args`. Several (or a DeepSpeed config,
since accelerate only starts DeepSpeed when launched with LOCAL_RANK set): `python -m
torch.distributed.run --nproc-per-node N ... -m flux_npu.distributed.bootstrap script args`.
The environment carries the backend (FLUX_NPU_BACKEND), transfer_to_npu (on by default on npu),
the translated CUDA/NCCL variables and DS_ACCELERATOR, and, with a DeepSpeed config, the rewritten
config as a temporary file named by ACCELERATE_DEEPSPEED_CONFIG_FILE with ACCELERATE_USE_DEEPSPEED=true:
the variables `accelerate launch` itself sets, so an unchanged accelerate script (Accelerator()
or DeepSpeedPlugin() without a config) picks it up. FLUX_NPU_DS_CONFIG names the same file for
scripts that read a path themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .bootstrap import ENV_REPORT_DIR, ENV_TRANSFER
from .env import translate_env

ENV_DS_CONFIG = "FLUX_NPU_DS_CONFIG"


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    argv: List[str]
    env: Dict[str, str]  # the full child environment
    added: Dict[str, str]  # what flux-npu added to the caller's environment
    env_rows: List[tuple] = field(default_factory=list)
    ds_result: object = None  # dsconfig.Result when a DeepSpeed config was given
    temp_dir: Optional[str] = None

    def run(self) -> int:
        try:
            return subprocess.call(self.argv, env=self.env)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def build_launch(script: str, script_args=(), *, backend=None, nproc: int = 1, nnodes: int = 1, node_rank: int = 0,
                 master_addr: str = "127.0.0.1", master_port: Optional[int] = None, ds_config=None,
                 transfer_to_npu: Optional[bool] = None, report_dir: Optional[str] = None, soc: Optional[str] = None,
                 base_env=None) -> Launch:
    from ..backends import get_backend

    if not os.path.isfile(script):
        raise FileNotFoundError(f"script {script!r} not found")
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"--nproc ({nproc}) and --nnodes ({nnodes}) must be >= 1")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank {node_rank} must be in 0..{nnodes - 1}")
    b = get_backend(backend)  # the backend must be usable on this machine: we are about to run on it
    env = dict(os.environ if base_env is None else base_env)
    added: Dict[str, str] = {"FLUX_NPU_BACKEND": b.name}
    if transfer_to_npu is None:
        transfer_to_npu = b.name == "npu"
    if transfer_to_npu and b.name != "npu":
        raise ValueError(f"transfer_to_npu only applies to the npu backend (active: {b.name})")
    added[ENV_TRANSFER] = "1" if transfer_to_npu else "0"
    if report_dir:
        added[ENV_REPORT_DIR] = os.path.abspath(report_dir)
    env_add, env_rows = translate_env(env, b.name)
    added.update(env_add)

    launch = Launch([], env, added, env_rows)
    if ds_config is not None:
        from .dsconfig import rewrite

        result = rewrite(ds_config, b.name, soc=soc, world_size=nproc * nnodes)
        launch.ds_result = result
        launch.temp_dir = tempfile.mkdtemp(prefix="flux-npu-ds-")
        path = os.path.join(launch.temp_dir, "ds_config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result.config, f, indent=2)
        added.update({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": path, ENV_DS_CONFIG: path})
    env.update(added)

    boot = ["-m", "flux_npu.distributed.bootstrap", script, *script_args]
    if nproc * nnodes > 1 or ds_config is not None:
        if master_port is None:
            if nnodes > 1:
                raise ValueError("--master-port is required with --nnodes > 1 (every node must use the same one)")
            master_port = free_port(master_addr)
        launch.argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                       "--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", master_addr,
                       "--master-port", str(master_port), *boot]
    else:
        launch.argv = [sys.executable, *boot]
    return launch
