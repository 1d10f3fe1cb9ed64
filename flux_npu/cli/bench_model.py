"""`flux-npu bench model` command line: argument parsing and the printed/written results; the
runner is `flux_npu.benchmark.model`."""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import time

import torch

from ..backends import get_backend
from ..benchmark import model as M
from ..benchmark.model import DTYPES, MODES, PRESETS
from ..benchmark.results import (
    BenchResult,
    _variant_label,
    log_path_for,
    plot,
    ratio_table,
    ratios,
    require_matplotlib,
    row_line,
    table,
    to_json,
)


def add_arguments(p) -> None:
    p.add_argument("--preset", nargs="+", default=["tiny"],
                   help=f"model preset(s): {', '.join(PRESETS)} (default: tiny)")
    p.add_argument("--mode", nargs="+", default=["infer"], help="infer, train or both (default: infer)")
    p.add_argument("--train", nargs="+", default=["lora"],
                   help="training kind(s): lora (r=16 on the attention projections), full (default: lora)")
    p.add_argument("--res", nargs="+", default=["512"], help="square resolution(s) in pixels (default: 512)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps per image in infer mode (default: 50)")
    p.add_argument("--train-steps", type=int, default=3, help="timed optimizer steps in train mode (default: 3)")
    p.add_argument("--repeats", type=int, default=5,
                   help="measure each configuration N times, variants interleaved; median and spread (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up iterations per configuration (default: 1)")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES), help="model dtype (default: bf16)")
    p.add_argument("--backend", help="backend (default: FLUX_NPU_BACKEND, then auto-detect)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compare", action="store_true", help="run stock and patched side by side")
    g.add_argument("--stock", action="store_true", help="stock diffusers only (default: patched only)")
    p.add_argument("--compile", action="store_true", help="time torch.compile of the transformer (stock and patched)")
    p.add_argument("--isolate", action="store_true",
                   help="run each configuration and variant in its own process: a crash (CUDA fault, segfault) "
                        "costs that row only")
    p.add_argument("--timeout-s", type=float,
                   help="with --isolate: kill a configuration's process after this many seconds (a 'timeout' row)")
    p.add_argument("--full-pipeline", action="store_true",
                   help="infer: include random-init T5 + CLIP text encoders and the VAE decoder in the timing")
    p.add_argument("--text-len", type=int, help="T5 tokens (default: 512 for Flux presets, 16 for tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-limit-gb", type=float,
                   help="cap memory per configuration (GPU/NPU allocator fraction; CPU: address space above the "
                        "current size); configurations beyond it are reported as OOM")
    p.add_argument("-o", "--output", help="write results as JSON to this file (rewritten as each row finishes); "
                                          "tracebacks go to the .log next to it")
    p.add_argument("--json", action="store_true", help="print the results as JSON to stdout at the end")
    p.add_argument("--plot", help="draw a PNG chart to this file (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _choices(values, allowed, what):
    from ..cli.parity import names

    out = list(dict.fromkeys(names(values) or []))
    bad = [v for v in out if v not in allowed]
    if bad or not out:
        raise ValueError(f"unknown {what} {bad or out}; choose from {', '.join(allowed)}")
    return out


def run(args) -> int:
    presets = _choices(args.preset, PRESETS, "preset(s)")
    mode_names = _choices(args.mode, MODES + ("both",), "mode(s)")
    modes = ("infer", "train") if "both" in mode_names else tuple(mode_names)
    kinds = _choices(args.train, ("lora", "full"), "training kind(s)")
    from ..cli.parity import names

    try:
        res = [int(r) for r in dict.fromkeys(names(args.res) or [])]
    except ValueError:
        raise ValueError(f"--res takes integers (pixels), got {args.res}") from None
    if args.timeout_s is not None and not args.isolate:
        raise ValueError("--timeout-s needs --isolate (a configuration in this process cannot be killed alone)")
    from ..benchmark.isolate import check_timeout

    check_timeout(args.timeout_s)  # inf / nan / <= 0 refused before anything runs
    if args.plot:
        require_matplotlib()
    get_backend(args.backend)  # an unknown or unavailable backend fails before anything runs
    variants = ("stock", "patched") if args.compare else (("stock",) if args.stock else ("patched",))
    arg_record = {k: v for k, v in vars(args).items() if k != "func"}
    from ..utils.output import output_kind

    if args.output:
        output_kind(args.output)  # a directory or a socket fails now, not after the run
    for path in (args.output, args.plot):  # an unwritable destination fails now, not after the run
        if path and not (path == args.output and output_kind(path) == "stream"):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
                raise ValueError(f"cannot write {path}: its directory is not writable; pick another path")
    log_path = log_path_for(args.output)
    out = sys.stderr if args.json else sys.stdout
    t0 = time.perf_counter()
    done: list[BenchResult] = []

    def on_row(r: BenchResult):
        if r.traceback:
            with open(log_path, "a") as f:
                f.write(f"=== {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ} {r.model} {r.mode} {r.res}px "
                        f"{_variant_label(r)}: {r.status}\n{r.traceback}\n")
            r.log = log_path
        done.append(r)
        print(row_line(r), file=out, flush=True)
        if args.output and output_kind(args.output) == "file":  # a stream gets the final JSON only, once
            M.write_json_atomic(args.output, to_json(done, arg_record, done=False))

    results = M.run_benchmark(
        presets=tuple(presets), modes=modes, train_kinds=tuple(kinds), resolutions=tuple(res), backend=args.backend,
        variants=variants, dtype=args.dtype, steps=args.steps, train_steps=args.train_steps, warmup=args.warmup,
        full_pipeline=args.full_pipeline, text_len=args.text_len, seed=args.seed, limit_gb=args.memory_limit_gb,
        repeats=args.repeats, progress=not args.no_progress and sys.stderr.isatty(), isolate=args.isolate,
        compile_model=args.compile, on_row=on_row, timeout_s=args.timeout_s,
    )
    data = to_json(results, arg_record, done=True)
    print(file=out)
    print(table(results), file=out)
    rs = ratios(results)
    if rs:
        print(file=out)
        print(ratio_table(rs), file=out)
    r0 = results[0] if results else None
    if r0:
        print(f"\nbackend {r0.backend} on {r0.device}; memory: {r0.memory_kind or '-'}; "
              f"{torch.get_num_threads()} torch threads; total {time.perf_counter() - t0:.1f} s", file=out)
    if args.output:
        M.write_json_atomic(args.output, data)
        print(f"wrote {args.output}", file=out)
    if args.json:
        print(json.dumps(data, indent=2))
    if args.plot:
        plot(results, args.plot, data["meta"])
        print(f"wrote {args.plot}", file=out)
    failed = [r for r in results if r.status in ("error", "crashed", "timeout")]
    if failed:
        for r in failed:
            print(f"flux-npu bench model: {r.model} {r.mode} {r.res}px {_variant_label(r)}: {r.status}: {r.message}"
                  + (f" (traceback: {r.log})" if r.log else ""), file=sys.stderr)
        return 1
    return 0
