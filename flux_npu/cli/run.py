"""`flux-npu run [options] script.py [args...]`: run an unchanged training or inference script with
flux_npu.patch() applied in every process, its DeepSpeed config and environment translated for
the backend.

Exit status: the script's own (a script killed by signal N: 128+N, e.g. 130 SIGINT, 137 SIGKILL,
143 SIGTERM). With several processes, the first rank to fail decides it (torchrun's root cause); if
flux-npu run itself is stopped by SIGTERM/SIGINT/SIGHUP it forwards the signal to every worker, waits
--grace-period seconds, SIGKILLs what is left and returns what the script returned (torchrun stopped
by a signal: 128+N). 1: a flux-npu error before the script started (bad option, missing script,
unusable backend); 2: bad command-line usage."""

from __future__ import annotations

import argparse
import shlex
import sys


def register(sub):
    p = sub.add_parser(
        "run", help="run a script with flux_npu.patch() in every process (torchrun for --nproc > 1)",
        description="Run an unchanged script with flux_npu.patch() applied in every process. Options go before "
                    "the script; everything after it is passed to the script.")
    p.add_argument("--backend", help="backend name (default: FLUX_NPU_BACKEND, then auto-detect)")
    p.add_argument("--nproc-per-node", "--nproc_per_node", "--nproc", dest="nproc", type=int, default=None,
                   help="processes on this node, as torchrun's (default 1; at most the usable CPU cores or visible "
                        "devices)")
    p.add_argument("--oversubscribe", action="store_true",
                   help="allow --nproc above the number of usable CPU cores / visible devices")
    p.add_argument("--nnodes", type=int, default=None, help="number of nodes (default 1)")
    p.add_argument("--node-rank", "--node_rank", type=int, default=None, help="this node's rank (default 0)")
    p.add_argument("--master-addr", "--master_addr", default=None, help="rendezvous address (default 127.0.0.1)")
    p.add_argument("--master-port", "--master_port", type=int,
                   help="rendezvous port, 1..65535 (default: a free one, single node only)")
    rdzv = p.add_argument_group("torchrun rendezvous (handed to torchrun as given)")
    for flag, metavar in (("--rdzv-backend", "BACKEND"), ("--rdzv-endpoint", "HOST:PORT"), ("--rdzv-id", "ID"),
                          ("--rdzv-conf", "K=V,..."), ("--max-restarts", "N")):
        rdzv.add_argument(flag, flag.replace("-", "_").replace("__", "--"), metavar=metavar)
    rdzv.add_argument("--standalone", action="store_true", help="single-node rendezvous on a free port (torchrun's)")
    p.add_argument("-m", "--module", action="store_true",
                   help="the script is a module name, run as `python -m` (torchrun's -m)")
    p.add_argument("--config_file", "--config-file", metavar="YAML",
                   help="an accelerate config file (as for `accelerate launch --config_file`): its processes, "
                        "machines, main process address/port, mixed_precision and DeepSpeed config (rewritten for "
                        "the backend); options given here win")
    p.add_argument("--ds-config", metavar="JSON|YAML",
                   help="DeepSpeed config (or x-flux-style YAML) to rewrite for the backend and hand to accelerate")
    p.add_argument("--soc", help="Ascend SoC for the precision rules (e.g. 910A, 910B3; default: ask torch_npu)")
    p.add_argument("--no-transfer-to-npu", action="store_true",
                   help="do not import torch_npu.contrib.transfer_to_npu (on by default on npu)")
    p.add_argument("--report-dir", help="write each process's patch report and dispatch counts here (JSON)")
    p.add_argument("--grace-period", type=float, default=30.0, metavar="SECONDS",
                   help="after forwarding SIGTERM/SIGINT to the workers, wait this long before SIGKILL (default 30)")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, do not run")
    p.add_argument("script", help="the Python script to run (a module name with -m)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..distributed.launcher import build_launch
    from ..utils.env import check_environment
    from ..utils.table import format_table

    check_environment()  # FLUX_NPU_OPS=bogus, FLUX_NPU_STRICT=maybe: refused before anything starts

    if not args.grace_period >= 0:  # also refuses nan
        raise ValueError(f"--grace-period {args.grace_period} must be a number of seconds >= 0")
    rendezvous = []
    for flag in ("--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--rdzv-conf", "--max-restarts"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            rendezvous += [flag, value]
    if args.standalone:
        rendezvous.append("--standalone")
    env_extra = {}
    if args.config_file:
        from ..distributed import accelerate_config

        cfg = accelerate_config.read(args.config_file)
        for note in accelerate_config.merge(args, cfg):
            print(f"flux-npu run: {note}", file=sys.stderr)
        env_extra = cfg.env
    for name, default in (("nproc", 1), ("nnodes", 1), ("node_rank", 0), ("master_addr", "127.0.0.1")):
        if getattr(args, name) is None:
            setattr(args, name, default)
    launch = build_launch(
        args.script, args.script_args, backend=args.backend, nproc=args.nproc, nnodes=args.nnodes,
        node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port,
        ds_config=args.ds_config, transfer_to_npu=False if args.no_transfer_to_npu else None,
        report_dir=args.report_dir, soc=args.soc, oversubscribe=args.oversubscribe, module=args.module,
        rendezvous=rendezvous, env_extra=env_extra)
    if launch.ds_result is not None:
        from .ds_config import render_result

        print(render_result(launch.ds_result), file=sys.stderr)
    if launch.env_rows:
        print("environment\n" + format_table(("variable", "value", "action", "detail"), launch.env_rows),
              file=sys.stderr)
    if args.dry_run:
        for k, v in sorted(launch.added.items()):
            print(f"{k}={shlex.quote(v)}")
        print(" ".join(shlex.quote(a) for a in launch.argv))
        launch.cleanup()
        return 0
    sys.stderr.flush()
    return launch.run(grace=args.grace_period)
