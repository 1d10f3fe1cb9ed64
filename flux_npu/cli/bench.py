"""`flux-npu bench`: benchmarks.

    flux-npu bench model --preset tiny --mode infer train --compare -o bench.json --plot bench.png
    flux-npu bench ops ...        (per-op benchmarks: flux_npu.benchmark.ops)

Each subcommand's module is imported only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

OPS_MODULE = "flux_npu.benchmark.ops"


def register(sub):
    p = sub.add_parser("bench", help="whole-model and per-op benchmarks (speed and memory per device)")
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT")

    from ..benchmark import model
    from . import bench_model

    m = bsub.add_parser("model", help="whole Flux model: s/img and peak memory, infer and train, patched vs stock",
                        description=model.__doc__.split("\n\n")[0] if model.__doc__ else None)
    bench_model.add_arguments(m)
    m.set_defaults(func=bench_model.run)

    # Everything after `ops` goes to the per-op benchmark's own parser, `--help` included: with no
    # "-" prefix char here, argparse treats its options as plain words for REMAINDER.
    o = bsub.add_parser("ops", help="per-op benchmarks (see `flux-npu bench ops --help`)", add_help=False,
                        prefix_chars="+")
    o.add_argument("ops_args", nargs=argparse.REMAINDER)
    o.set_defaults(func=run_ops)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_ops(args) -> int:
    """Delegate to flux_npu.cli.bench_ops (options and the run) over flux_npu.benchmark.ops (the
    cases and timing). Imported here, so `flux-npu bench model` never loads it."""
    try:
        mod = importlib.import_module(OPS_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != OPS_MODULE:
            raise
        print(f"flux-npu bench ops: the per-op benchmark ({OPS_MODULE}) is not part of this installation",
              file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="flux-npu bench ops",
                                     description=(mod.__doc__ or "").split("\n\n")[0] or None)
    from . import bench_ops

    bench_ops.add_arguments(parser)
    ops_args = parser.parse_args(args.ops_args)
    return int(bench_ops.run(ops_args) or 0)
