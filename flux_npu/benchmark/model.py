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
and min/max), and each stock/patched ratio carries the verdict of benchmark.stats (Mann-Whitney U
at 95 %: "not significant" when the repeats cannot tell the two apart). Peak memory: the device
allocator's peak on GPU/NPU; on CPU the process's resident-set high-water mark (VmHWM, reset by
the kernel per measurement: exact, and it includes the Python runtime).

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
import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..backends import Backend, get_backend
from ..models import LORA_TARGETS, trainable_params
from ..shapes import DTYPES, SHAPES

# The rows, their reporting and the memory helpers live in their own modules; they are names of
# this one too (callers and tests use `model.table`, `model.is_oom`, ...).
from .memory import (  # noqa: F401
    MIN_LIMIT_GB,
    _free,
    check_memory_limit,
    is_oom,
    memory_limit,
    oom_message,
)
from .results import (  # noqa: F401
    BenchResult,
    log_path_for,
    plot,
    ratio_table,
    ratios,
    require_matplotlib,
    row_line,
    summarize,
    table,
    to_json,
    write_json_atomic,
)

PRESETS = ("tiny", "flux-mini", "flux-dev")
MODES = ("infer", "train")
# T5 tokens: the shape table's for the Flux presets; 16 for tiny (the README's main job)
DEFAULT_TEXT_LEN = {"tiny": 16, "flux-mini": SHAPES["flux-mini"].txt, "flux-dev": SHAPES["flux-dev"].txt}


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
    active: torch.nn.Module | None = None  # what _call runs: the transformer or its compiled twin

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
    if kind == "lora" and not setup.lora_added:
        from peft import LoraConfig

        model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                     target_modules=list(LORA_TARGETS)))
        setup.lora_added = True
    params = trainable_params(model, kind)
    model.enable_gradient_checkpointing()
    model.train()
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
               warmup: int = 1, seed: int = 0, limit_gb: float | None = None, bar=None) -> BenchResult:
    """Measure one configuration; an out-of-memory becomes status OOM, never a crash."""
    utils = backend.utils
    r = BenchResult(
        model=setup.preset, mode=mode if mode == "infer" else f"train-{train_kind}", res=res, backend=backend.name,
        device=utils.device_name(), variant=variant, dtype=str(setup.dtype).replace("torch.", ""), steps=steps,
        params=sum(p.numel() for n, p in setup.transformer.named_parameters() if "lora_" not in n),
        text_len=setup.text_len,
        full_pipeline=setup.parts is not None and mode == "infer",
        memory_kind="process RSS high-water mark (VmHWM)" if backend.device_type == "cpu" else "allocator peak",
        compiled=setup.compile,
    )
    setup.use(variant)

    def tick():
        if bar is not None:
            bar.update(1)

    opt = None
    try:
        with memory_limit(backend, limit_gb), _variant_ctx(variant, backend):
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

@dataclass(frozen=True)
class Job:
    """One configuration: the rows of its variants are measured together (interleaved)."""

    preset: str
    mode: str  # infer / train
    kind: str | None  # lora / full for train
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
                 variants=None) -> list[BenchResult]:
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


def _run_jobs_here(jobs: list[Job], b: Backend, dt, steps, train_steps, warmup, full_pipeline, text_len, seed,
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
                      timeout_s: float | None = None) -> list[BenchResult]:
    """One configuration and variant in a fresh interpreter; a process that dies without a row
    becomes a 'crashed' row carrying its exit status and the end of its output, one that outlives
    `timeout_s` a 'timeout' row (a hung device must not hang the whole run). The process runs in a
    group of its own: stop signals are forwarded to it and a timeout kills all of it (isolate.py)."""
    from .isolate import run_child

    child = dict(spec, preset=job.preset, mode=job.mode, kind=job.kind, res=job.res, variants=[variant])
    cmd = [sys.executable, "-m", "flux_npu.benchmark.model", "--child", json.dumps(child)]
    returncode, stdout, stderr = run_child(cmd, timeout_s)
    if returncode is None:
        tail = "\n".join((stderr or stdout).strip().splitlines()[-40:])
        return _failed_rows(job, b, dt, steps, spec["compile"], "timeout",
                            f"process group killed after {timeout_s:g} s (--timeout-s)",
                            f"$ {' '.join(cmd[:4])} '<spec>'\n{tail}\n", variants=[variant])
    rows = [BenchResult(**json.loads(line[len(_ROW_TAG):])) for line in stdout.splitlines()
            if line.startswith(_ROW_TAG)]
    if rows:
        return rows
    tail = "\n".join((stderr or stdout).strip().splitlines()[-40:])
    last = next((ln for ln in reversed(tail.splitlines()) if ln.strip()), "")
    return _failed_rows(job, b, dt, steps, spec["compile"], "crashed",
                        f"process {_signal_name(returncode)}: {last[:200]}",
                        f"$ {' '.join(cmd[:4])} '<spec>'\n{tail}\n", variants=[variant])


# -- the runner -------------------------------------------------------------------------------


def run_benchmark(presets=("tiny",), modes=("infer",), train_kinds=("lora",), resolutions=(512,), backend=None,
                  variants=("patched",), dtype="bf16", steps=None, train_steps=None, warmup=1, full_pipeline=False,
                  text_len=None, seed=0, limit_gb=None, repeats=5, progress=False, isolate=False,
                  compile_model=False, on_row: Callable | None = None,
                  timeout_s: float | None = None) -> list[BenchResult]:
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
    results: list[BenchResult] = []

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
        from .isolate import check_timeout

        check_timeout(timeout_s)
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


def main(argv=None) -> int:
    """`python -m flux_npu.benchmark.model --child SPEC` runs one isolated configuration."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--child":
        return _child_main(argv[1])
    import argparse

    from ..cli.bench_model import add_arguments, run

    parser = argparse.ArgumentParser(prog="python -m flux_npu.benchmark.model", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
