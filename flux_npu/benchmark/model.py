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
wall time of the timed work after `synchronize()`, divided by the images made. Each configuration
is measured `--repeats` times (default 5) with the variants interleaved round by round (so that
load from elsewhere hits both alike); the median is reported with the spread (interquartile range
and min/max), and a stock/patched ratio whose interquartile ranges overlap is flagged as not
significant. Peak memory: the device allocator's peak on GPU/NPU; on CPU the process's resident
set size, sampled every 10 ms by a thread (a lower bound, and it includes the Python runtime).

Nothing is lost: a configuration that runs out of memory is an OOM row and one that raises is an
error row (its traceback goes to the log file next to the JSON); rows are printed and the JSON is
rewritten atomically as each configuration finishes; with `--isolate` each configuration and
variant runs in its own process, so that a fault that kills a process (a CUDA illegal memory
access, a segfault) costs that row only. `--memory-limit-gb` imposes a limit (device allocator
fraction on GPU/NPU, address-space limit on CPU) so that a configuration beyond it fails the same
honest way; a limit too small to hold the model's weights is refused before anything runs.
`--compile` times `torch.compile` of the transformer (stock and patched alike).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

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
    s_per_img_q1: Optional[float] = None  # interquartile range over the repeats
    s_per_img_q3: Optional[float] = None
    s_per_img_min: Optional[float] = None
    s_per_img_max: Optional[float] = None
    compiled: bool = False
    message: str = ""
    log: str = ""  # the log file holding this row's traceback, if any
    traceback: str = field(default="", repr=False)  # goes to the log file, not the JSON


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
    compile: bool = False
    compiled: dict = field(default_factory=dict)  # variant -> torch.compile'd transformer
    active: Optional[torch.nn.Module] = None  # what _call runs: the transformer or its compiled twin

    def use(self, variant: str) -> None:
        if not self.compile:
            self.active = self.transformer
            return
        if variant not in self.compiled:  # one compiled wrapper per variant: patched code traces separately
            self.compiled[variant] = torch.compile(self.transformer)
        self.active = self.compiled[variant]


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
        v = _call(setup.active, x, inp, sigmas[i])
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
    pred = _call(setup.active, xt, inp, t)
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
        params=sum(p.numel() for n, p in setup.transformer.named_parameters() if "lora_" not in n),
        text_len=setup.text_len,
        full_pipeline=setup.parts is not None and mode == "infer",
        memory_kind="process RSS peak (sampled)" if backend.device_type == "cpu" else "allocator peak",
        compiled=setup.compile,
    )
    setup.use(variant)

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
            first = (str(exc).strip().splitlines() or [""])[0]
            r.status, r.message = "error", f"{type(exc).__name__}: {first[:300]}"
            r.traceback = traceback.format_exc()
    finally:
        if mode != "infer":
            setup.transformer.zero_grad(set_to_none=True)
            setup.transformer.disable_gradient_checkpointing()
            setup.transformer.eval()
        del opt
        _free(backend)
    return r


# -- one run ----------------------------------------------------------------------------------

# Below this an address-space cap leaves no room for the threads and libraries a run starts (a
# cap of 0.003 GB aborted in libgomp, 0.001 GB segfaulted): refused instead of crashing.
MIN_LIMIT_GB = 0.016


def check_memory_limit(presets, dt, limit_gb, backend: Backend, full_pipeline: bool) -> None:
    """Refuse, before anything runs, a memory limit no configuration could run under."""
    if limit_gb is None:
        return
    if not limit_gb > 0:
        raise ValueError(f"--memory-limit-gb {limit_gb} must be positive (leave it out for no limit)")
    if limit_gb < MIN_LIMIT_GB:
        raise ValueError(f"--memory-limit-gb {limit_gb} is too small to run anything: below {MIN_LIMIT_GB} GB the "
                         f"process cannot start its threads; use at least {MIN_LIMIT_GB}")
    if backend.device_type == "cpu":
        return  # on CPU the cap counts what a configuration allocates after the model is built
    from .pipeline import param_bytes

    for p in presets:
        need = param_bytes(p, dt, full_pipeline) / 1e9
        if limit_gb < need:
            raise ValueError(f"--memory-limit-gb {limit_gb} is smaller than the weights of preset {p} alone "
                             f"({need:.2f} GB in {str(dt).replace('torch.', '')}); the model could not be built "
                             f"under it: raise the limit to more than {need:.2f} or pick a smaller preset")


@dataclass(frozen=True)
class Job:
    """One configuration: the rows of its variants are measured together (interleaved)."""

    preset: str
    mode: str  # infer / train
    kind: Optional[str]  # lora / full for train
    res: int
    variants: tuple

    def label(self, variant=None) -> str:
        mode = self.mode if self.mode == "infer" else f"train-{self.kind}"
        return f"{self.preset} {mode} {self.res}px" + (f" {variant}" if variant else "")


def _row_template(job: Job, variant: str, b: Backend, dt, steps: int, compiled: bool) -> BenchResult:
    return BenchResult(model=job.preset, mode=job.mode if job.mode == "infer" else f"train-{job.kind}", res=job.res,
                       backend=b.name, device=b.utils.device_name(), variant=variant,
                       dtype=str(dt).replace("torch.", ""), steps=steps, compiled=compiled)


def _failed_rows(job: Job, b: Backend, dt, steps: int, compiled: bool, status: str, message: str, tb: str = "",
                 variants=None) -> List[BenchResult]:
    rows = []
    for v in variants or job.variants:
        r = _row_template(job, v, b, dt, steps, compiled)
        r.status, r.message, r.traceback = status, message, tb
        rows.append(r)
    return rows


def _build_setup(preset, dt, device, text_len, full, seed, b, compile_model):
    """The model of one preset, or an exception (OOM or anything else) for the caller to report."""
    from ..models import preset_config
    from . import pipeline

    # the limit applies to running configurations, not to building (imports map libraries)
    transformer = pipeline.build_transformer(preset, dt, device, seed).eval()
    cfg = preset_config(preset)
    parts = pipeline.build_text_and_vae(cfg, dt, device, seed) if full else None
    return _Setup(preset, cfg, transformer, dt, device, text_len or DEFAULT_TEXT_LEN[preset], parts,
                  compile=compile_model)


def _run_jobs_here(jobs: List[Job], b: Backend, dt, steps, train_steps, warmup, full_pipeline, text_len, seed,
                   limit_gb, repeats, compile_model, on_rows: Callable, bar=None) -> None:
    """Run `jobs` in this process, one preset's model at a time; every outcome reaches on_rows."""
    device = b.device()
    for preset in dict.fromkeys(j.preset for j in jobs):
        mine = [j for j in jobs if j.preset == preset]
        try:
            setup = _build_setup(preset, dt, device, text_len, full_pipeline and any(j.mode == "infer" for j in mine),
                                 seed, b, compile_model)
        except Exception as exc:
            status = "OOM" if is_oom(exc) else "error"
            msg = f"building the model: {oom_message(exc) if status == 'OOM' else f'{type(exc).__name__}: {exc}'}"
            tb = "" if status == "OOM" else traceback.format_exc()
            _free(b)
            for job in mine:
                n = steps if job.mode == "infer" else train_steps
                on_rows(_failed_rows(job, b, dt, n, compile_model, status, msg[:300], tb))
            continue
        for job in mine:
            n = steps if job.mode == "infer" else train_steps
            runs = {v: [] for v in job.variants}
            # variants interleaved round by round, so that load from elsewhere on the machine
            # hits both alike; the median round is reported with the spread
            for rep in range(repeats):
                for v in job.variants:
                    if bar is not None:
                        bar.set_description(job.label(v))
                    if runs[v] and runs[v][-1].status != "ok":
                        continue  # an OOM or an error does not get better by repeating it
                    runs[v].append(run_config(setup, b, job.mode, job.kind, job.res, v, n,
                                              warmup=warmup if rep == 0 else 0, seed=seed, limit_gb=limit_gb,
                                              bar=bar))
            on_rows([summarize(runs[v]) for v in job.variants])
        del setup
        _free(b)


def summarize(runs: List[BenchResult]) -> BenchResult:
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


# -- isolation: one process per configuration and variant ---------------------------------------

_ROW_TAG = "FLUX_NPU_BENCH_ROW "


def _child_main(spec_json: str) -> int:
    """Entry of an isolated configuration: run it here, print each row as one tagged JSON line."""
    spec = json.loads(spec_json)
    b = get_backend(spec["backend"])
    dt = DTYPES[spec["dtype"]]
    job = Job(spec["preset"], spec["mode"], spec["kind"], spec["res"], tuple(spec["variants"]))

    def emit(rows):
        for r in rows:
            print(_ROW_TAG + json.dumps(asdict(r)), flush=True)

    _run_jobs_here([job], b, dt, spec["steps"], spec["train_steps"], spec["warmup"], spec["full_pipeline"],
                   spec["text_len"], spec["seed"], spec["limit_gb"], spec["repeats"], spec["compile"], emit)
    return 0


def _signal_name(rc: int) -> str:
    import signal

    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with code {rc}"


def _run_job_isolated(job: Job, variant: str, spec: dict, b: Backend, dt, steps: int,
                      timeout_s: Optional[float] = None) -> List[BenchResult]:
    """One configuration and variant in a fresh interpreter; a process that dies without a row
    becomes a 'crashed' row carrying its exit status and the end of its output, one that outlives
    `timeout_s` a 'timeout' row (a hung device must not hang the whole run)."""
    child = dict(spec, preset=job.preset, mode=job.mode, kind=job.kind, res=job.res, variants=[variant])
    cmd = [sys.executable, "-m", "flux_npu.benchmark.model", "--child", json.dumps(child)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = exc.stderr or exc.stdout or ""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        tail = "\n".join(out.strip().splitlines()[-40:])
        return _failed_rows(job, b, dt, steps, spec["compile"], "timeout",
                            f"process killed after {timeout_s:g} s (--timeout-s)",
                            f"$ {' '.join(cmd[:4])} '<spec>'\n{tail}\n", variants=[variant])
    rows = [BenchResult(**json.loads(line[len(_ROW_TAG):])) for line in proc.stdout.splitlines()
            if line.startswith(_ROW_TAG)]
    if rows:
        return rows
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-40:])
    last = next((ln for ln in reversed(tail.splitlines()) if ln.strip()), "")
    return _failed_rows(job, b, dt, steps, spec["compile"], "crashed",
                        f"process {_signal_name(proc.returncode)}: {last[:200]}",
                        f"$ {' '.join(cmd[:4])} '<spec>'\n{tail}\n", variants=[variant])


# -- the runner -------------------------------------------------------------------------------


def run_benchmark(presets=("tiny",), modes=("infer",), train_kinds=("lora",), resolutions=(512,), backend=None,
                  variants=("patched",), dtype="bf16", steps=None, train_steps=None, warmup=1, full_pipeline=False,
                  text_len=None, seed=0, limit_gb=None, repeats=5, progress=False, isolate=False,
                  compile_model=False, on_row: Optional[Callable] = None,
                  timeout_s: Optional[float] = None) -> List[BenchResult]:
    """Run every configuration; returns one BenchResult per configuration and variant (OOM, error
    and crashed rows included), calling `on_row(row)` for each as soon as it is known.
    Each configuration is measured `repeats` times, variants interleaved; the median time is
    reported with its spread. `isolate`: each configuration and variant in its own process,
    killed after `timeout_s` seconds when given."""
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
    if repeats < 1:
        raise ValueError("--repeats must be at least 1")
    check_memory_limit(presets, dt, limit_gb, b, full_pipeline and "infer" in modes)
    jobs = [Job(p, mode, kind, res, tuple(variants)) for p in presets for mode in modes
            for kind in (train_kinds if mode == "train" else (None,)) for res in resolutions]
    results: List[BenchResult] = []

    def take(rows):
        for r in rows:
            results.append(r)
            if on_row is not None:
                on_row(r)

    if isolate:
        spec = dict(backend=b.name, dtype=next(k for k, v in DTYPES.items() if v == dt), steps=steps,
                    train_steps=train_steps,
                    warmup=warmup, full_pipeline=full_pipeline, text_len=text_len, seed=seed, limit_gb=limit_gb,
                    repeats=repeats, compile=compile_model)
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError("--timeout-s must be positive")
        for i, job in enumerate(jobs):
            n = steps if job.mode == "infer" else train_steps
            # variants alternate in order from one configuration to the next; within a process
            # there is one variant, so they cannot interleave round by round
            order = job.variants if i % 2 == 0 else tuple(reversed(job.variants))
            by_variant = {}
            for v in order:
                by_variant[v] = _run_job_isolated(job, v, spec, b, dt, n, timeout_s)
            take([r for v in job.variants for r in by_variant[v]])
        return results
    total = repeats * sum((steps if j.mode == "infer" else train_steps) * len(j.variants) for j in jobs)
    bar = _bar(total, progress)
    try:
        _run_jobs_here(jobs, b, dt, steps, train_steps, warmup, full_pipeline, text_len, seed, limit_gb, repeats,
                       compile_model, take, bar)
    finally:
        if bar is not None:
            bar.close()
    return results


def _bar(total, show):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", file=sys.stderr, leave=False)


# -- reporting --------------------------------------------------------------------------------


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


def table(results: List[BenchResult]) -> str:
    rows = []
    for r in results:
        ok = r.status == "ok"
        rows.append([r.model, r.mode, f"{r.res}", r.backend, _variant_label(r),
                     _fmt(r.s_per_img, ".3f") if ok else r.status, _spread(r), str(r.repeats) if ok else "",
                     _fmt(r.peak_mem_gb, ".2f") if ok else r.status,
                     r.dtype, r.status if ok else f"{r.status}: {r.message}"[:60]])
    return format_table(["model", "mode", "res", "backend", "variant", "s/img", "IQR s/img", "n", "peak mem GB",
                         "dtype", "status"], rows)


def ratios(results: List[BenchResult]) -> List[dict]:
    """stock / patched time and memory for each configuration measured both ways; `significant`
    is False when the two interquartile ranges overlap (or a side ran once): the ratio is then
    within the noise."""
    out = []
    by = {}
    for r in results:
        by.setdefault((r.model, r.mode, r.res, r.backend, r.compiled), {})[r.variant] = r
    for key, pair in by.items():
        s, p = pair.get("stock"), pair.get("patched")
        if not (s and p and s.status == p.status == "ok" and p.s_per_img):
            continue
        if s.repeats < 2 or p.repeats < 2:
            significant, why = False, "single run: no spread"
        elif s.s_per_img_q3 < p.s_per_img_q1 or p.s_per_img_q3 < s.s_per_img_q1:
            significant, why = True, ""
        else:
            significant, why = False, "IQRs overlap: within noise"
        out.append({"model": key[0], "mode": key[1], "res": key[2], "backend": key[3], "compiled": key[4],
                    "speedup": s.s_per_img / p.s_per_img,
                    "speedup_range": [s.s_per_img_q1 / p.s_per_img_q3, s.s_per_img_q3 / p.s_per_img_q1]
                    if s.s_per_img_q1 is not None and p.s_per_img_q1 is not None else None,
                    "significant": significant, "note": why,
                    "memory_ratio": (p.peak_mem_gb / s.peak_mem_gb) if s.peak_mem_gb else None})
    return out


def ratio_table(rs: List[dict]) -> str:
    rows = [[r["model"], r["mode"] + (" +compile" if r["compiled"] else ""), r["res"], r["backend"],
             f"{r['speedup']:.3f}x",
             "" if not r["speedup_range"] else f"{r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}x",
             "" if r["memory_ratio"] is None else f"{r['memory_ratio']:.3f}",
             "" if r["significant"] else f"not significant ({r['note']})"] for r in rs]
    return format_table(["model", "mode", "res", "backend", "stock/patched time", "range (IQR)",
                         "patched/stock memory", "flag"], rows)


def to_json(results: List[BenchResult], args: Optional[dict] = None, done: bool = True) -> dict:
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


def log_path_for(output: Optional[str]) -> str:
    """The traceback log next to the JSON (`bench.json` -> `bench.log`), else (no file output, or a
    device / FIFO / stdout) in the temp dir."""
    from ..utils.output import output_kind

    if output and output_kind(output) == "file":
        root, _ = os.path.splitext(output)
        return root + ".log"
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"flux-npu-bench-model-{os.getpid()}.log")


def plot(results: List[BenchResult], path: str, meta: Optional[dict] = None) -> None:
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


# -- command line -----------------------------------------------------------------------------


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
    done: List[BenchResult] = []

    def on_row(r: BenchResult):
        if r.traceback:
            with open(log_path, "a") as f:
                f.write(f"=== {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ} {r.model} {r.mode} {r.res}px "
                        f"{_variant_label(r)}: {r.status}\n{r.traceback}\n")
            r.log = log_path
        done.append(r)
        print(row_line(r), file=out, flush=True)
        if args.output and output_kind(args.output) == "file":  # a stream gets the final JSON only, once
            write_json_atomic(args.output, to_json(done, arg_record, done=False))

    results = run_benchmark(
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
        write_json_atomic(args.output, data)
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


def main(argv=None) -> int:
    """`python -m flux_npu.benchmark.model --child SPEC` runs one isolated configuration."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--child":
        return _child_main(argv[1])
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flux_npu.benchmark.model", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
