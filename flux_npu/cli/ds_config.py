"""`flux-npu ds-config IN [--backend npu] [-o OUT.json]`: rewrite a DeepSpeed config (JSON, or an
x-flux / FluxKits training YAML's deepspeed: section) for a backend; print the changes as a table
and the result as JSON (to OUT with -o: a file written atomically, a device or FIFO in place; never
onto IN, and onto an existing file only when it is a DeepSpeed JSON config or with --force). Exit 0
on success, 1 when the config cannot work there or cannot be read or written, 2 on bad usage."""

from __future__ import annotations

import contextlib
import json
import os
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
    p.add_argument("-o", "--output", help="write the rewritten config here (default: print it to stdout); never the "
                                          "input file, and an existing file only if it is a DeepSpeed JSON")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT even if it is not a DeepSpeed JSON config")
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


# Top-level keys that mark a JSON file as a DeepSpeed config (safe to replace with a rewritten one).
_DS_MARKERS = {"zero_optimization", "train_micro_batch_size_per_gpu", "train_batch_size", "bf16", "fp16",
               "optimizer", "scheduler", "gradient_accumulation_steps", "gradient_clipping", "steps_per_print"}


def check_output(config, output: str, force: bool) -> None:
    """Refuse to write onto the input (any path to the same file) or onto a regular file that is not a
    DeepSpeed JSON; a device, FIFO or /dev/stdout is written in place (utils.output), never replaced."""
    import os

    from ..utils.output import output_kind

    if output_kind(output) == "stream" or not os.path.exists(output):
        return
    if isinstance(config, str) and os.path.exists(config) and os.path.samefile(config, output):
        raise ValueError(f"-o {output} is the input file {config}: writing the rewritten config there would "
                         "replace it (a training YAML would lose every other key); choose another output path")
    if force or os.path.getsize(output) == 0:
        return
    try:
        with open(output, encoding="utf-8") as f:
            existing = json.load(f)
    except (OSError, ValueError):
        existing = None
    if not (isinstance(existing, dict) and _DS_MARKERS & set(existing)):
        raise ValueError(f"-o {output} exists and is not a DeepSpeed JSON config; refusing to overwrite it. "
                         "Choose another path, or pass --force to replace it")


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to stdout meanwhile to stderr: Python-level writes and, because
    third-party loggers hold the stdout stream they found at import, the file descriptor too."""
    sys.stdout.flush()
    saved = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no fd 1 / 2 (an embedding host): Python-level redirection only
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def run(args) -> int:
    from ..distributed import rewrite

    if args.output:
        check_output(args.config, args.output, args.force)
    with stdout_to_stderr():  # DeepSpeed logs "Setting accelerator to CPU" to stdout: stdout is JSON only
        result = rewrite(args.config, args.backend, deepspeed_version=args.deepspeed_version, soc=args.soc,
                         strict=args.strict, world_size=args.world_size)
    # allow_nan=False: DeepSpeed reads JSON, which has no NaN/Infinity (load_config refuses them too)
    text = json.dumps(result.config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    if args.json:
        print(json.dumps({"changes": [{"path": c.path, "old": _fmt(c.old), "new": _fmt(c.new), "reason": c.reason}
                                      for c in result.changes], "notes": result.notes, "config": result.config},
                         indent=2, allow_nan=False))
    else:
        print(render_result(result), file=sys.stderr if not args.output else sys.stdout)
    if args.output:
        from ..utils.output import write_output

        write_output(args.output, text)
    elif not args.json:
        sys.stdout.write(text)
    return 0
