"""`flux-npu parity`: record a golden on one device, check another device against it.

    flux-npu parity record --backend cuda -o golden.safetensors
    flux-npu parity check golden.safetensors --backend npu
    flux-npu parity list

Exit codes: 0 every case passes; 1 a case fails or the golden is bad; 2 usage error.
"""

from __future__ import annotations

import json
import sys


def names(values):
    """A list option's values: space-separated (nargs="+") and/or comma-separated, flattened.
    None stays None (the option's default applies)."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    return [n.strip() for v in values for n in v.split(",") if n.strip()] or None


def register(sub):
    p = sub.add_parser("parity", help="per-op and per-block parity against a golden recorded on another device")
    psub = p.add_subparsers(dest="parity_command", metavar="ACTION")

    r = psub.add_parser("record", help="compute the catalogue on a backend and write a golden (safetensors)")
    r.add_argument("-o", "--output", required=True, help="golden file to write (.safetensors)")
    r.add_argument("--backend", help="backend to record on (default: FLUX_NPU_BACKEND, then auto-detect)")
    r.add_argument("--shapes", nargs="+", default=["tiny", "width"],
                   help="shape sets: tiny, width, flux-mini, flux-dev (default: tiny width)")
    r.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"],
                   help="fp32, bf16, fp16 (default: all three)")
    r.add_argument("--cases", nargs="+", help="case names (default: all; see `flux-npu parity list`)")
    r.add_argument("--seed", type=int, default=0, help="seed of the inputs and block parameters (default: 0)")
    r.add_argument("--no-backward", action="store_true", help="forward only (no gradients recorded)")
    r.add_argument("--stock", action="store_true",
                   help="record the plain-torch references / unpatched diffusers instead of the backend's ops")
    r.add_argument("--allow-cudnn-sdpa", action="store_true",
                   help="CUDA: let SDPA use cuDNN attention (off by default: its backward is wrong on H100 with "
                        "torch 2.11; the golden records which SDPA backends were allowed)")
    r.set_defaults(func=run_record)

    c = psub.add_parser("check", help="recompute a golden's cases on a backend and compare")
    c.add_argument("golden", help="golden file written by `flux-npu parity record`")
    c.add_argument("--backend", help="backend under test (default: FLUX_NPU_BACKEND, then auto-detect)")
    c.add_argument("--cases", nargs="+", help="only these case names")
    c.add_argument("--dtypes", nargs="+", help="only these dtypes")
    c.add_argument("--shapes", nargs="+", help="only these shape sets")
    c.add_argument("--stock", action="store_true", help="check the plain-torch references instead of the backend's ops")
    c.add_argument("--allow-cudnn-sdpa", action="store_true", help="CUDA: let SDPA use cuDNN attention (see record)")
    c.add_argument("--all-tensors", action="store_true",
                   help="one row per compared tensor instead of the worst per case")
    c.add_argument("--ascend-rule", action="store_true",
                   help="also fail (exit 1) on a case that breaks Ascend's rule against the golden's float64 "
                        "reference (error <= 2x the golden device's, max relative error <= 10x); it is always "
                        "reported in the table")
    c.add_argument("-o", "--output", help="also write the results as JSON to this file")
    c.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    c.set_defaults(func=run_check)

    ls = psub.add_parser("list", help="list the catalogue's cases and shape sets, or the shipped goldens")
    ls.add_argument("--shapes", nargs="+", default=["tiny", "width"], help="shape sets to list (default: tiny width)")
    ls.add_argument("--goldens", action="store_true", help="list the shipped goldens and where they are")
    ls.set_defaults(func=run_list)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_record(args) -> int:
    from .. import parity

    meta = parity.record(args.output, backend=args.backend, shape_sets=names(args.shapes), dtypes=names(args.dtypes),
                         cases=names(args.cases), seed=args.seed, backward=not args.no_backward, stock=args.stock,
                         progress=sys.stderr.isatty(), allow_cudnn=args.allow_cudnn_sdpa)
    n = len(json.loads(meta["cases"]))
    sdpa = json.loads(meta["sdpa"])["allowed"]
    print(f"wrote {args.output}: {n} case(s) on backend {meta['backend']} ({meta['device']}), seed {meta['seed']}, "
          f"SDPA backends {'torch default' if sdpa == 'default' else ','.join(sdpa)}")
    return 0


def run_check(args) -> int:
    from .. import parity
    from ..backends import get_backend

    get_backend(args.backend)  # an unknown or unavailable backend fails before the golden is read
    golden = parity.load_golden(args.golden)  # fail early and clearly on a bad file
    out = sys.stderr if args.json else sys.stdout
    print(golden.describe(), file=out)
    report = parity.check(args.golden, backend=args.backend, cases=names(args.cases), dtypes=names(args.dtypes),
                          shape_sets=names(args.shapes), stock=args.stock, progress=sys.stderr.isatty(),
                          allow_cudnn=args.allow_cudnn_sdpa)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.table(all_tensors=args.all_tensors))
    if args.output:
        from ..utils.output import write_output

        write_output(args.output, json.dumps(report.as_dict(), indent=2) + "\n")
    for r in report.rule_failed:
        print(f"Ascend's rule broken: {r.id}: {r.rule_message}", file=sys.stderr)
    if not report.ok:
        bad = ", ".join(r.id for r in report.failed) or "no case was run"
        print(f"flux-npu parity check: FAILED: {bad}", file=sys.stderr)
        return 1
    if args.ascend_rule and report.rule_failed:
        print(f"flux-npu parity check: FAILED Ascend's rule: {', '.join(r.id for r in report.rule_failed)}",
              file=sys.stderr)
        return 1
    return 0


def run_list(args) -> int:
    from .. import parity
    from ..utils.table import format_table

    if args.goldens:
        for path in parity.shipped_goldens():
            print(parity.load_golden(path).describe())
        return 0
    rows = []
    specs = parity.select(names(args.shapes), "fp32,bf16,fp16")
    seen = {}
    for s in specs:
        seen.setdefault((s.shapes.name, s.case.name), []).append(s)
    for (shape_set, name), group in seen.items():
        case = parity.CASES[name]
        shapes = {k: tuple(v.shape) for k, v in parity.cases.make_inputs(group[0], 0).items() if not k.startswith("d_")}
        rows.append([shape_set, name, ",".join(parity.cases.DTYPE_NAMES[s.dtype] for s in group),
                     f"x{case.factor:g}", case.doc, " ".join(f"{k}{list(v)}" for k, v in shapes.items())])
    print(format_table(["shapes", "case", "dtypes", "tol", "what", "inputs"], rows, max_width=70))
    return 0
