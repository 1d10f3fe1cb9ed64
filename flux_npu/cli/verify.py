"""`flux-npu verify`: the command line (arguments and printing). What it runs, in which order, and
what the report holds is `flux_npu.verify`'s docstring; the orchestration lives there."""

from __future__ import annotations

import json
import os
import shlex
import sys


def register(sub):
    p = sub.add_parser("verify", help="parity against every shipped golden, op and model benchmarks: one report")
    p.add_argument("--backend", help="backend to verify (default: FLUX_NPU_BACKEND, then auto-detect)")
    p.add_argument("-o", "--output", help="report directory (default: ./flux-npu-verify-<backend>-<UTC time>)")
    p.add_argument("--quick", action="store_true", help="CI-sized: tiny shapes, few repeats (a minute or two on a CPU)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run the model benchmark in this process (default on a GPU/NPU: one process per "
                        "configuration, so a device fault costs one row)")
    p.add_argument("--skip", nargs="+", default=[], help="phases to leave out: parity, trajectory, ops, model")
    p.add_argument("--msprobe", action="store_true",
                   help="also dump one patched Flux step with msprobe (pip install mindstudio-probe), flux_npu's ops "
                        "named flux_npu.<op> on every device, into <report>/msprobe/ for `msprobe compare`")
    p.add_argument("--force", action="store_true",
                   help="write into -o even when it holds files verify did not write (same-named ones are replaced)")
    p.add_argument("--json", action="store_true", help="also print report.json to stdout")
    p.set_defaults(func=run)


# -- command line -----------------------------------------------------------------------------


def command_line(args) -> list[str]:
    """The command as run, rebuilt from the parsed options (sys.argv is not it when main() is
    called from Python)."""
    cmd = ["flux-npu", "verify"]
    if args.backend:
        cmd += ["--backend", args.backend]
    if args.quick:
        cmd.append("--quick")
    if args.no_isolate:
        cmd.append("--no-isolate")
    if args.skip:
        cmd += ["--skip", *args.skip]
    if getattr(args, "msprobe", False):
        cmd.append("--msprobe")
    if getattr(args, "force", False):
        cmd.append("--force")
    if args.output:
        cmd += ["-o", args.output]
    return cmd


def run(args) -> int:
    from ..backends import get_backend
    from ..verify import Interrupted, verify
    from .parity import names

    b = get_backend(args.backend)  # an unknown or unavailable backend fails before anything runs
    command = " ".join(shlex.quote(a) for a in command_line(args))
    try:
        report = verify(b, out_dir=args.output, quick=args.quick, isolate=False if args.no_isolate else None,
                        skip=names(args.skip) or (), command=command, msprobe=args.msprobe,
                        force=getattr(args, "force", False))
    except (KeyboardInterrupt, Interrupted) as exc:
        code = 130 if isinstance(exc, KeyboardInterrupt) else 128 + exc.signum
        where = getattr(exc, "flux_npu_report", None)
        print(f"flux-npu verify: interrupted; partial report: {where or 'not written (interrupted before it)'}",
              file=sys.stderr)
        return code
    text = sys.stderr if args.json else sys.stdout
    print(f"flux-npu verify: {report['verdict']} on backend {report['environment']['backend']} "
          f"({report['environment']['device']})", file=text)
    for f in report["failures"]:
        print(f"  FAILED {f}", file=text)
    print(f"report: {os.path.join(report['dir'], 'report.md')}", file=text)
    if report["failures"]:
        print(f"send back: {report['send_back']['tar']}  and the command line: {report['send_back']['command']}",
              file=text)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0 if report["verdict"] == "PASS" else 1
