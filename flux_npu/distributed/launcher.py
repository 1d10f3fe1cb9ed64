"""Build, run and stop the processes that run an unchanged script under flux-npu.

One process: `python -m flux_npu.distributed.bootstrap script args` (`... bootstrap -m module args` for
a module, as `python -m` / `torchrun -m`). Several (or a DeepSpeed config,
since accelerate only starts DeepSpeed when launched with LOCAL_RANK set): `python -m
flux_npu.distributed.torchrun --nproc-per-node N ... -m flux_npu.distributed.bootstrap script args`,
torchrun run in-process so that the failing rank's own exit code comes back (distributed.torchrun).
The environment carries the backend (FLUX_NPU_BACKEND), transfer_to_npu (on by default on npu),
the translated CUDA/NCCL variables and DS_ACCELERATOR, and, with a DeepSpeed config, the rewritten
config as a temporary file named by ACCELERATE_DEEPSPEED_CONFIG_FILE with ACCELERATE_USE_DEEPSPEED=true:
the variables `accelerate launch` itself sets, so an unchanged accelerate script (Accelerator()
or DeepSpeedPlugin() without a config) picks it up. FLUX_NPU_DS_CONFIG names the same file for
scripts that read a path themselves. On the cpu backend without DeepSpeed, ACCELERATE_USE_CPU=true
(what `accelerate launch --cpu` sets) so that accelerate sees every rank (it otherwise picks no
process-group backend for CPU and each rank trains alone).

`Launch.run()` starts the child (the bootstrap, or torchrun) in its own process group, forwards
SIGTERM / SIGINT / SIGHUP to that group and to every process under it (torchrun puts each rank in a
session of its own), waits `grace` seconds for them to stop, then SIGKILLs what is left, removes the
temporary config directory and returns the script's exit status (a death by signal N as 128+N). The
child also gets SIGTERM if the launcher dies without a chance to forward (Linux parent-death signal).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .bootstrap import ENV_REPORT_DIR, ENV_TRANSFER
from .env import translate_env

ENV_DS_CONFIG = "FLUX_NPU_DS_CONFIG"


DEFAULT_GRACE = 30.0  # seconds between forwarding a stop signal and SIGKILL (torchrun's own default too)
POLL_S = 0.2  # how often the wait loop looks at the child and the stop deadline
TRACK_S = 1.0  # how often the process tree is re-read (psutil walks /proc: not every poll)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies (PR_SET_PDEATHSIG, Linux), so even a
    SIGKILLed launcher does not leave the run going; torchrun then stops its ranks."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except Exception:
        pass  # not Linux: the signal forwarding in Launch.run still applies


def _track(pid: int, tracked: dict[int, object]) -> None:
    """Remember every process under `pid`: torchrun starts each rank in a new session, so a signal to
    the child's process group does not reach them, and after the child dies they would be orphans."""
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return
    for p in procs:
        tracked.setdefault(p.pid, p)


def _alive(proc) -> bool:
    import psutil

    try:
        # is_running() also checks the creation time, so a reused pid is not mistaken for ours
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_list(procs, signum) -> None:
    import psutil

    for p in procs:
        try:
            if p.is_running():
                p.send_signal(signum)
        except psutil.Error:
            pass


def _signal_tree(pid: int, tracked: dict[int, object], signum) -> None:
    """`signum` to the child's process group and every process seen under it."""
    _track(pid, tracked)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
    _signal_list(list(tracked.values()), signum)


def device_count(backend) -> int:
    """How many processes the backend can give a device each on this node (CPU: usable cores)."""
    if backend.device_type == "cpu":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1
    import torch

    module = getattr(torch, backend.device_type, None)
    try:
        return int(module.device_count())
    except Exception:
        return 0


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str]  # the full child environment
    added: dict[str, str]  # what flux-npu added to the caller's environment
    env_rows: list[tuple] = field(default_factory=list)
    ds_result: object = None  # dsconfig.Result when a DeepSpeed config was given
    temp_dir: str | None = None

    def run(self, grace: float = DEFAULT_GRACE) -> int:
        """Run to completion; on SIGTERM/SIGINT/SIGHUP stop every process under the child (see module doc)."""
        stop = {"signal": None, "deadline": None, "killed": False}
        tracked: dict[int, object] = {}  # pid -> psutil.Process: every process seen under the child
        try:
            child = subprocess.Popen(self.argv, env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        except BaseException:
            self.cleanup()
            raise

        def forward(signum, _frame):
            first = stop["signal"] is None
            stop["signal"] = signum
            if first:
                stop["deadline"] = time.monotonic() + grace
                _signal_tree(child.pid, tracked, signum)
            else:  # asked twice: do not wait any longer
                stop["deadline"] = time.monotonic()

        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {s: signal.signal(s, forward) for s in handled}
        try:
            next_track = 0.0
            while True:
                if time.monotonic() >= next_track:
                    _track(child.pid, tracked)
                    next_track = time.monotonic() + TRACK_S
                try:
                    returncode = child.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if stop["deadline"] is not None and time.monotonic() >= stop["deadline"] and not stop["killed"]:
                    _signal_tree(child.pid, tracked, signal.SIGKILL)
                    stop["killed"] = True
            # the child is gone; give what it left behind (ranks of a torchrun that was killed, data-loader
            # workers) the rest of the grace period, then SIGKILL it
            survivors = [p for p in tracked.values() if _alive(p)]
            if survivors:
                if stop["signal"] is None:
                    _signal_list(survivors, signal.SIGTERM)
                deadline = stop["deadline"] or time.monotonic() + grace
                while survivors and time.monotonic() < deadline:
                    time.sleep(POLL_S)
                    survivors = [p for p in survivors if _alive(p)]
                _signal_list(survivors, signal.SIGKILL)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if child.poll() is None:  # an exception here (not a signal): leave nothing running
                _signal_tree(child.pid, tracked, signal.SIGKILL)
                child.wait()
            self.cleanup()
        return 128 - returncode if returncode < 0 else returncode

    def cleanup(self) -> None:
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def build_launch(script: str, script_args=(), *, backend=None, nproc: int = 1, nnodes: int = 1, node_rank: int = 0,
                 master_addr: str = "127.0.0.1", master_port: int | None = None, ds_config=None,
                 transfer_to_npu: bool | None = None, report_dir: str | None = None, soc: str | None = None,
                 base_env=None, oversubscribe: bool = False, module: bool = False,
                 rendezvous: Sequence[str] = (), env_extra: dict[str, str] | None = None) -> Launch:
    """`module`: `script` is a module name run like `python -m` (torchrun's `-m`). `rendezvous`:
    torchrun's own rendezvous options (`--rdzv-backend c10d`, `--rdzv-endpoint host:port`,
    `--rdzv-id`, `--rdzv-conf`, `--standalone`, `--max-restarts N`), handed to torchrun as given; with
    an endpoint (or --standalone) no --master-port is needed. `env_extra`: variables to set for the
    script (an accelerate config file's ACCELERATE_MIXED_PRECISION, ACCELERATE_USE_CPU)."""
    from ..backends import get_backend

    if module:
        if not script or not all(part.isidentifier() for part in script.split(".")):
            raise ValueError(f"-m {script!r} is not a module name (dotted Python identifiers, as for python -m)")
    elif not os.path.isfile(script):
        raise FileNotFoundError(f"script {script!r} not found")
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"--nproc ({nproc}) and --nnodes ({nnodes}) must be >= 1")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank {node_rank} must be in 0..{nnodes - 1}")
    if master_port is not None and not 1 <= master_port <= 65535:
        raise ValueError(f"--master-port {master_port} is not a TCP port: give one in 1..65535 (or leave it out "
                         "on a single node to pick a free one)")
    b = get_backend(backend)  # the backend must be usable on this machine: we are about to run on it
    available = device_count(b)
    if nproc > available and not oversubscribe:
        what = "usable CPU cores" if b.device_type == "cpu" else f"visible {b.device_type} devices"
        raise ValueError(f"--nproc {nproc} is more than the {available} {what} here: lower it, or pass "
                         "--oversubscribe if you mean to share them")
    if report_dir:
        report_dir = _writable_dir(report_dir, "--report-dir")
    env = dict(os.environ if base_env is None else base_env)
    added: dict[str, str] = {"FLUX_NPU_BACKEND": b.name, **(env_extra or {})}
    if transfer_to_npu is None:
        transfer_to_npu = b.name == "npu"
    if transfer_to_npu and b.name != "npu":
        raise ValueError(f"transfer_to_npu only applies to the npu backend (active: {b.name})")
    added[ENV_TRANSFER] = "1" if transfer_to_npu else "0"
    if report_dir:
        added[ENV_REPORT_DIR] = os.path.abspath(report_dir)
    env_add, env_rows = translate_env(env, b.name)
    added.update(env_add)
    deepspeed = ds_config is not None or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if b.name == "cpu" and not deepspeed and nproc * nnodes > 1:
        # accelerate gives CPU ranks a process group only when told it is a CPU run (accelerate launch
        # --cpu sets this); without it each rank's state says one process and they train unsynchronised
        added["ACCELERATE_USE_CPU"] = "true"

    launch = Launch([], env, added, env_rows)
    if ds_config is not None:
        from .dsconfig import rewrite

        result = rewrite(ds_config, b.name, soc=soc, world_size=nproc * nnodes)
        launch.ds_result = result
        launch.temp_dir = tempfile.mkdtemp(prefix="flux-npu-ds-")
        path = os.path.join(launch.temp_dir, "ds_config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result.config, f, indent=2)
        added.update({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": path,
                      ENV_DS_CONFIG: path})
    env.update(added)

    boot = ["-m", "flux_npu.distributed.bootstrap", *(["-m"] if module else []), script, *script_args]
    rendezvous = list(rendezvous)
    own_endpoint = any(a.split("=")[0] in ("--rdzv-endpoint", "--rdzv_endpoint", "--standalone") for a in rendezvous)
    if nproc * nnodes > 1 or ds_config is not None or rendezvous:
        if master_port is None:
            if own_endpoint:
                master_port = 29500  # torchrun's default; unused: the rendezvous endpoint decides
            elif nnodes > 1:
                raise ValueError("--master-port is required with --nnodes > 1 (every node must use the same one)")
            master_port = free_port(master_addr)
        launch.argv = [sys.executable, "-m", "flux_npu.distributed.torchrun", "--nproc-per-node", str(nproc),
                       "--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", master_addr,
                       "--master-port", str(master_port), *rendezvous, *boot]
    else:
        launch.argv = [sys.executable, *boot]
    return launch


def _writable_dir(path: str, option: str) -> str:
    """Create `path` if needed and prove it writable now, not in every rank after training started."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".flux-npu-probe-"):
            pass
    except OSError as exc:
        raise ValueError(f"{option} {path} cannot be written ({exc.strerror or exc}): choose a directory you can "
                         "write to") from None
    return path
