"""`flux-npu run --config_file accelerate.yaml`: the launch settings of an accelerate config file
(what `accelerate config` writes and `accelerate launch --config_file` reads), so a user keeps the
file they launch with.

Read: num_processes (accelerate's is the total over machines: per node it is divided by
num_machines), num_machines, machine_rank, main_process_ip, main_process_port, mixed_precision
(handed to the script as ACCELERATE_MIXED_PRECISION, as `accelerate launch` does), use_cpu /
MULTI_CPU (ACCELERATE_USE_CPU), and the DeepSpeed section: the file itself becomes the
`--ds-config`, so its `deepspeed_config_file` goes through the backend rewrite
(distributed.dsconfig; an inline section without one is refused there with the fix). Options
given on the command line win over the file. Distributed types flux-npu run cannot launch (FSDP,
Megatron-LM, XLA) are refused; settings it does not apply are named in the notes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

MAX_BYTES = 1 << 20
_LAUNCHABLE = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "DEEPSPEED"}
_READ = {"num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port", "mixed_precision",
         "use_cpu", "distributed_type", "deepspeed_config"}
# written by `accelerate config` with no bearing on the launch, or equal to what flux-npu run does anyway
_SILENT = {"compute_environment", "debug", "downcast_bf16", "main_training_function", "same_network", "tpu_env",
           "tpu_use_cluster", "tpu_use_sudo", "enable_cpu_affinity", "rdzv_backend"}


@dataclass
class AccelerateLaunch:
    source: str
    nproc: int | None = None
    nnodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    ds_config: str | None = None
    env: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def _int(data, key, source, minimum):
    v = data.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{source}: {key} is {v!r}; it must be an integer >= {minimum}")
    return v


def read(path: str) -> AccelerateLaunch:
    import yaml

    source = f"accelerate config {path}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config_file {path!r} not found")
    if os.path.getsize(path) > MAX_BYTES:
        raise ValueError(f"{source} is larger than {MAX_BYTES} bytes: not an accelerate config file")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ValueError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source} is not a mapping of accelerate settings (`accelerate config` writes one)")
    out = AccelerateLaunch(source)
    dist = str(data.get("distributed_type", "NO")).upper().replace("DISTRIBUTEDTYPE.", "")
    if dist not in _LAUNCHABLE:
        raise ValueError(f"{source}: distributed_type {dist} is not launched by flux-npu run (it launches single, "
                         "multi-process and DeepSpeed runs): use `accelerate launch` with `import flux_npu.auto` "
                         "at the top of the script")
    total = _int(data, "num_processes", source, 1)
    out.nnodes = _int(data, "num_machines", source, 1)
    if total is not None:
        machines = out.nnodes or 1
        if total % machines:
            raise ValueError(f"{source}: num_processes {total} (over all machines) does not divide among "
                             f"num_machines {machines}")
        out.nproc = total // machines
    out.node_rank = _int(data, "machine_rank", source, 0)
    out.master_port = _int(data, "main_process_port", source, 1)
    ip = data.get("main_process_ip")
    out.master_addr = str(ip) if ip else None
    mp = data.get("mixed_precision")
    if mp is not None:
        mp = str(mp).lower()
        if mp not in ("no", "fp16", "bf16", "fp8"):
            raise ValueError(f"{source}: mixed_precision {mp!r} is not one of no, fp16, bf16, fp8")
        out.env["ACCELERATE_MIXED_PRECISION"] = mp
    ds = data.get("deepspeed_config")
    if dist == "DEEPSPEED" or (isinstance(ds, dict) and ds):
        out.ds_config = path  # dsconfig.rewrite reads an accelerate file through its deepspeed_config_file
    elif data.get("use_cpu") is True or dist == "MULTI_CPU":
        # (not with DeepSpeed: accelerate's cpu=True turns DeepSpeed off; the launcher handles CPU DeepSpeed)
        out.env["ACCELERATE_USE_CPU"] = "true"
    ignored = sorted(k for k in data if k not in _READ | _SILENT and data[k] not in (None, {}, [], ""))
    if ignored:
        out.notes.append(f"{source}: not applied by flux-npu run: {', '.join(ignored)}")
    return out


def merge(args, cfg: AccelerateLaunch) -> list:
    """Fill the run options the command line left unset (None) from the file; returns notes."""
    notes = list(cfg.notes)
    for name in ("nproc", "nnodes", "node_rank", "master_addr", "master_port", "ds_config"):
        value, given = getattr(cfg, name), getattr(args, name)
        if value is None:
            continue
        if given is None:
            setattr(args, name, value)
        elif given != value:
            notes.append(f"--{name.replace('_', '-')} {given} given: {cfg.source}'s {value} not used")
    return notes
