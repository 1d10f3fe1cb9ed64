"""`flux-npu info`: backends (available or why not), versions, capabilities, op routing for Flux
shapes, and with --patches what patch() would do here.

Exit status: 0; 1 on an error (an unknown --backend names the registered ones); 2 on bad usage."""

from __future__ import annotations

import json
import sys


def register(sub):
    p = sub.add_parser("info", help="backends, versions, capabilities and op routing")
    p.add_argument("--backend", help="show op routing for this backend only (default: every registered one)")
    p.add_argument("--patches", action="store_true", help="also show what patch() would do in this environment")
    p.add_argument("--json", action="store_true", help="print JSON to stdout instead of tables")
    p.add_argument("-o", "--output", metavar="PATH", help="also write the JSON report to PATH")
    p.set_defaults(func=run)


def check_backend_name(name):
    """A --backend value must name a registered backend (it need not be available here)."""
    if name is None:
        return None
    from ..backends import registered_backends

    known = [b.name for b in registered_backends()]
    key = name.strip().lower()
    if key not in known:
        raise ValueError(f"unknown backend {name!r}; registered backends: {', '.join(known)}")
    return key


def run(args) -> int:
    from .. import report

    backend = check_backend_name(args.backend)
    data = report.collect(backend=backend, patches=args.patches)
    text = json.dumps(data, indent=2, default=str)
    if args.output:
        from ..utils.output import write_output

        write_output(args.output, text + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    print(text if args.json else report.render(data))
    return 0
