"""`flux-npu bench ops` command line: argument parsing, the run over (shape, op, dtype) and what it
prints and writes; the cases, timing and rows are `flux_npu.benchmark.ops`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from ..benchmark.ops import (
    CPU_COPY_NOTE,
    DTYPES,
    OPS,
    SHAPE_ALIASES,
    SHAPE_NAMES,
    THIRD_PARTY,
    Row,
    build_case,
    copy_bandwidth,
    environment,
    format_rows,
    run_case,
)
from ..benchmark.stats import CONFIDENCE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default=None,
                        help="backend to benchmark (default: FLUX_NPU_BACKEND, then auto-detect)")
    parser.add_argument("--ops", nargs="+", default=list(OPS), help=f"ops (default: all: {' '.join(OPS)})")
    parser.add_argument("--shapes", nargs="+", default=None,
                        help=f"shape presets {' '.join(SHAPE_NAMES)} (flux_npu.shapes; "
                             "default: flux-mini; --quick: quick)")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], help="bf16, fp32, fp16 (default: bf16 fp32)")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 2, GPU 10)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="measurements per implementation; median and IQR are reported (default 7, GPU 50)")
    compile_group = parser.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", dest="compile", action="store_true", default=None,
                               help="also time torch.compile of the stock code (default on GPU/NPU, off on CPU)")
    compile_group.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("-o", "--output", default=None, metavar="PATH",
                        help="also write the rows and the environment as JSON to this file")
    # `--json PATH` was the output option before the CLI convention (-o PATH; --json prints JSON):
    # a value is still taken as the output path for one release, with a note
    parser.add_argument("--json", nargs="?", const=True, default=None, metavar="",
                        help="print the rows and the environment as JSON to stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _split(value, known, what: str) -> list:
    from ..cli.parity import names

    items = names(value) or []
    bad = [v for v in items if v not in known]
    if bad or not items:
        raise ValueError(f"unknown {what} {bad or items}; choose from {', '.join(known)}")
    return list(dict.fromkeys(items))


def run(args) -> int:
    from ..backends import get_backend

    backend = get_backend(args.backend)
    device = backend.device()
    utils = backend.utils
    on_cpu = backend.device_type == "cpu"
    output = args.output
    if isinstance(args.json, str):
        print(f"flux-npu bench ops: `--json {args.json}` is deprecated: write files with `-o {args.json}` "
              f"(`--json` alone prints JSON)", file=sys.stderr)
        output, args.json = output or args.json, None
    if output:
        from ..utils.output import output_kind

        output_kind(output)  # a directory or a missing parent fails now, not after the run
    shapes = [SHAPE_ALIASES.get(n, n) for n in _split(args.shapes or ("quick" if args.quick else "flux-mini"),
                                                      SHAPE_NAMES + tuple(SHAPE_ALIASES), "shape presets")]
    shapes = list(dict.fromkeys(shapes))
    dtypes = _split(args.dtypes, DTYPES, "dtypes")
    op_names = _split(args.ops, OPS, "ops")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (2 if on_cpu else 10))
    # --quick: 5, the fewest repeats at which a vs-stock ratio can be significant (benchmark.stats)
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else (7 if on_cpu else 50))
    if repeats < 1 or warmup < 0:
        raise ValueError("--repeats must be at least 1 and --warmup at least 0")
    use_compile = args.compile if args.compile is not None else not on_cpu
    compile_note = "" if use_compile else (
        "CPU: inductor compiles 10+ s per op; pass --compile" if on_cpu else "--no-compile")
    out = sys.stderr if args.json else sys.stdout

    copy_bw = copy_bandwidth(device, utils, (64 if on_cpu else 1024) * 2**20, warmup, max(repeats, 5))
    env = environment(backend, utils, copy_bw)
    jobs = [(op, sh, dt) for sh in shapes for op in op_names for dt in dtypes
            if not (op == "rope_freqs/bfl" and dt != dtypes[0])]
    rows: list[Row] = []
    progress = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=len(jobs), desc="bench ops", unit="case", leave=False)
    for op, sh, dt in jobs:
        if progress is not None:
            progress.set_postfix_str(f"{op} {dt}")
        case = build_case(op, sh, dt, backend, device)
        rows.extend(run_case(case, utils, warmup, repeats, copy_bw, use_compile, compile_note, backend.device_type))
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    print(f"flux-npu bench ops: backend {env['backend']} on {env['device']}, {env['date_utc']} UTC, "
          f"torch {env['versions'].get('torch')}, {env['torch_threads']} threads; "
          f"copy bandwidth {env['copy_bandwidth_gbps']:.1f} GB/s{CPU_COPY_NOTE if on_cpu else ''}; "
          f"median and IQR of {repeats} after {warmup} warm-up", file=out)
    print(f"vs stock: median stock / median impl, range from the IQRs, verdict by a Mann-Whitney U test at "
          f"{CONFIDENCE:.0%} confidence (benchmark.stats); % copy above 100 is cache-resident, not bandwidth",
          file=out)
    print(f"device time: {env['device_time']} (GB/s, % copy and vs stock come from it); "
          f"latency: {env['latency']}", file=out)
    if not use_compile:
        print(f"torch.compile of the stock ops: skipped ({compile_note})", file=out)
    print(format_rows(rows), file=out)
    data = {"environment": env, "warmup": warmup, "repeats": repeats, "rows": [asdict(r) for r in rows]}
    if output:
        from ..utils.output import write_output

        write_output(output, json.dumps(data, indent=2) + "\n")
        print(f"wrote {output}", file=out)
    if args.json:
        print(json.dumps(data, indent=2))
    bad = [r for r in rows if r.status in ("MISMATCH", "error") and r.impl not in THIRD_PARTY]
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flux_npu.benchmark.ops",
                                     description=_bench_doc())
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _bench_doc() -> str:
    from ..benchmark import ops

    return (ops.__doc__ or "").split("\n")[0]
