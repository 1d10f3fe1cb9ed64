"""`flux-npu bench model`: whole-model speed and memory per device, model-card style.

For each configuration (preset x mode x resolution x variant) it reports seconds per image and
peak memory, the way model cards compare devices (e.g. FluxKits' Flux-dev / Flux-mini on H20 vs
910B):

- infer: `--steps` flow-matching Euler steps of the random-init transformer at batch 1; with
  `--full-pipeline` the T5 + CLIP text encoders run first and the VAE decodes the latents, all
  inside the timed region (the model card's "text encoders and VAE included").
- train: one optimizer step per image (AdamW) on the flow-matching loss with gradient
  checkpointing, LoRA r=16 through peft on the attention projections (`--train lora`) or every
  parameter (`--train full`); text embeddings are precomputed (as training scripts cache them).
- variants: `patched` runs under `flux_npu.patch(backend)`, `stock` is unchanged diffusers;
  `--compare` runs both side by side in one process on the same model and inputs.

Timing: untimed warm-up (`--warmup`, one denoising step / optimizer step by default), then the
wall time of the timed work after `synchronize()`, divided by the images made; `--repeats N`
measures each configuration N times with the variants interleaved (so that load from elsewhere
hits both alike) and reports the median. Peak memory: the device allocator's peak on
GPU/NPU; on CPU the process's resident set size, sampled every 10 ms by a thread (a lower bound,
and it includes the Python runtime). A configuration that runs out of memory is reported as OOM
and the run goes on; `--memory-limit-gb` imposes a limit (device allocator fraction on GPU/NPU,
address-space limit on CPU) so that a configuration beyond it fails the same honest way.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from ..backends import Backend, get_backend
from ..utils.table import format_table
from ..utils.versions import versions

PRESETS = ("tiny", "flux-mini", "flux-dev")
MODES = ("infer", "train")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
DEFAULT_TEXT_LEN = {"tiny": 16, "flux-mini": 512, "flux-dev": 512}


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
    s_per_img: Optional[float] = None
    peak_mem_gb: Optional[float] = None
    memory_kind: str = ""
    params: int = 0
    trainable_params: int = 0
    text_len: int = 0
    full_pipeline: bool = False
    repeats: int = 1
    s_per_img_all: List[float] = field(default_factory=list)
    message: str = ""


# -- memory -----------------------------------------------------------------------------------


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                               or "cannot allocate memory" in text)


def oom_message(exc: BaseException) -> str:
    """A short OOM reason: the size the allocator was asked for, when it says."""
    import re

    text = str(exc)
    m = re.search(r"tried to allocate (\d+) bytes", text, re.I)
    if m:
        return f"tried to allocate {int(m.group(1)) / 1e9:.3g} GB ({type(exc).__name__})"
    m = re.search(r"tried to allocate ([\d.]+ [KMGT]i?B)", text, re.I)
    if m:
        return f"tried to allocate {m.group(1)} ({type(exc).__name__})"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[0][:160] if lines else type(exc).__name__)


class _PeakSampler:
    """Calls `utils.sample()` every `interval` seconds (CPU: RSS has no allocator peak)."""

    def __init__(self, utils, interval=0.01):
        self.utils, self.interval = utils, interval
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if hasattr(self.utils, "sample"):
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.utils.sample()

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False


@contextlib.contextmanager
def memory_limit(backend: Backend, limit_gb: Optional[float]):
    """Impose a real allocation limit for one configuration: on a GPU/NPU the allocator's
    per-process fraction; on CPU (Linux) an address-space rlimit of the current size plus
    `limit_gb`, so that allocations beyond it fail with the allocator's own error. On CPU the cap
    counts address space, so heap arenas already reserved earlier in the process absorb some
    allocations, and a tight cap also starves oneDNN's JIT used by bf16 GEMMs ("could not create
    a primitive"): use it in a fresh process for reproducible OOM points."""
    if not limit_gb:
        yield
        return
    if backend.device_type == "cpu":
        import resource

        import psutil

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = psutil.Process().memory_info().vms + int(limit_gb * 1e9)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return
    mod = getattr(torch, backend.device_type)
    total = mod.get_device_properties(mod.current_device()).total_memory
    mod.set_per_process_memory_fraction(min(1.0, limit_gb * 1e9 / total))
    try:
        yield
    finally:
        mod.set_per_process_memory_fraction(1.0)


def _free(backend: Backend):
    gc.collect()
    mod = getattr(torch, backend.device_type, None)
    if backend.device_type != "cpu" and mod is not None and hasattr(mod, "empty_cache"):
        mod.empty_cache()


# -- the work ---------------------------------------------------------------------------------


@dataclass
class _Setup:
    preset: str
    config: dict
    transformer: torch.nn.Module
    dtype: torch.dtype
    device: torch.device
    text_len: int
    parts: object = None  # TextAndVae when --full-pipeline
    lora_added: bool = False


def _inputs(setup: _Setup, res: int, seed: int):
    from ..models import make_inputs

    return make_inputs(setup.config, resolution=res, text_len=setup.text_len, batch=1, dtype=setup.dtype,
                       device=setup.device, seed=seed)


def _call(transformer, x, inp, t):
    kw = inp.as_kwargs()
    kw.update(hidden_states=x, timestep=t.expand(x.shape[0]).to(x.dtype))
    return transformer(**kw, return_dict=False)[0]


def _infer_once(setup: _Setup, res: int, steps: int, seed: int, progress):
    """One image: (text encoders) + `steps` Euler steps + (VAE decode)."""
    from . import pipeline

    inp = _inputs(setup, res, seed)
    if setup.parts is not None:
        g = torch.Generator().manual_seed(seed)
        states, pooled = pipeline.encode_prompt(setup.parts, setup.text_len, 1, setup.device, g)
        inp.encoder_hidden_states, inp.pooled_projections = states.to(setup.dtype), pooled.to(setup.dtype)
    x = inp.hidden_states
    sigmas = torch.linspace(1.0, 0.0, steps + 1, device=setup.device)
    for i in range(steps):
        v = _call(setup.transformer, x, inp, sigmas[i])
        x = x + (sigmas[i + 1] - sigmas[i]).to(x.dtype) * v
        progress()
    if setup.parts is not None:
        x = pipeline.decode(setup.parts, x, res)
    return x


def _prepare_training(setup: _Setup, kind: str):
    model = setup.transformer
    if kind == "lora":
        if not setup.lora_added:
            from peft import LoraConfig

            model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                         target_modules=list(LORA_TARGETS)))
            setup.lora_added = True
        model.requires_grad_(False)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
    else:
        model.requires_grad_(True)
    model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=1e-5)


def _train_step(setup: _Setup, opt, res: int, seed: int):
    inp = _inputs(setup, res, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x0 = inp.hidden_states
    noise = torch.randn(x0.shape, generator=g).to(x0)
    t = torch.rand(1, generator=g).to(device=x0.device, dtype=x0.dtype)
    xt = (1 - t) * x0 + t * noise
    pred = _call(setup.transformer, xt, inp, t)
    loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _variant_ctx(variant: str, backend: Backend):
    if variant == "stock":
        return contextlib.nullcontext()
    from ..patches import patch

    return patch(backend=backend, targets=["diffusers"])


def run_config(setup: _Setup, backend: Backend, mode: str, train_kind: str, res: int, variant: str, steps: int,
               warmup: int = 1, seed: int = 0, limit_gb: Optional[float] = None, bar=None) -> BenchResult:
    """Measure one configuration; an out-of-memory becomes status OOM, never a crash."""
    utils = backend.utils
    r = BenchResult(
        model=setup.preset, mode=mode if mode == "infer" else f"train-{train_kind}", res=res, backend=backend.name,
        device=utils.device_name(), variant=variant, dtype=str(setup.dtype).replace("torch.", ""), steps=steps,
        params=sum(p.numel() for n, p in setup.transformer.named_parameters() if "lora_" not in n), text_len=setup.text_len,
        full_pipeline=setup.parts is not None and mode == "infer",
        memory_kind="process RSS peak (sampled)" if backend.device_type == "cpu" else "allocator peak",
    )

    def tick():
        if bar is not None:
            bar.update(1)

    opt = None
    try:
        # the sampler thread starts before the limit: its stack is address space too
        with _PeakSampler(utils), memory_limit(backend, limit_gb), _variant_ctx(variant, backend):
            if mode == "infer":
                setup.transformer.eval()
                with torch.no_grad():  # as diffusers' pipelines (inference_mode would differ from real use)
                    for _ in range(warmup):  # one step of the same work, encoders and VAE included
                        _infer_once(setup, res, 1, seed, lambda: None)
                    utils.synchronize()
                    utils.reset_peak_memory()
                    timer = utils.timer()
                    timer.start()
                    _infer_once(setup, res, steps, seed, tick)
                    elapsed = timer.stop()
                r.s_per_img = elapsed  # batch 1: one image
            else:
                params, opt = _prepare_training(setup, train_kind)
                r.trainable_params = sum(p.numel() for p in params)
                for i in range(warmup):
                    _train_step(setup, opt, res, seed + 100 + i)
                utils.synchronize()
                utils.reset_peak_memory()
                timer = utils.timer()
                timer.start()
                for i in range(steps):
                    _train_step(setup, opt, res, seed + i)
                    tick()
                elapsed = timer.stop()
                r.s_per_img = elapsed / steps  # one image per optimizer step (batch 1)
            utils.synchronize()
            r.peak_mem_gb = utils.peak_memory_bytes() / 1e9
    except Exception as exc:
        r.s_per_img = r.peak_mem_gb = None
        if is_oom(exc):
            r.status, r.message = "OOM", oom_message(exc)
        else:
            r.status, r.message = "error", f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    finally:
        if mode != "infer":
            setup.transformer.zero_grad(set_to_none=True)
            setup.transformer.disable_gradient_checkpointing()
            setup.transformer.eval()
        del opt
        _free(backend)
    return r


def run_benchmark(presets=("tiny",), modes=("infer",), train_kinds=("lora",), resolutions=(512,), backend=None,
                  variants=("patched",), dtype="bf16", steps=None, train_steps=None, warmup=1, full_pipeline=False,
                  text_len=None, seed=0, limit_gb=None, repeats=1, progress=False) -> List[BenchResult]:
    """Run every configuration; returns one BenchResult each (OOM / error rows included).
    With `repeats` > 1 each configuration is measured that many times, variants interleaved, and
    the median time (with the largest peak memory) is reported."""
    b = get_backend(backend)
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dt not in b.dtypes:
        raise ValueError(f"backend {b.name} does not compute in {dtype}; pick one of "
                         f"{', '.join(k for k, v in DTYPES.items() if v in b.dtypes)}")
    for p in presets:
        if p not in PRESETS:
            raise ValueError(f"unknown preset {p!r}; benchmark presets: {', '.join(PRESETS)}")
    for res in resolutions:
        if res <= 0 or res % 16:
            raise ValueError(f"resolution {res} must be a positive multiple of 16 (VAE 8x, 2x2 packing)")
    steps = 50 if steps is None else steps
    train_steps = 3 if train_steps is None else train_steps
    if steps < 1 or train_steps < 1:
        raise ValueError("--steps and --train-steps must be at least 1")
    jobs = []
    for p in presets:
        for mode in modes:
            for kind in (train_kinds if mode == "train" else (None,)):
                for res in resolutions:
                    for v in variants:
                        jobs.append((p, mode, kind, res, v))
    if repeats < 1:
        raise ValueError("--repeats must be at least 1")
    total = repeats * sum(steps if m == "infer" else train_steps for _, m, _, _, _ in jobs)
    bar = _bar(total, progress)
    results = []
    device = b.device()
    try:
        for p in presets:
            setup = _build(p, dt, device, text_len, full_pipeline and "infer" in modes, seed, b, limit_gb)
            if isinstance(setup, BenchResult):  # the model itself did not fit
                for (pp, mode, kind, res, v) in jobs:
                    if pp == p:
                        row = BenchResult(**{**asdict(setup), "mode": mode if mode == "infer" else f"train-{kind}",
                                             "res": res, "variant": v})
                        results.append(row)
                continue
            groups = {}
            for (pp, mode, kind, res, v) in jobs:
                if pp == p:
                    groups.setdefault((mode, kind, res), []).append(v)
            for (mode, kind, res), vs in groups.items():
                n = steps if mode == "infer" else train_steps
                runs = {v: [] for v in vs}
                # variants interleaved round by round, so that load from elsewhere on the machine
                # hits both alike; the median round is reported
                for rep in range(repeats):
                    for v in vs:
                        if bar is not None:
                            bar.set_description(f"{p} {mode}{'-' + kind if kind else ''} {res}px {v}")
                        if runs[v] and runs[v][-1].status != "ok":
                            continue  # an OOM does not get better by repeating it
                        runs[v].append(run_config(setup, b, mode, kind, res, v, n, warmup=warmup if rep == 0 else 0,
                                                  seed=seed, limit_gb=limit_gb, bar=bar))
                results.extend(_median(runs[v]) for v in vs)
            del setup
            _free(b)
    finally:
        if bar is not None:
            bar.close()
    return results


def _median(runs: List[BenchResult]) -> BenchResult:
    ok = [r for r in runs if r.status == "ok"]
    if not ok or len(ok) != len(runs):
        return next(r for r in runs if r.status != "ok") if len(ok) != len(runs) else runs[0]
    ok.sort(key=lambda r: r.s_per_img)
    best = ok[(len(ok) - 1) // 2]
    best.peak_mem_gb = max(r.peak_mem_gb for r in ok)
    best.repeats = len(ok)
    best.s_per_img_all = [r.s_per_img for r in runs]
    return best


def _build(preset, dt, device, text_len, full, seed, b, limit_gb):
    from ..models import preset_config
    from . import pipeline

    try:  # the limit applies to running configurations, not to building (imports map libraries)
        transformer = pipeline.build_transformer(preset, dt, device, seed).eval()
        cfg = preset_config(preset)
        parts = pipeline.build_text_and_vae(cfg, dt, device, seed) if full else None
    except Exception as exc:
        if not is_oom(exc):
            raise
        _free(b)
        return BenchResult(model=preset, mode="", res=0, backend=b.name, device=b.utils.device_name(), variant="",
                           dtype=str(dt).replace("torch.", ""), steps=0, status="OOM",
                           message=f"building the model: {oom_message(exc)}")
    return _Setup(preset, cfg, transformer, dt, device, text_len or DEFAULT_TEXT_LEN[preset], parts)


def _bar(total, show):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", file=sys.stderr)


# -- reporting --------------------------------------------------------------------------------


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def table(results: List[BenchResult]) -> str:
    rows = []
    for r in results:
        rows.append([r.model, r.mode, f"{r.res}", r.backend, r.variant,
                     _fmt(r.s_per_img, ".3f") if r.status == "ok" else r.status,
                     _fmt(r.peak_mem_gb, ".2f") if r.status == "ok" else r.status,
                     r.dtype, r.status if r.status == "ok" else f"{r.status}: {r.message}"[:60]])
    return format_table(["model", "mode", "res", "backend", "variant", "s/img", "peak mem GB", "dtype", "status"], rows)


def ratios(results: List[BenchResult]) -> List[dict]:
    """stock / patched time and memory for each configuration measured both ways."""
    out = []
    by = {}
    for r in results:
        by.setdefault((r.model, r.mode, r.res, r.backend), {})[r.variant] = r
    for key, pair in by.items():
        s, p = pair.get("stock"), pair.get("patched")
        if s and p and s.status == p.status == "ok" and p.s_per_img:
            out.append({"model": key[0], "mode": key[1], "res": key[2], "backend": key[3],
                        "speedup": s.s_per_img / p.s_per_img,
                        "memory_ratio": (p.peak_mem_gb / s.peak_mem_gb) if s.peak_mem_gb else None})
    return out


def ratio_table(rs: List[dict]) -> str:
    rows = [[r["model"], r["mode"], r["res"], r["backend"], f"{r['speedup']:.3f}x",
             "" if r["memory_ratio"] is None else f"{r['memory_ratio']:.3f}"] for r in rs]
    return format_table(["model", "mode", "res", "backend", "stock/patched time", "patched/stock memory"], rows)


def to_json(results: List[BenchResult], args: Optional[dict] = None) -> dict:
    b = results[0].backend if results else None
    return {
        "meta": {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "backend": b,
                 "device": results[0].device if results else None, "versions": versions(),
                 "torch_threads": torch.get_num_threads(), "args": args or {},
                 "units": {"s_per_img": "seconds per image", "peak_mem_gb": "1e9 bytes"}},
        "results": [asdict(r) for r in results],
        "ratios": ratios(results),
    }


def plot(results: List[BenchResult], path: str) -> None:
    """Grouped bars: seconds per image and peak memory per configuration, one bar per variant;
    OOM / error configurations are marked, not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = []
    for r in results:
        lab = f"{r.model}\n{r.mode}\n{r.res}px"
        if lab not in labels:
            labels.append(lab)
    variants = sorted({r.variant for r in results}, reverse=True)
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.8 * len(labels) + 3), 4.2))
    width = 0.8 / max(1, len(variants))
    for ax, attr, title in ((axes[0], "s_per_img", "seconds per image"), (axes[1], "peak_mem_gb", "peak memory (GB)")):
        for j, v in enumerate(variants):
            xs, ys = [], []
            for i, lab in enumerate(labels):
                r = next((r for r in results if r.variant == v and f"{r.model}\n{r.mode}\n{r.res}px" == lab), None)
                if r is None:
                    continue
                x = i + (j - (len(variants) - 1) / 2) * width
                if r.status == "ok":
                    xs.append(x)
                    ys.append(getattr(r, attr))
                else:
                    ax.text(x, 0, r.status, ha="center", va="bottom", rotation=90, fontsize=8, color="red")
            ax.bar(xs, ys, width, label=v)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    dev = results[0].device if results else ""
    fig.suptitle(f"flux-npu bench model: {results[0].backend if results else ''} ({dev})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--preset", nargs="+", default=["tiny"], choices=PRESETS, help="model preset(s) (default: tiny)")
    p.add_argument("--mode", nargs="+", default=["infer"], choices=MODES + ("both",), help="infer, train or both")
    p.add_argument("--train", nargs="+", default=["lora"], choices=("lora", "full"),
                   help="training kind(s): LoRA r=16 on the attention projections, or full finetune (default: lora)")
    p.add_argument("--res", nargs="+", type=int, default=[512], help="square resolution(s) in pixels (default: 512)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps per image in infer mode (default: 50)")
    p.add_argument("--train-steps", type=int, default=3, help="timed optimizer steps in train mode (default: 3)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure each configuration N times (variants interleaved) and report the median (default: 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up iterations per configuration (default: 1)")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES), help="model dtype (default: bf16)")
    p.add_argument("--backend", help="backend (default: FLUX_NPU_BACKEND, then auto-detect)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compare", action="store_true", help="run stock and patched side by side in one process")
    g.add_argument("--stock", action="store_true", help="stock diffusers only (default: patched only)")
    p.add_argument("--full-pipeline", action="store_true",
                   help="infer: include random-init T5 + CLIP text encoders and the VAE decoder in the timing")
    p.add_argument("--text-len", type=int, help="T5 tokens (default: 512 for Flux presets, 16 for tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-limit-gb", type=float,
                   help="cap memory per configuration (GPU/NPU allocator fraction; CPU: address space above the "
                        "current size); configurations beyond it are reported as OOM")
    p.add_argument("-o", "--output", help="write results as JSON to this file")
    p.add_argument("--plot", help="draw a PNG bar chart to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    modes = ("infer", "train") if "both" in args.mode else tuple(dict.fromkeys(args.mode))
    variants = ("stock", "patched") if args.compare else (("stock",) if args.stock else ("patched",))
    t0 = time.perf_counter()
    results = run_benchmark(
        presets=tuple(dict.fromkeys(args.preset)), modes=modes, train_kinds=tuple(dict.fromkeys(args.train)),
        resolutions=tuple(dict.fromkeys(args.res)), backend=args.backend, variants=variants, dtype=args.dtype,
        steps=args.steps, train_steps=args.train_steps, warmup=args.warmup, full_pipeline=args.full_pipeline,
        text_len=args.text_len, seed=args.seed, limit_gb=args.memory_limit_gb, repeats=args.repeats,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    print(table(results))
    rs = ratios(results)
    if rs:
        print()
        print(ratio_table(rs))
    r0 = results[0] if results else None
    if r0:
        print(f"\nbackend {r0.backend} on {r0.device}; memory: {r0.memory_kind}; "
              f"{torch.get_num_threads()} torch threads; total {time.perf_counter() - t0:.1f} s")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(to_json(results, {k: v for k, v in vars(args).items() if k != "func"}), f, indent=2)
    if args.plot:
        plot(results, args.plot)
    errors = [r for r in results if r.status == "error"]
    if errors:
        for r in errors:
            print(f"flux-npu bench model: {r.model} {r.mode} {r.res}px {r.variant}: {r.message}", file=sys.stderr)
        return 1
    return 0
