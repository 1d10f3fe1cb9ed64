"""`flux-npu parity`: record a golden on one device, check another device against it.

    flux-npu parity record --backend cuda -o golden.safetensors
    flux-npu parity check golden.safetensors --backend npu
    flux-npu parity list

Exit codes: 0 every case passes; 1 a case fails or the golden is bad; 2 usage error.
"""

from __future__ import annotations

import json
import sys


def register(sub):
    p = sub.add_parser("parity", help="per-op and per-block parity against a golden recorded on another device")
    psub = p.add_subparsers(dest="parity_command", metavar="ACTION")

    r = psub.add_parser("record", help="compute the catalogue on a backend and write a golden (safetensors)")
    r.add_argument("-o", "--output", required=True, help="golden file to write (.safetensors)")
    r.add_argument("--backend", help="backend to record on (default: FLUX_NPU_BACKEND, then auto-detect)")
    r.add_argument("--shapes", default="tiny,width",
                   help="comma-separated shape sets: tiny, width, flux-mini, flux-dev (default: tiny,width)")
    r.add_argument("--dtypes", default="fp32,bf16,fp16", help="comma-separated: fp32, bf16, fp16 (default: all three)")
    r.add_argument("--cases", help="comma-separated case names (default: all; see `flux-npu parity list`)")
    r.add_argument("--seed", type=int, default=0, help="seed of the inputs and block parameters (default: 0)")
    r.add_argument("--no-backward", action="store_true", help="forward only (no gradients recorded)")
    r.add_argument("--stock", action="store_true",
                   help="record the plain-torch references / unpatched diffusers instead of the backend's ops")
    r.set_defaults(func=run_record)

    c = psub.add_parser("check", help="recompute a golden's cases on a backend and compare")
    c.add_argument("golden", help="golden file written by `flux-npu parity record`")
    c.add_argument("--backend", help="backend under test (default: FLUX_NPU_BACKEND, then auto-detect)")
    c.add_argument("--cases", help="only these comma-separated case names")
    c.add_argument("--dtypes", help="only these comma-separated dtypes")
    c.add_argument("--shapes", help="only these comma-separated shape sets")
    c.add_argument("--stock", action="store_true", help="check the plain-torch references instead of the backend's ops")
    c.add_argument("--all-tensors", action="store_true", help="one row per compared tensor instead of the worst per case")
    c.add_argument("-o", "--output", help="also write the results as JSON to this file")
    c.set_defaults(func=run_check)

    ls = psub.add_parser("list", help="list the catalogue's cases and shape sets")
    ls.add_argument("--shapes", default="tiny,width", help="shape sets to list (default: tiny,width)")
    ls.set_defaults(func=run_list)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _names(text):
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def run_record(args) -> int:
    from .. import parity

    meta = parity.record(args.output, backend=args.backend, shape_sets=args.shapes, dtypes=args.dtypes,
                         cases=_names(args.cases), seed=args.seed, backward=not args.no_backward, stock=args.stock,
                         progress=sys.stderr.isatty())
    n = len(json.loads(meta["cases"]))
    print(f"wrote {args.output}: {n} case(s) on backend {meta['backend']} ({meta['device']}), seed {meta['seed']}")
    return 0


def run_check(args) -> int:
    from .. import parity

    golden = parity.load_golden(args.golden)  # fail early and clearly on a bad file
    print(golden.describe())
    report = parity.check(args.golden, backend=args.backend, cases=_names(args.cases), dtypes=args.dtypes,
                          shape_sets=args.shapes, stock=args.stock, progress=sys.stderr.isatty())
    print(report.table(all_tensors=args.all_tensors))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report.as_dict(), f, indent=2)
    if not report.ok:
        bad = ", ".join(r.id for r in report.failed) or "no case was run"
        print(f"flux-npu parity check: FAILED: {bad}", file=sys.stderr)
        return 1
    return 0


def run_list(args) -> int:
    from .. import parity
    from ..utils.table import format_table

    rows = []
    specs = parity.select(args.shapes, "fp32,bf16,fp16")
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
