"""`flux-npu ds-config IN [--backend npu] [-o OUT.json]`: rewrite a DeepSpeed config (JSON, or an
x-flux / FluxKits training YAML's deepspeed: section) for a backend; print the changes as a table
and the result as JSON (to OUT with -o). Exit 1 when the config cannot work there."""

from __future__ import annotations

import json
import sys


def register(sub):
    p = sub.add_parser("ds-config", help="rewrite a DeepSpeed config for a backend and explain every change",
                       description="Rewrite a DeepSpeed config for a backend; every change comes with its reason.")
    p.add_argument("config", help="DeepSpeed JSON, or a YAML with DeepSpeed keys or an x-flux deepspeed: section")
    p.add_argument("--backend", help="target backend (npu, cuda, cpu; need not be present here; default: detect)")
    p.add_argument("--soc", help="Ascend SoC, e.g. 910A (no bf16: fp16 + loss scaling) or 910B3")
    p.add_argument("--deepspeed-version", help="DeepSpeed version on the target (default: the installed one)")
    p.add_argument("--world-size", type=int, help="check train_batch_size against this many processes")
    p.add_argument("--strict", action="store_true", help="refuse settings DeepSpeed ignores instead of removing them")
    p.add_argument("-o", "--output", help="write the rewritten config here (default: print it to stdout)")
    p.add_argument("--json", action="store_true", help="print changes and config as one JSON object")
    p.set_defaults(func=run)


def _fmt(v):
    from ..distributed import UNSET

    return "<unset>" if v is UNSET else json.dumps(v) if not isinstance(v, str) else v


def render_result(result) -> str:
    from ..utils.table import format_table

    t = result.target
    head = (f"DeepSpeed config from {result.source} for backend {t.backend} (DeepSpeed {t.deepspeed_version}, "
            f"bf16 {'yes' if t.bf16 else 'no' if t.bf16 is False else 'unknown'}): {len(result.changes)} change(s)")
    lines = [head]
    if result.changes:
        lines.append(format_table(("key", "old", "new", "reason"),
                                  [(c.path, _fmt(c.old), _fmt(c.new), c.reason) for c in result.changes]))
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def run(args) -> int:
    from ..distributed import rewrite

    result = rewrite(args.config, args.backend, deepspeed_version=args.deepspeed_version, soc=args.soc,
                     strict=args.strict, world_size=args.world_size)
    text = json.dumps(result.config, indent=2, sort_keys=True) + "\n"
    if args.json:
        print(json.dumps({"changes": [{"path": c.path, "old": _fmt(c.old), "new": _fmt(c.new), "reason": c.reason}
                                      for c in result.changes], "notes": result.notes, "config": result.config},
                         indent=2))
    else:
        print(render_result(result), file=sys.stderr if not args.output else sys.stdout)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    elif not args.json:
        sys.stdout.write(text)
    return 0
