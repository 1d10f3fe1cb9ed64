"""Per-op benchmark behind `flux-npu bench ops`: stock Flux code vs our op vs torch.compile.

For every hot op our patches replace, at Flux shapes, three implementations run side by side on
the active backend's device:
  stock    the code the patches replace (diffusers' `apply_rotary_emb`, `torch.nn.RMSNorm`, the
           AdaLayerNormZero expression, `dispatch_attention_fn` on (B, S, H, D); the BFL RMSNorm,
           `apply_rope` and float64 `rope`, re-stated from the BFL layout), each with its op in
           the catalogue (`flux_npu/ops/catalogue/<op>.py`: its `bench` builders make the cases);
  patched  `flux_npu.ops.<op>(..., backend=...)`: what runs after `flux_npu.patch()`;
  compile  `torch.compile` of the stock code (on by default where a GPU runs it; on CPU it costs
           10+ s of compilation per op, so it runs only with --compile).
On npu, diffusers' own `_native_npu` attention backend is a fourth row of the attention case
(elsewhere a skipped row says why).

Before timing, every implementation's output is checked against the plain-torch reference
(`flux_npu.ops.reference`, the tests' oracle) with the tests' tolerance table; a mismatch is
reported and makes the exit code 1. Two times are reported per implementation, each as the
median with its interquartile range over --repeats measurements, implementations round-robin:
- device time: what one call costs the device when calls are issued back to back, i.e. a loop
  of many calls between two synchronisations divided by the count (on CUDA
  `triton.testing.do_bench`, which also flushes the L2 cache between calls). Bandwidth (GB/s:
  the minimum bytes an op must move, inputs read once and outputs written once, over the device
  time), "% of copy" (against a `copy_` timed the same way in the same run: of a large buffer on
  CUDA/NPU, where the L2 is flushed between calls; on CPU, where nothing flushes the caches, of
  the same number of bytes as the op moves, so both are equally cache-resident) and "vs stock"
  come from it.
- latency: one call from the host with a synchronisation after it (the backend's timer: CUDA/NPU
  events, wall clock on CPU), i.e. launch and host overhead included.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..ops import catalogue
from ..ops.catalogue.apply_rope import bfl_rotate, diffusers_apply_rotary_emb  # noqa: F401  (stock code)
from ..ops.catalogue.attention import NATIVE_NPU, diffusers_native_npu  # noqa: F401
from ..ops.catalogue.rms_norm import bfl_rms_norm  # noqa: F401
from ..ops.catalogue.rope_freqs import bfl_rope  # noqa: F401
from ..shapes import DTYPES
from ..shapes import SHAPES as SHAPE_TABLE
from ..testing import rel_err, tolerance

# the benchmark's shapes, from the one table (flux_npu.shapes); `mini` and `dev` are the names
# they had before that table (kept so existing command lines run)
SHAPE_NAMES = ("quick", "flux-mini", "flux-dev")
SHAPE_ALIASES = {"mini": "flux-mini", "dev": "flux-dev"}
SHAPES = {n: dict(B=SHAPE_TABLE[n].batch, img=SHAPE_TABLE[n].img, txt=SHAPE_TABLE[n].txt, H=SHAPE_TABLE[n].heads,
                  D=SHAPE_TABLE[n].head_dim, hidden=SHAPE_TABLE[n].hidden) for n in SHAPE_NAMES}
# every op's benchmark variants (op, op/bfl, ...), from the catalogue
OPS = tuple(catalogue.BENCH)
# baselines from other libraries: their failures are reported, not counted against our ops
THIRD_PARTY = ("compile", NATIVE_NPU)


@dataclass
class Case:
    """One op at one shape: implementations (name -> zero-argument callable), the reference
    output they are checked against, the dtype whose tolerance applies, and the bytes moved."""

    op: str
    shape: str
    dtype: str
    impls: Dict[str, Callable]
    reference: Callable
    tol_dtype: torch.dtype
    nbytes: int
    compile_target: Optional[Callable] = None
    note: str = ""
    skipped: Dict[str, str] = field(default_factory=dict)  # impl -> why it does not run here


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    impl: str
    device_us: Optional[float] = None  # median device time per call (back-to-back calls)
    device_q1_us: Optional[float] = None
    device_q3_us: Optional[float] = None
    latency_us: Optional[float] = None  # median host latency of one call with a sync
    latency_q1_us: Optional[float] = None
    latency_q3_us: Optional[float] = None
    gbps: Optional[float] = None
    copy_fraction: Optional[float] = None
    copy_gbps: Optional[float] = None  # the copy bandwidth copy_fraction is relative to
    speedup_vs_stock: Optional[float] = None
    rel_err: Optional[float] = None
    status: str = "ok"
    note: str = ""


# -- cases ------------------------------------------------------------------------------------

def build_case(op: str, shape_name: str, dtype_name: str, backend, device) -> Case:
    """One benchmark variant at one shape: its builder lives with the op (catalogue `bench`)."""
    if op not in catalogue.BENCH:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    _info, build = catalogue.BENCH[op]
    s = SHAPE_TABLE[SHAPE_ALIASES.get(shape_name, shape_name)]
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    parts = build(s, dtype, device, backend, rnd)
    return Case(op, parts.pop("label"), parts.pop("dtype_name", dtype_name), parts.pop("impls"),
                parts.pop("reference"), parts.pop("tol_dtype", dtype), parts.pop("nbytes"), **parts)


# -- timing -----------------------------------------------------------------------------------

def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check(fn, ref_out, tol_dtype) -> float:
    """Max relative error of fn()'s outputs against the reference outputs."""
    with torch.no_grad():
        got = _outputs(fn())
    refs = _outputs(ref_out)
    if len(got) != len(refs):
        return math.inf
    return max(rel_err(o, r) for o, r in zip(got, refs))


def _quartiles(ts: List[float]):
    if len(ts) < 2:
        return ts[0], ts[0], ts[0]
    q = statistics.quantiles(ts, n=4, method="inclusive")
    return q[0], statistics.median(ts), q[2]


def latency_times(fns: Dict[str, Callable], utils, warmup: int, repeats: int) -> Dict[str, List[float]]:
    """Seconds of one call each, synchronised: host launch overhead included. The implementations
    are timed round-robin (one call of each per repeat) rather than one after the other, so that
    a load change on a shared machine hits all of them alike and their ratios stay meaningful."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        utils.synchronize()
        for _ in range(repeats):
            for name, fn in fns.items():
                timer = utils.timer()
                timer.start()
                fn()
                times[name].append(timer.stop())
    return times


def device_times(fns: Dict[str, Callable], utils, device_type: str, repeats: int,
                 min_loop_s: float = 0.02) -> Dict[str, List[float]]:
    """Seconds per call when calls are issued back to back: per repeat, a loop of n calls between
    two synchronisations, divided by n (n sized so that a loop lasts about `min_loop_s`), round
    robin over the implementations. On CUDA with Triton, `triton.testing.do_bench` instead."""
    if device_type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            with torch.no_grad():
                return {name: [t / 1e3 for t in do_bench(fn, warmup=25, rep=100, return_mode="all")]
                        for name, fn in fns.items()}
    counts = {}
    with torch.no_grad():
        for name, fn in fns.items():  # calibrate: one synchronised call gives the loop length
            timer = utils.timer()
            timer.start()
            fn()
            one = max(timer.stop(), 1e-7)
            counts[name] = max(1, min(1000, math.ceil(min_loop_s / one)))
        times: Dict[str, List[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                n = counts[name]
                utils.synchronize()
                timer = utils.timer()
                timer.start()
                for _ in range(n):
                    fn()
                times[name].append(timer.stop() / n)
    return times


def device_time_method(device_type: str) -> str:
    if device_type == "cuda":
        try:
            import triton.testing  # noqa: F401

            return "triton.testing.do_bench (L2 flushed between calls)"
        except ImportError:
            pass
    return "loop of back-to-back calls between two synchronisations, divided by the count"


CPU_COPY_NOTE = " (large buffer; on CPU each row's % copy is against a copy of the bytes it moves)"


def copy_bandwidth(device, utils, nbytes: int, warmup: int = 2, repeats: int = 5) -> float:
    """Device copy bandwidth in bytes/s from device time: a `copy_` reads and writes nbytes each."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    for _ in range(warmup):
        fn()
    t = statistics.median(device_times({"copy": fn}, utils, torch.device(device).type, repeats)["copy"])
    return 2 * n * 4 / t


def run_case(case: Case, utils, warmup, repeats, copy_bw, use_compile: bool, compile_note: str,
             device_type: str = "cpu") -> List[Row]:
    ref_out = case.reference()
    tol = tolerance(case.tol_dtype)
    impls = dict(case.impls)
    rows = []
    if use_compile and case.compile_target is not None:
        impls["compile"] = torch.compile(case.compile_target)
    timed = {}
    for name, fn in impls.items():
        row = Row(case.op, case.shape, case.dtype, name, note=case.note if name == "stock" else "")
        rows.append(row)
        try:
            row.rel_err = check(fn, ref_out, case.tol_dtype)
        except Exception as exc:  # an impl that cannot run here is a row, not a crash
            row.status, row.note = "error", f"{type(exc).__name__}: {exc}"[:120]
            continue
        if not row.rel_err <= tol:
            row.status = "MISMATCH"
            row.note = f"rel err {row.rel_err:.2e} > {tol:.0e}; not timed"
            continue
        timed[name] = fn
    for name, why in case.skipped.items():
        rows.append(Row(case.op, case.shape, case.dtype, name, status="skip", note=why))
    lat = latency_times(timed, utils, warmup, repeats) if timed else {}
    dev = device_times(timed, utils, device_type, repeats) if timed else {}
    stock_dev = statistics.median(dev["stock"]) if "stock" in dev else None
    if device_type == "cpu" and dev:
        # no cache flush on CPU: compare with a copy that moves the same bytes (read + write)
        copy_bw = copy_bandwidth("cpu", utils, max(case.nbytes // 2, 4096), warmup, max(repeats, 5))
    for row in rows:
        if row.impl not in dev:
            continue
        row.device_q1_us, t, row.device_q3_us = (x * 1e6 for x in _quartiles(dev[row.impl]))
        row.device_us = t
        row.latency_q1_us, row.latency_us, row.latency_q3_us = (x * 1e6 for x in _quartiles(lat[row.impl]))
        row.gbps = case.nbytes / (t / 1e6) / 1e9
        row.copy_fraction = case.nbytes / (t / 1e6) / copy_bw if copy_bw else None
        row.copy_gbps = copy_bw / 1e9 if copy_bw else None
        if stock_dev:
            row.speedup_vs_stock = stock_dev * 1e6 / t
    return rows


# -- CLI --------------------------------------------------------------------------------------

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


def environment(backend, utils, copy_bw) -> dict:
    from ..utils.versions import versions

    device = utils.device_name()
    return {
        "backend": backend.name,
        "device": device,
        "copy_bandwidth_gbps": copy_bw / 1e9,
        "device_time": device_time_method(backend.device_type),
        "latency": "one call from the host with a synchronisation after it",
        "torch_threads": torch.get_num_threads(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "versions": versions(),
    }


def format_rows(rows: List[Row]) -> str:
    from ..utils.table import format_table

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    def iqr(lo, hi):
        return "" if lo is None else f"{lo:.1f}-{hi:.1f}"

    table = [
        (r.op, r.shape, r.dtype, r.impl, f(r.device_us, ".1f"), iqr(r.device_q1_us, r.device_q3_us), f(r.gbps, ".1f"),
         "" if r.copy_fraction is None else f"{100 * r.copy_fraction:.0f}%",
         "" if r.speedup_vs_stock is None else f"{r.speedup_vs_stock:.2f}x",
         f(r.latency_us, ".1f"), iqr(r.latency_q1_us, r.latency_q3_us), r.status if r.status != "ok" else "", r.note)
        for r in rows
    ]
    return format_table(("op", "shape", "dtype", "impl", "device us", "IQR", "GB/s", "% copy", "vs stock",
                         "latency us", "IQR", "status", "note"), table)


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
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else (7 if on_cpu else 50))
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
    rows: List[Row] = []
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
    parser = argparse.ArgumentParser(prog="python -m flux_npu.benchmark.ops", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
