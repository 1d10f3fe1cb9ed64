"""`flux-npu info`: backends (available or why not), versions, capabilities, op routing for Flux
shapes, and with --patches what patch() would do here."""

from __future__ import annotations

import json


def register(sub):
    p = sub.add_parser("info", help="backends, versions, capabilities and op routing")
    p.add_argument("--backend", help="show op routing for this backend only (default: every registered one)")
    p.add_argument("--patches", action="store_true", help="also show what patch() would do in this environment")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import report

    data = report.collect(backend=args.backend, patches=args.patches)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(report.render(data))
    return 0
