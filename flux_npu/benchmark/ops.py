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
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..ops import catalogue
from ..ops.catalogue.apply_rope import bfl_rotate, diffusers_apply_rotary_emb  # noqa: F401  (stock code)
from ..ops.catalogue.attention import NATIVE_NPU, diffusers_native_npu  # noqa: F401
from ..ops.catalogue.rms_norm import bfl_rms_norm  # noqa: F401
from ..ops.catalogue.rope_freqs import bfl_rope  # noqa: F401
from ..shapes import DTYPES
from ..shapes import SHAPES as SHAPE_TABLE
from ..testing import rel_err, tolerance
from .stats import CONFIDENCE, compare, looks_for, quartiles

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
    impls: dict[str, Callable]
    reference: Callable
    tol_dtype: torch.dtype
    nbytes: int
    compile_target: Callable | None = None
    note: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # impl -> why it does not run here


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    impl: str
    device_us: float | None = None  # median device time per call (back-to-back calls)
    device_q1_us: float | None = None
    device_q3_us: float | None = None
    device_n: int | None = None  # device-time measurements taken (repeats grow until significant)
    latency_us: float | None = None  # median host latency of one call with a sync
    latency_q1_us: float | None = None
    latency_q3_us: float | None = None
    gbps: float | None = None
    copy_fraction: float | None = None
    copy_gbps: float | None = None  # the copy bandwidth copy_fraction is relative to
    speedup_vs_stock: float | None = None  # median stock device time / this one's
    vs_stock_low: float | None = None  # its spread from the interquartile ranges (benchmark.stats)
    vs_stock_high: float | None = None
    vs_stock_p: float | None = None  # Mann-Whitney p-value against stock
    vs_stock_significant: bool | None = None
    vs_stock_note: str = ""  # why not significant
    cache_resident: bool = False  # faster than a copy of its bytes: caches, not bandwidth, set the time
    rel_err: float | None = None
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
    return max(rel_err(o, r) for o, r in zip(got, refs, strict=False))


def latency_times(fns: dict[str, Callable], utils, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of one call each, synchronised: host launch overhead included. The implementations
    are timed round-robin (one call of each per repeat) rather than one after the other, so that
    a load change on a shared machine hits all of them alike and their ratios stay meaningful."""
    times: dict[str, list[float]] = {name: [] for name in fns}
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


def device_times(fns: dict[str, Callable], utils, device_type: str, repeats: int,
                 min_loop_s: float = 0.02) -> dict[str, list[float]]:
    """Seconds per call when calls are issued back to back: per repeat, a loop of n calls between
    two synchronisations, divided by n (n sized so that a loop lasts about `min_loop_s`), round
    robin over the implementations. On CPU the loop is `torch.utils.benchmark.Timer.timeit(n)` (its
    thread setting and clock; `utils.clock` replaces the clock where a caller gives one); on CUDA with
    Triton, `triton.testing.do_bench` instead; on NPU the backend's event timer around the loop."""
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
        times: dict[str, list[float]] = {name: [] for name in fns}
        if device_type == "cpu":
            from torch.utils.benchmark import Timer

            clock = getattr(utils, "clock", None) or time.perf_counter
            timers = {name: Timer(stmt="fn()", globals={"fn": fn}, timer=clock, num_threads=torch.get_num_threads())
                      for name, fn in fns.items()}
            for _ in range(repeats):
                for name, t in timers.items():
                    times[name].append(t.timeit(counts[name]).mean)
            return times
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
    if device_type == "cpu":
        return "torch.utils.benchmark.Timer.timeit over a loop of back-to-back calls, divided by the count"
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
             device_type: str = "cpu", max_repeats: int | None = None,
             confidence: float = CONFIDENCE) -> list[Row]:
    """Check, then time every implementation. Device time is measured `repeats` times; with
    `max_repeats`, `repeats` more at a time (up to it) until every implementation differs from stock
    at `confidence` (benchmark.stats; the looks are counted in). Each row's "vs stock" carries its
    spread and that verdict."""
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
    max_repeats = max(repeats, max_repeats or repeats)
    looks = looks_for(repeats, max_repeats)
    dev: dict[str, list[float]] = {}
    while timed:
        for name, ts in device_times(timed, utils, device_type, repeats).items():
            dev.setdefault(name, []).extend(ts)
        if "stock" not in dev or len(dev["stock"]) >= max_repeats or all(
                compare(dev["stock"], ts, confidence, looks).significant for k, ts in dev.items() if k != "stock"):
            break
    stock_dev = statistics.median(dev["stock"]) if "stock" in dev else None
    if device_type == "cpu" and dev:
        # no cache flush on CPU: compare with a copy that moves the same bytes (read + write)
        copy_bw = copy_bandwidth("cpu", utils, max(case.nbytes // 2, 4096), warmup, max(repeats, 5))
    for row in rows:
        if row.impl not in dev:
            continue
        row.device_q1_us, t, row.device_q3_us = (x * 1e6 for x in quartiles(dev[row.impl]))
        row.device_us = t
        row.device_n = len(dev[row.impl])
        row.latency_q1_us, row.latency_us, row.latency_q3_us = (x * 1e6 for x in quartiles(lat[row.impl]))
        row.gbps = case.nbytes / (t / 1e6) / 1e9
        row.copy_fraction = case.nbytes / (t / 1e6) / copy_bw if copy_bw else None
        row.copy_gbps = copy_bw / 1e9 if copy_bw else None
        row.cache_resident = bool(row.copy_fraction and row.copy_fraction > 1)
        if stock_dev and row.impl != "stock":
            v = compare(dev["stock"], dev[row.impl], confidence, looks)
            row.speedup_vs_stock, row.vs_stock_low, row.vs_stock_high = v.ratio, v.low, v.high
            row.vs_stock_p, row.vs_stock_significant, row.vs_stock_note = v.p_value, v.significant, v.note
        elif stock_dev:
            row.speedup_vs_stock = 1.0
    return rows


# -- reporting ------------------------------------------------------------------------------

def vs_stock_text(r) -> tuple:
    """("1.43x", "1.20-1.70x", "faster" | "slower" | "not significant") for a row (a Row or its dict)."""
    g = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
    x = g("speedup_vs_stock")
    if x is None:
        return "", "", ""
    if g("impl") == "stock":
        return "1.00x", "", "(baseline)"
    spread = "" if g("vs_stock_low") is None else f"{g('vs_stock_low'):.2f}-{g('vs_stock_high'):.2f}x"
    if not g("vs_stock_significant"):
        verdict = "not significant"
    else:
        verdict = ("faster" if x > 1 else "slower") + f" (p={g('vs_stock_p'):.2g})"
    return f"{x:.2f}x", spread, verdict


def copy_text(r) -> str:
    """% of copy bandwidth, or "cache-resident" above 100 % (then it is not a bandwidth)."""
    g = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
    frac = g("copy_fraction")
    if frac is None:
        return ""
    return f"cache-resident ({100 * frac:.0f}%)" if frac > 1 else f"{100 * frac:.0f}%"


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


def format_rows(rows: list[Row]) -> str:
    from ..utils.table import format_table

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    def iqr(lo, hi):
        return "" if lo is None else f"{lo:.1f}-{hi:.1f}"

    table = [
        (r.op, r.shape, r.dtype, r.impl, f(r.device_us, ".1f"), iqr(r.device_q1_us, r.device_q3_us), f(r.gbps, ".1f"),
         copy_text(r), *vs_stock_text(r),
         f(r.latency_us, ".1f"), iqr(r.latency_q1_us, r.latency_q3_us), r.status if r.status != "ok" else "", r.note)
        for r in rows
    ]
    return format_table(("op", "shape", "dtype", "impl", "device us", "IQR", "GB/s", "% copy", "vs stock",
                         "range (IQR)", "verdict", "latency us", "IQR", "status", "note"), table)


# -- command line: flux_npu.cli.bench_ops (these names keep `python -m flux_npu.benchmark.ops` working)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli.bench_ops import add_arguments as _add

    _add(parser)


def run(args) -> int:
    from ..cli.bench_ops import run as _run

    return _run(args)


def main(argv=None) -> int:
    from ..cli.bench_ops import main as _main

    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
