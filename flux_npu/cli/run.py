"""`flux-npu run [options] script.py [args...]`: run an unchanged training or inference script with
flux_npu.patch() applied in every process, its DeepSpeed config and environment translated for
the backend. Exit status: the script's (1 on a flux-npu error, 2 on bad usage)."""

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
    p.add_argument("--nproc", type=int, default=1, help="processes on this node (default 1)")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank (default 0)")
    p.add_argument("--master-addr", default="127.0.0.1", help="rendezvous address (default 127.0.0.1)")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: a free one, single node only)")
    p.add_argument("--ds-config", metavar="JSON|YAML",
                   help="DeepSpeed config (or x-flux-style YAML) to rewrite for the backend and hand to accelerate")
    p.add_argument("--soc", help="Ascend SoC for the precision rules (e.g. 910A, 910B3; default: ask torch_npu)")
    p.add_argument("--no-transfer-to-npu", action="store_true",
                   help="do not import torch_npu.contrib.transfer_to_npu (on by default on npu)")
    p.add_argument("--report-dir", help="write each process's patch report and dispatch counts here (JSON)")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, do not run")
    p.add_argument("script", help="the Python script to run")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..distributed.launcher import build_launch
    from ..utils.table import format_table

    launch = build_launch(
        args.script, args.script_args, backend=args.backend, nproc=args.nproc, nnodes=args.nnodes,
        node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port,
        ds_config=args.ds_config, transfer_to_npu=False if args.no_transfer_to_npu else None,
        report_dir=args.report_dir, soc=args.soc)
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
    return launch.run()
