"""Rows of `flux-npu bench model` and how they are reported: the text table, stock/patched
ratios with their significance, the JSON (written atomically) and the chart."""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
from dataclasses import asdict, dataclass, field

import torch

from ..utils.table import format_table
from ..utils.versions import versions


@dataclass
class BenchResult:
    model: str
    mode: str  # infer / train-lora / train-full
    res: int
    backend: str
    device: str
    variant: str  # patched / stock
    dtype: str
    steps: int
    status: str = "ok"  # ok / OOM / error
    s_per_img: float | None = None
    peak_mem_gb: float | None = None
    memory_kind: str = ""
    params: int = 0
    trainable_params: int = 0
    text_len: int = 0
    full_pipeline: bool = False
    repeats: int = 1
    s_per_img_all: list[float] = field(default_factory=list)
    s_per_img_q1: float | None = None  # interquartile range over the repeats
    s_per_img_q3: float | None = None
    s_per_img_min: float | None = None
    s_per_img_max: float | None = None
    compiled: bool = False
    message: str = ""
    log: str = ""  # the log file holding this row's traceback, if any
    traceback: str = field(default="", repr=False)  # goes to the log file, not the JSON


def summarize(runs: list[BenchResult]) -> BenchResult:
    """One row from the repeats of one configuration and variant: the median time, the spread
    (quartiles, min, max) and the largest peak memory. A failed repeat makes the row failed."""
    bad = next((r for r in runs if r.status != "ok"), None)
    if bad is not None:
        bad.repeats = len(runs)
        return bad
    times = sorted(r.s_per_img for r in runs)
    best = min(runs, key=lambda r: abs(r.s_per_img - statistics.median(times)))
    best.s_per_img = statistics.median(times)
    if len(times) >= 2:
        q = statistics.quantiles(times, n=4, method="inclusive")
        best.s_per_img_q1, best.s_per_img_q3 = q[0], q[2]
    else:
        best.s_per_img_q1 = best.s_per_img_q3 = times[0]
    best.s_per_img_min, best.s_per_img_max = times[0], times[-1]
    best.peak_mem_gb = max(r.peak_mem_gb for r in runs)
    best.repeats = len(runs)
    best.s_per_img_all = [r.s_per_img for r in runs]
    return best


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _variant_label(r: BenchResult) -> str:
    return r.variant + ("+compile" if r.compiled else "")


def _spread(r: BenchResult) -> str:
    if r.status != "ok" or r.s_per_img_q1 is None:
        return ""
    if r.repeats < 2:
        return "1 run"
    return f"{r.s_per_img_q1:.3f}-{r.s_per_img_q3:.3f}"


def row_line(r: BenchResult) -> str:
    """One finished row as a line of text (printed as rows finish, whatever the progress bar does)."""
    head = f"{r.model} {r.mode} {r.res}px {_variant_label(r)}"
    if r.status != "ok":
        return f"{head}: {r.status}: {r.message}" + (f" (traceback in {r.log})" if r.log else "")
    return (f"{head}: {r.s_per_img:.4g} s/img (median of {r.repeats}, IQR {_spread(r)}, "
            f"min {r.s_per_img_min:.4g}, max {r.s_per_img_max:.4g}), peak {r.peak_mem_gb:.2f} GB")


def table(results: list[BenchResult]) -> str:
    rows = []
    for r in results:
        ok = r.status == "ok"
        rows.append([r.model, r.mode, f"{r.res}", r.backend, _variant_label(r),
                     _fmt(r.s_per_img, ".3f") if ok else r.status, _spread(r), str(r.repeats) if ok else "",
                     _fmt(r.peak_mem_gb, ".2f") if ok else r.status,
                     r.dtype, r.status if ok else f"{r.status}: {r.message}"[:60]])
    return format_table(["model", "mode", "res", "backend", "variant", "s/img", "IQR s/img", "n", "peak mem GB",
                         "dtype", "status"], rows)


def ratios(results: list[BenchResult]) -> list[dict]:
    """stock / patched time and memory for each configuration measured both ways, with the spread
    and the verdict of benchmark.stats.compare on the per-repeat times (a ratio whose samples do not
    differ at its confidence is flagged "not significant", as is one from a single run)."""
    from .stats import compare

    out = []
    by = {}
    for r in results:
        by.setdefault((r.model, r.mode, r.res, r.backend, r.compiled), {})[r.variant] = r
    for key, pair in by.items():
        s, p = pair.get("stock"), pair.get("patched")
        if not (s and p and s.status == p.status == "ok" and p.s_per_img):
            continue
        v = compare(_samples(s), _samples(p))
        out.append({"model": key[0], "mode": key[1], "res": key[2], "backend": key[3], "compiled": key[4],
                    "speedup": s.s_per_img / p.s_per_img,
                    "speedup_range": None if v.low is None else [v.low, v.high],
                    "p_value": v.p_value, "confidence": v.confidence,
                    "significant": v.significant, "note": v.note,
                    "memory_ratio": (p.peak_mem_gb / s.peak_mem_gb) if s.peak_mem_gb else None})
    return out


def _samples(r: BenchResult) -> list[float]:
    """The per-repeat seconds per image (older rows without them: the median alone, never significant)."""
    return list(r.s_per_img_all or [r.s_per_img])


def ratio_table(rs: list[dict]) -> str:
    rows = [[r["model"], r["mode"] + (" +compile" if r["compiled"] else ""), r["res"], r["backend"],
             f"{r['speedup']:.3f}x",
             "" if not r["speedup_range"] else f"{r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}x",
             "" if r["memory_ratio"] is None else f"{r['memory_ratio']:.3f}",
             (f"significant (p={r['p_value']:.2g})" if r["significant"]
              else f"not significant ({r['note']})")] for r in rs]
    return format_table(["model", "mode", "res", "backend", "stock/patched time", "range (IQR)",
                         "patched/stock memory", "verdict (Mann-Whitney, 95%)"], rows)


def to_json(results: list[BenchResult], args: dict | None = None, done: bool = True) -> dict:
    b = results[0].backend if results else None
    return {
        "meta": {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "backend": b,
                 "device": results[0].device if results else None, "versions": versions(),
                 "torch_threads": torch.get_num_threads(), "args": args or {}, "complete": done,
                 "units": {"s_per_img": "seconds per image (median over repeats)", "peak_mem_gb": "1e9 bytes"}},
        "results": [{k: v for k, v in asdict(r).items() if k != "traceback"} for r in results],
        "ratios": ratios(results),
    }


def write_json_atomic(path: str, data: dict) -> None:
    """Write through utils.output: a regular file atomically (a reader, or a crash, never sees half of
    it), a device or FIFO in place."""
    from ..utils.output import write_output

    write_output(path, json.dumps(data, indent=2))


def log_path_for(output: str | None) -> str:
    """The traceback log next to the JSON (`bench.json` -> `bench.log`), else (no file output, or a
    device / FIFO / stdout) in the temp dir."""
    from ..utils.output import output_kind

    if output and output_kind(output) == "file":
        root, _ = os.path.splitext(output)
        return root + ".log"
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"flux-npu-bench-model-{os.getpid()}.log")


def plot(results: list[BenchResult], path: str, meta: dict | None = None) -> None:
    """Inference and training side by side (never on one axis): seconds per image (median, IQR as
    error bars) and peak memory, one bar per variant, each labelled with its value; OOM / error
    configurations are marked, not drawn. The title names dtype, steps, repeats, device,
    versions and date."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = meta or {}
    groups = [("inference", [r for r in results if r.mode == "infer"]),
              ("training", [r for r in results if r.mode != "infer"])]
    groups = [(g, rs) for g, rs in groups if rs]
    if not groups:
        return
    fig, axes = plt.subplots(2, len(groups), figsize=(max(6.5, 4.2 * len(groups) + 1.5), 7.5), squeeze=False)
    for col, (gname, rs) in enumerate(groups):
        labels = list(dict.fromkeys(f"{r.model}\n{r.mode}\n{r.res}px" for r in rs))
        variants = list(dict.fromkeys(_variant_label(r) for r in rs))
        width = 0.8 / max(1, len(variants))
        for row, (attr, title) in enumerate((("s_per_img", "seconds per image (median, IQR bars)"),
                                             ("peak_mem_gb", "peak memory (GB)"))):
            ax = axes[row][col]
            for j, v in enumerate(variants):
                xs, ys, err = [], [], [[], []]
                for i, lab in enumerate(labels):
                    r = next((r for r in rs if _variant_label(r) == v and f"{r.model}\n{r.mode}\n{r.res}px" == lab),
                             None)
                    if r is None:
                        continue
                    x = i + (j - (len(variants) - 1) / 2) * width
                    if r.status == "ok":
                        y = getattr(r, attr)
                        xs.append(x)
                        ys.append(y)
                        lo = r.s_per_img_q1 if attr == "s_per_img" and r.s_per_img_q1 is not None else y
                        hi = r.s_per_img_q3 if attr == "s_per_img" and r.s_per_img_q3 is not None else y
                        err[0].append(max(0.0, y - lo))
                        err[1].append(max(0.0, hi - y))
                    else:
                        ax.text(x, 0, r.status, ha="center", va="bottom", rotation=90, fontsize=8, color="red")
                bars = ax.bar(xs, ys, width, label=v, yerr=err if attr == "s_per_img" else None, capsize=3)
                ax.bar_label(bars, labels=[f"{y:.3g}" for y in ys], fontsize=7, padding=2)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, fontsize=8)
            ax.set_title(f"{gname}: {title}", fontsize=9)
            ax.legend(fontsize=8)
            ax.margins(y=0.15)
            drawn = [getattr(r, attr) for r in rs if r.status == "ok" and getattr(r, attr)]
            if drawn and max(drawn) > 10 * min(drawn):  # orders of magnitude apart: a linear axis hides the small
                ax.set_yscale("log")
    r0 = results[0]
    v = meta.get("versions") or versions()
    steps = sorted({r.steps for r in results if r.mode == "infer"})
    tsteps = sorted({r.steps for r in results if r.mode != "infer"})
    reps = sorted({r.repeats for r in results if r.status == "ok"})
    fig.suptitle(
        f"flux-npu bench model: {r0.backend} on {r0.device}; {r0.dtype}, batch 1, "
        f"{'infer ' + '/'.join(map(str, steps)) + ' steps' if steps else ''}"
        f"{', ' if steps and tsteps else ''}{'train ' + '/'.join(map(str, tsteps)) + ' steps' if tsteps else ''}, "
        f"repeats {'/'.join(map(str, reps)) or '-'}\n"
        f"torch {v.get('torch')}, diffusers {v.get('diffusers')}, flux_npu {v.get('flux_npu')}; "
        f"{meta.get('date') or _dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def require_matplotlib() -> None:
    """--plot without matplotlib: fail before the run, not after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib, which is not installed: pip install matplotlib "
                         "(or pip install 'flux-npu[plot]'), or leave out --plot") from None
