"""`flux-npu verify`: the one command for a machine we have never seen (a first 910B node, a GPU box).

    flux-npu verify                      # the device it finds; report in ./flux-npu-verify-<backend>-<time>/
    flux-npu verify --backend npu -o verify-910b --quick

On the chosen backend it runs, offline:
1. parity: every shipped golden (`flux_npu.parity.shipped_goldens()`), pass/fail per case, and
   Ascend's 2x rule against each golden's float64 reference; then a training trajectory (a short
   LoRA and full fine-tune) against the shipped reference curve (`flux_npu.trajectory`), and on
   npu the open device questions (`flux_npu.device_questions`);
2. op benchmarks: device time and per-call latency, stock vs patched (`flux-npu bench ops`);
3. a short whole-model benchmark, stock vs patched, inference and LoRA training;
4. with --msprobe, last (msprobe patches torch process-wide): one patched step dumped by msprobe;
and writes one report directory: report.md (for people), report.json (everything), plots when
matplotlib is installed, the model benchmark's JSON and traceback log. The report says pass/fail
per case, which kernel served each op (dispatch counts), device, versions and date, and, when
something failed, exactly what to send back. A phase that crashes is recorded with its traceback
and the others still run. Exit code: 0 when every check passed, 1 otherwise.

This module is the orchestration; the command line (`flux-npu verify ...`) is `flux_npu.cli.verify`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
import traceback

from .benchmark.stats import CONFIDENCE
from .utils.versions import environment
from .verify_dir import (  # noqa: F401  (re-exported: the report directory's names)
    MARKER,
    PARTIAL,
    REPORT_FILES,
    Interrupted,
    _promote,
    _signals_raise,
    _summary,
    check_out_dir,
    stage_dir,
)
from .verify_report import render_markdown
from .verify_sections import device_questions, msprobe_dump, parity_rule, plot_trajectory, trajectory

PHASES = ("parity", "trajectory", "ops", "model")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _served(stats) -> dict:
    """dispatch_stats() as JSON: which kernel served each op, how often, and every fallback."""
    served = [{"op": op, "backend": b, "kernel": k, "calls": n} for (op, b, k), n in sorted(stats["served"].items())]
    fallback = [{"op": op, "backend": b, "reason": r, "calls": n}
                for (op, b, r), n in sorted(stats["fallback"].items())]
    return {"served": served, "fallback": fallback}


class _Phase:
    """Runs one phase; an exception becomes a recorded 'error' with its traceback in verify.log."""

    def __init__(self, report: dict, name: str, log_path: str):
        self.report, self.name, self.log_path = report, name, log_path

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.report.setdefault(self.name, {})
        print(f"flux-npu verify: {self.name} ...", file=sys.stderr, flush=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        entry = self.report.setdefault(self.name, {})
        entry["seconds"] = round(time.perf_counter() - self.t0, 1)
        if exc_type is None or not issubclass(exc_type, Exception):  # Ctrl-C, Interrupted: the run stops
            return False
        entry["status"] = "error"
        entry["error"] = f"{exc_type.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        with open(self.log_path, "a") as f:
            f.write(f"=== {_now()} phase {self.name}\n{''.join(traceback.format_exception(exc_type, exc, tb))}\n")
        self.report["failures"].append(f"{self.name}: {entry['error']} (traceback in verify.log)")
        return True  # the other phases still run


def verify(backend=None, out_dir: str | None = None, quick: bool = False, isolate: bool | None = None,
           skip=(), command: str | None = None, msprobe: bool = False, force: bool = False) -> dict:
    """Run the phases on `backend` (a name or a Backend), write the report directory, return
    report.json's content. Never raises for a failed check: see report['verdict']. `msprobe`:
    also dump one patched Flux step with msprobe, flux_npu's ops under their own names
    (`flux_npu.probe`), into <out_dir>/msprobe/ for an op-by-op compare with another device.

    The directory: a new one, an earlier verify report (its files are replaced only once the new
    report is complete: until then the run writes into <out_dir>/partial-<time>/), or with `force`
    any directory. Interrupted (Ctrl-C, SIGTERM, SIGHUP), the report so far is written with verdict
    INTERRUPTED and the phase it stopped in, then KeyboardInterrupt / Interrupted is raised again."""
    import torch

    from . import ops, parity
    from .backends import get_backend
    from .utils.versions import versions

    b = get_backend(backend)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out_dir = out_dir or f"flux-npu-verify-{b.name}-{stamp}"
    bad = [p for p in skip if p not in PHASES]
    if bad:
        raise ValueError(f"--skip: unknown phase(s) {bad}; phases: {', '.join(PHASES)}")
    if set(PHASES) <= set(skip) and not msprobe:
        raise ValueError(f"--skip {' '.join(PHASES)}: nothing would be checked; leave at least one phase in")
    check_out_dir(out_dir, force)
    stage = stage_dir(out_dir, stamp)  # out_dir, or partial-*/ in it while an earlier report stays whole
    log_path = os.path.join(stage, "verify.log")
    with open(log_path, "w") as f:
        f.write(f"flux-npu verify {_now()}: tracebacks of crashed phases follow, then how the run ended\n")
    if isolate is None:
        isolate = b.device_type in ("cuda", "npu")
    report: dict = {
        "verdict": None,
        "dir": os.path.abspath(out_dir),
        "command": command or "flux_npu.verify.verify()",
        "date": _now(),
        "quick": quick,
        "environment": {
            "backend": b.name, "device_type": b.device_type, "device": b.utils.device_name(),
            "versions": versions(), "python": platform.python_version(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            # `flux-npu info`'s environment list: CANN / NPU driver versions on npu, the host's load
            # at the start (a loaded host widens every spread), RAM, cores
            "system": environment(),
        },
        "failures": [],
        "files": {"report": "report.md", "json": "report.json", "log": "verify.log"},
    }
    if getattr(sys.modules.get("torch_npu"), "EMULATED", False):
        # the tests' torch_npu contract emulator is loaded: say so wherever the figures go
        report["environment"]["note"] = ("torch_npu is the tests' contract emulator (CPU tensors): "
                                         "these are not hardware results")
    try:
        from . import report as info

        report["environment"]["info"] = info.collect(backend=b.name)
    except Exception as exc:  # the info table is context, not a check
        report["environment"]["info"] = f"unavailable ({type(exc).__name__}: {exc})"

    current = ["setup"]
    with _signals_raise():
        try:
            if "parity" not in skip:
                current[0] = "parity"
                with _Phase(report, "parity", log_path):
                    _parity(report, b, quick, parity, ops)
            if b.name == "npu":
                current[0] = "device_questions"
                with _Phase(report, "device_questions", log_path):
                    device_questions(report, b)
            if "trajectory" not in skip:
                current[0] = "trajectory"
                with _Phase(report, "trajectory", log_path):
                    trajectory(report, b, quick)
            if "ops" not in skip:
                current[0] = "ops"
                with _Phase(report, "ops", log_path):
                    _ops_bench(report, b, quick)
            if "model" not in skip:
                current[0] = "model"
                with _Phase(report, "model", log_path):
                    _model_bench(report, b, quick, isolate, stage, ops)
            if msprobe:  # last: msprobe patches torch, dynamo and triton process-wide (flux_npu.probe)
                current[0] = "msprobe"
                with _Phase(report, "msprobe", log_path):
                    msprobe_dump(report, b, stage)
            current[0] = "plots"
            with _Phase(report, "plots", log_path):
                _plots(report, stage)
        except (KeyboardInterrupt, Interrupted) as exc:
            how = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else f"signal {exc.signum}"
            report.get("model", {}).pop("_results", None)
            report["verdict"] = "INTERRUPTED"
            report["interrupted"] = {"phase": current[0], "by": how,
                                     "summary": f"interrupted during {current[0]} ({how}); "
                                                f"{_summary(report, PHASES)}"}
            report["failures"].append(report["interrupted"]["summary"])
            report["dir"] = os.path.abspath(stage)
            report["send_back"] = _send_back(stage, report["command"])
            _write_report(report, stage, log_path, f"interrupted during {current[0]} ({how})")
            exc.flux_npu_report = os.path.join(stage, "report.md")
            raise
    crashed = sum(1 for n in (*PHASES, "device_questions", "msprobe", "plots")
                  if isinstance(report.get(n), dict) and report[n].get("status") == "error")
    report["verdict"] = "FAIL" if report["failures"] else "PASS"
    report["send_back"] = _send_back(out_dir, report["command"])
    _write_report(report, stage, log_path, f"complete: {crashed} phase(s) crashed")
    if stage != out_dir:
        _promote(stage, out_dir)
    return report


def _write_report(report, where, log_path, ending):
    from .utils.output import write_output

    with open(log_path, "a") as f:
        f.write(f"=== {_now()} {ending}\n")
    write_output(os.path.join(where, "report.json"), json.dumps(report, indent=2, default=str))
    write_output(os.path.join(where, "report.md"), render_markdown(report))


# -- phases -----------------------------------------------------------------------------------


def _parity(report, b, quick, parity, ops):
    entry = report["parity"]
    entry["goldens"] = []
    goldens = parity.shipped_goldens()
    if not goldens:
        raise parity.GoldenError("no shipped golden to check against")
    ops.reset_dispatch_stats()
    for path in goldens:
        g = {"golden": os.path.basename(path), "path": path}
        entry["goldens"].append(g)
        try:
            g["describe"] = parity.load_golden(path).describe()
            rep = parity.check(path, backend=b, shape_sets=["tiny"] if quick else None)
        except (parity.GoldenError, ValueError) as exc:
            g["status"], g["error"] = "golden error", str(exc)
            report["failures"].append(f"parity {g['golden']}: {str(exc).splitlines()[0]}")
            continue
        g["status"] = "pass" if rep.ok else "FAIL"
        g["passed"] = sum(r.status == "pass" for r in rep.results)
        g["total"] = len(rep.results)
        g["results"] = [r.as_dict() for r in rep.results]
        for r in rep.failed:
            report["failures"].append(f"parity {g['golden']}: {r.id} {r.status}"
                                      + (f" ({r.message})" if r.message else ""))
        g["rule"] = parity_rule(rep)  # Ascend's rule against the golden's float64 reference
    entry["kernels"] = _served(ops.dispatch_stats())
    entry["status"] = "pass" if all(g["status"] == "pass" for g in entry["goldens"]) else "FAIL"


def _ops_bench(report, b, quick):
    from dataclasses import asdict

    from .benchmark import ops as B

    on_cpu = b.device_type == "cpu"
    shape = "quick" if quick else ("flux-mini" if on_cpu else "flux-dev")
    dtypes = [d for d in (["bf16"] if quick else ["bf16", "fp32"]) if B.DTYPES[d] in b.dtypes] or ["fp32"]
    # repeats grow (up to the second figure) until each "vs stock" is significant or the budget is spent
    warmup, repeats, max_repeats = (1, 5, 10) if quick else ((2, 7, 21) if on_cpu else (10, 50, 50))
    device, utils = b.device(), b.utils
    copy_bw = B.copy_bandwidth(device, utils, (16 if quick else 64 if on_cpu else 1024) * 2**20, warmup,
                               max(repeats, 5))
    rows = []
    for op in B.OPS:
        for dt in dtypes if op != "rope_freqs/bfl" else dtypes[:1]:
            case = B.build_case(op, shape, dt, b, device)
            rows.extend(B.run_case(case, utils, warmup, repeats, copy_bw, False, "", b.device_type,
                                   max_repeats=max_repeats))
    entry = report["ops"]
    entry.update(shape=shape, shape_def=B.SHAPES[shape], dtypes=dtypes, warmup=warmup, repeats=repeats,
                 max_repeats=max_repeats, confidence=CONFIDENCE,
                 environment=B.environment(b, utils, copy_bw), rows=[asdict(r) for r in rows],
                 table=B.format_rows(rows))
    bad = [r for r in rows if r.status in ("MISMATCH", "error") and r.impl not in B.THIRD_PARTY]
    for r in bad:
        report["failures"].append(f"ops: {r.op} {r.dtype} {r.impl}: {r.status} {r.note}")
    entry["status"] = "FAIL" if bad else "pass"


def _model_bench(report, b, quick, isolate, out_dir, ops):
    from .benchmark import model as M

    on_cpu = b.device_type == "cpu"
    # 5 repeats a side: the fewest at which a ratio can be significant at 95 % (benchmark.stats);
    # with 2 (the old --quick) every verdict was noise
    if quick:
        cfg = dict(presets=("tiny",), resolutions=(64,), steps=2, train_steps=1, repeats=5)
    elif on_cpu:
        cfg = dict(presets=("tiny",), resolutions=(256,), steps=10, train_steps=2, repeats=5)
    else:
        cfg = dict(presets=("flux-mini",), resolutions=(512,), steps=10, train_steps=2, repeats=5)
    dtype = "bf16" if M.DTYPES["bf16"] in b.dtypes else "fp32"
    json_path = os.path.join(out_dir, "model.json")
    log_path = M.log_path_for(json_path)
    rows = []

    def on_row(r):
        if r.traceback:
            with open(log_path, "a") as f:
                f.write(f"=== {_now()} {r.model} {r.mode} {r.res}px {r.variant}: {r.status}\n{r.traceback}\n")
            r.log = os.path.basename(log_path)
        rows.append(r)
        M.write_json_atomic(json_path, M.to_json(rows, cfg, done=False))

    ops.reset_dispatch_stats()
    # isolated children are other processes: their dispatch counts cannot be read from here
    results = M.run_benchmark(modes=("infer", "train"), train_kinds=("lora",), backend=b,
                              variants=("stock", "patched"), dtype=dtype, warmup=1, isolate=isolate,
                              on_row=on_row, timeout_s=900 if isolate else None, **cfg)
    data = M.to_json(results, dict(cfg, dtype=dtype, isolate=isolate), done=True)
    M.write_json_atomic(json_path, data)
    entry = report["model"]
    entry.update(config=dict(cfg, dtype=dtype, isolate=isolate), json="model.json",
                 results=data["results"], ratios=data["ratios"], table=M.table(results),
                 ratio_table=M.ratio_table(data["ratios"]) if data["ratios"] else "")
    entry["kernels"] = (_served(ops.dispatch_stats()) if not isolate else
                        "counted in the isolated benchmark processes, not here: see the parity phase's kernels")
    failed = [r for r in results if r.status in ("error", "crashed", "timeout")]
    for r in failed:
        report["failures"].append(f"model: {r.model} {r.mode} {r.res}px {r.variant}: {r.status}: {r.message}")
    entry["status"] = "FAIL" if failed else "pass"
    entry["_results"] = results  # for the plot; dropped before writing


def _plots(report, out_dir):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        report["plots"] = {"skipped": "matplotlib is not installed (pip install matplotlib, or the [plot] extra): "
                                      "no plots; every figure is in report.json and report.md"}
        report.get("model", {}).pop("_results", None)
        return
    made = []
    results = report.get("model", {}).pop("_results", None)
    if results:
        from .benchmark import model as M

        M.plot(results, os.path.join(out_dir, "model.png"), {"versions": report["environment"]["versions"],
                                                              "date": report["date"]})
        made.append("model.png")
    if report.get("ops", {}).get("rows"):
        _plot_ops(report["ops"], os.path.join(out_dir, "ops.png"), report)
        made.append("ops.png")
    if report.get("trajectory", {}).get("modes"):
        made.append(plot_trajectory(report, out_dir))
    report["plots"] = {"files": made}


def _plot_ops(ops_entry, path, report):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ops_entry["rows"] if r["status"] == "ok" and r["device_us"]]
    labels = list(dict.fromkeys(f"{r['op']} {r['dtype']}" for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(labels) + 4), 4.8))
    width = 0.8 / max(1, len(impls))

    def value_and_spread(r, key):
        # the IQR of the times as error bars; % of copy is inversely proportional to device time
        if key == "copy_fraction":
            y = 100 * r[key]
            return y, y * r["device_us"] / r["device_q3_us"], y * r["device_us"] / r["device_q1_us"]
        return r[key], r["latency_q1_us"], r["latency_q3_us"]

    for ax, key, title in ((axes[0], "copy_fraction", "device time as % of copy bandwidth (IQR bars; >100: cache)"),
                           (axes[1], "latency_us", "per-call latency (us, host + sync; IQR bars)")):
        for j, impl in enumerate(impls):
            xs, ys, err = [], [], [[], []]
            for i, lab in enumerate(labels):
                r = next((r for r in rows if r["impl"] == impl and f"{r['op']} {r['dtype']}" == lab), None)
                if r is None or r[key] is None:
                    continue
                y, lo, hi = value_and_spread(r, key)
                xs.append(i + (j - (len(impls) - 1) / 2) * width)
                ys.append(y)
                err[0].append(max(0.0, y - lo))
                err[1].append(max(0.0, hi - y))
            bars = ax.bar(xs, ys, width, label=impl, yerr=err, capsize=2)
            ax.bar_label(bars, labels=[f"{y:.2g}" if y < 10 else f"{y:.0f}" for y in ys], fontsize=6, padding=1)
        # log axes: one slow or cache-resident case spans orders of magnitude over the others
        ax.set_yscale("log")
        if key == "copy_fraction":
            ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    env, v = report["environment"], report["environment"]["versions"]
    n = f"{ops_entry['repeats']}-{ops_entry.get('max_repeats', ops_entry['repeats'])}"
    fig.suptitle(f"flux-npu bench ops: {env['backend']} on {env['device']}, shape {ops_entry['shape']}, "
                 f"median of {n}; torch {v.get('torch')}, flux_npu {v.get('flux_npu')}; {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _send_back(out_dir: str, command: str) -> dict:
    d = os.path.abspath(out_dir)
    tarball = d.rstrip("/") + ".tar.gz"
    return {"tar": f"tar czf {shlex.quote(tarball)} -C {shlex.quote(os.path.dirname(d))} "
                   f"{shlex.quote(os.path.basename(d))}",
            "tarball": tarball, "command": command}
