"""The GPU check that fits nine minutes: every figure issue 20 asks of a GPU, most important first.

    python bench/gpu_quick.py OUT_DIR [--budget 540] [--device cuda] [--tiny] [--only PHASES]

Phases, in order of importance (names for --only / --skip):

  env      device, versions, SDPA routing
  kernels  each memory-bound Triton kernel, forward and backward, at Flux-dev shapes (4096+512
           tokens, 24 heads x 128, width 3072, bf16): device time per call (CUDA graph replay of
           many calls; a loop of calls between two syncs where capture fails) against a copy of
           the same bytes timed the same way; each forward checked against float64 at those shapes
  host     host cost of one eager op call on tiny tensors, patched op against the stock code
  model    Flux-mini (5+10 blocks, width 3072), stock vs patched eager (same weights and the same
           rank-16 LoRA adapters: the patched model is a copy of the stock one), inference (adapters
           disabled) and a LoRA step's forward+backward (adapter gradients), 1024+512 and 4096+512
           tokens, repeats interleaved (stock/patched order alternating), both under the SDPA
           routing the patched attention uses
  compile  torch.compile of stock vs patched (the one-double-one-single-block "block" preset at
           4096+512 tokens): first-call time, graphs and recompiles over a short denoising loop
           (new timestep and latents each step), steady time per step
  lora     a LoRA training step on the patched Flux-mini with the default attention routing on the
           running torch (cuDNN SDPA's backward is broken on H100 with torch >= 2.11, pytorch issue
           196678): finite loss, which SDPA backend ran
  parity   the shipped CPU golden checked on cuda, and a CUDA golden recorded (OUT_DIR/parity_cuda.safetensors)

Every phase runs in a child process of its own, killed (its whole process group) when
it outlives its share of the budget: a kernel that faults (an illegal memory access poisons the
CUDA context for good), a hung compile or a crash becomes a row, and the next phase starts on a
fresh CUDA context. Every measurement is a JSON line appended to OUT_DIR/rows.jsonl and flushed as
soon as it is taken, so a kill loses nothing already measured; the children's stderr goes to
OUT_DIR/log.txt. Before each phase (and each model configuration) the remaining budget is compared
with what it needs on an H100 (ESTIMATE below); what no longer fits is skipped with a row saying
so, and a phase that runs past its cap (CAP below, or what is left of the budget) is stopped with
a "timeout" row. OUT_DIR/summary.md is written at the end.
`--tiny --device cpu` runs every phase end to end at tiny shapes (tests/test_bench_gpu_quick.py;
Triton under its interpreter). The full grid stays in bench/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PHASES = ("env", "kernels", "host", "model", "compile", "lora", "parity")
# seconds each phase needs on an H100 (the budget check); --tiny scales them down
# (the smallest useful part of each phase: the model phase checks each configuration again)
ESTIMATE = {"env": 5, "kernels": 15, "host": 10, "model": 60, "compile": 150, "lora": 45, "parity": 60}
# the most seconds a phase's child may run before it is stopped (a guess that outran its estimate
# must not eat the phases after it); the sum is over the budget on purpose: earlier phases come first
CAP = {"env": 30, "kernels": 120, "host": 45, "model": 240, "compile": 180, "lora": 90, "parity": 150}
TINY_ESTIMATE = {"env": 2, "kernels": 20, "host": 5, "model": 20, "compile": 30, "lora": 10, "parity": 60}
MODEL_CONFIG_ESTIMATE = {512: 50, 1024: 100}  # seconds per resolution: 1024+512 and 4096+512 tokens


class Out:
    """rows.jsonl appended and flushed per row; the clock and the budget."""

    def __init__(self, path: str, budget: float, tiny: bool, start: float | None = None):
        os.makedirs(path, exist_ok=True)
        self.dir = path
        # kept open for the whole run: rows are appended and flushed one by one (the parent writes
        # only while no child runs, so lines never interleave)
        self.file = open(os.path.join(path, "rows.jsonl"), "a", buffering=1)  # noqa: SIM115
        self.start = time.time() if start is None else start  # the run's start: the `t` column
        self.deadline = time.monotonic() + budget  # this process's own share
        self.budget = budget
        self.tiny = tiny

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, phase: str, **fields):
        r = {"phase": phase, "t": round(time.time() - self.start, 2), **fields}
        self.file.write(json.dumps(r, default=str) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        print(json.dumps(r, default=str), flush=True)
        return r

    def fits(self, phase: str, what: str, need: float) -> bool:
        if self.tiny:
            need = min(need, TINY_ESTIMATE.get(phase, need))
        if need <= self.left():
            return True
        self.row(phase, status="skipped", what=what,
                 note=f"needs ~{need:.0f} s on an H100, {max(self.left(), 0):.0f} s of the budget left")
        return False


# -- timing -------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_time(fn, device, calls: int, repeats: int):
    """(median seconds per call, min, max, method): CUDA graph replay of `calls` calls on cuda
    (a loop of calls between two syncs where capture fails, and always on CPU)."""
    for _ in range(2):
        fn()
    sync(device)
    if device.type == "cuda":
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
            graph.replay()
            ts = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graph.replay()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3 / calls)
            return statistics.median(ts), min(ts), max(ts), f"CUDA graph replay of {calls} calls"
        except Exception as exc:  # capture not possible for this call: time a loop instead
            method_note = f" (graph capture failed: {type(exc).__name__})"
            sync(device)
    else:
        method_note = ""
    ts = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        ts.append((time.perf_counter() - t) / calls)
    return statistics.median(ts), min(ts), max(ts), f"loop of {calls} calls between two syncs" + method_note


def significance(stock, patched) -> dict:
    """Whether stock and patched times differ, by the project's one test (benchmark/stats.py:
    Mann-Whitney U): the p value and the verdict, so that a ratio whose spread cannot tell the two
    apart is not read as faster or slower."""
    from flux_npu.benchmark.stats import compare

    v = compare(stock, patched)
    return {"p": v.p_value, "significant": v.significant, "significance_note": v.note}


def _verdict(r) -> str:
    return "" if r.get("significant") else f" (not significant: {r.get('significance_note', '')})"


def wall(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# -- phases -------------------------------------------------------------------------------------

def phase_env(out: Out, device, backend):
    from flux_npu.backends.cuda import sdpa_routing_line
    from flux_npu.utils.versions import versions

    info = {"platform": platform.platform(), "versions": versions(), "device": str(device),
            "sdpa_routing_training": sdpa_routing_line(True, backend)}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["capability"] = torch.cuda.get_device_capability(device)
        info["cudnn"] = torch.backends.cudnn.version()
    out.row("env", **info)


def kernel_cases(device, tiny: bool):
    """(name, forward args, backward call, forward bytes, backward bytes) at Flux-dev shapes, bf16.
    Forward: the public op on those args (what a patched model calls). Backward: the kernel's
    backward launcher with its small partial-sum reduction (what autograd runs; called directly so
    that the calls can be captured in a CUDA graph: autograd's engine runs outside the capturing
    stream)."""
    from flux_npu.kernels.cuda import adaln_residual as AR
    from flux_npu.kernels.cuda import apply_rope as ROPE
    from flux_npu.kernels.cuda import layer_norm_modulate as LN
    from flux_npu.kernels.cuda import qk_norm_rope as QK
    from flux_npu.kernels.cuda import rms_norm as RMS

    S, H, D, W = (24, 2, 32, 64) if tiny else (4096 + 512, 24, 128, 3072)
    bf = torch.bfloat16
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=bf):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    n_head = S * H * D * 2  # bytes of one bf16 (1, S, H, D) tensor
    n_row = S * W * 2  # bytes of one bf16 (1, S, W) tensor
    cos, sin = r(S, D, dtype=torch.float32), r(S, D, dtype=torch.float32)
    cs_bytes = 2 * S * D * 4
    x, w, dy = r(1, S, H, D), r(D), r(1, S, H, D)
    q, k, wq, wk, dk = r(1, S, H, D), r(1, S, H, D), r(D), r(D), r(1, S, H, D)
    h, sh, sc, dh = r(1, S, W), r(1, W), r(1, W), r(1, S, W)
    y, gate, dn = r(1, S, W), r(1, W), r(1, S, W)
    return [
        ("rms_norm", (x, w, 1e-6), lambda: RMS._bwd(x, w, dy, 1e-6), 2 * n_head, 3 * n_head),
        ("apply_rope", (x, (cos, sin), 1), lambda: ROPE._bwd(dy, cos, sin, 1), 2 * n_head + cs_bytes,
         2 * n_head + cs_bytes),
        ("qk_norm_rope", (q, k, wq, wk, (cos, sin), 1e-6, 1),
         lambda: QK._bwd(q, k, wq, wk, cos, sin, dy, dk, 1e-6, 1), 4 * n_head + cs_bytes, 6 * n_head + cs_bytes),
        ("layer_norm_modulate", (h, sh[:, None], sc[:, None], 1e-6), lambda: LN._bwd(h, sh, sc, dh, 1e-6),
         2 * n_row, 3 * n_row),
        ("adaln_residual", (h, gate[:, None], y, sh[:, None], sc[:, None], 1e-6),
         lambda: AR._bwd(h, y, gate, sh, sc, dh, dn, 1e-6), 4 * n_row, 6 * n_row),
    ]


def _flat(v):
    return [t for x in v for t in _flat(x)] if isinstance(v, (tuple, list)) else [v]


def _float64(v):
    if isinstance(v, (tuple, list)):
        return type(v)(_float64(x) for x in v)
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def forward_error(name, args, got) -> float:
    """Largest relative error of the kernel's forward outputs against the op's plain-torch
    reference in float64 on the same inputs (the catalogue's oracle), at the timed shapes."""
    from flux_npu.ops import catalogue

    ref = catalogue.info(name).ref(*_float64(args))
    return max(rel_err(a, b) for a, b in zip(_flat(got), _flat(ref), strict=True))


def phase_kernels(out: Out, device, backend, tiny: bool):
    from flux_npu import ops

    calls, repeats = (1, 2) if tiny else (20, 7)
    with ops.use_backend(backend), torch.no_grad():
        for name, args, bwd, fwd_bytes, bwd_bytes in kernel_cases(device, tiny):
            if not out.fits("kernels", name, 4):
                return
            fwd = functools.partial(getattr(ops, name), *args)
            ops.reset_dispatch_stats()
            err = forward_error(name, args, fwd())
            served = sorted({key[2] for key, n in ops.dispatch_stats()["served"].items() if n})
            for direction, fn, nbytes in (("forward", fwd, fwd_bytes), ("backward", bwd, bwd_bytes)):
                secs, lo, hi, how = device_time(fn, device, calls, repeats)
                src = torch.empty(max(nbytes // 8, 1), dtype=torch.float32, device=device)
                dst = torch.empty_like(src)  # a copy reads and writes nbytes/2 each: the same bytes moved
                tc, _, _, _ = device_time(lambda: dst.copy_(src), device, calls, repeats)  # noqa: B023
                # bf16 outputs: the brief's bf16 tolerance; NaN fails (a comparison with NaN is False)
                extra = {"rel_err_vs_float64": err, "correct": err <= 1e-2} if direction == "forward" else {}
                out.row("kernels", op=name, direction=direction, us=secs * 1e6, us_min=lo * 1e6, us_max=hi * 1e6,
                        bytes=nbytes, gbps=nbytes / secs / 1e9, copy_us=tc * 1e6, copy_fraction=tc / secs,
                        method=how, served=served, **extra)


def host_cases(device):
    from diffusers.models.embeddings import apply_rotary_emb

    from flux_npu import ops

    B, S, H, D = 1, 24, 2, 16
    W = H * D
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    q, k = r(B, S, H, D), r(B, S, H, D)
    norm_q, norm_k = torch.nn.RMSNorm(D, eps=1e-6).to(device), torch.nn.RMSNorm(D, eps=1e-6).to(device)
    cs = (r(S, D), r(S, D))
    x, shift, scale, gate, y = r(B, S, W), r(B, 1, W), r(B, 1, W), r(B, 1, W), r(B, S, W)
    ln = torch.nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)

    def stock_adaln():
        hh = x + gate * y
        return hh, ln(hh) * (1 + scale) + shift

    return {
        "rms_norm": (lambda: norm_q(q), lambda: ops.rms_norm(q, norm_q.weight, 1e-6)),
        "apply_rope": (lambda: apply_rotary_emb(q, cs, sequence_dim=1), lambda: ops.apply_rope(q, cs, 1)),
        "qk_norm_rope": (
            lambda: (apply_rotary_emb(norm_q(q), cs, sequence_dim=1), apply_rotary_emb(norm_k(k), cs, sequence_dim=1)),
            lambda: ops.qk_norm_rope(q, k, norm_q.weight, norm_k.weight, cs, 1e-6, 1),
        ),
        "layer_norm_modulate": (lambda: ln(x) * (1 + scale) + shift,
                                lambda: ops.layer_norm_modulate(x, shift, scale, 1e-6)),
        "adaln_residual": (stock_adaln, lambda: ops.adaln_residual(x, gate, y, shift, scale, 1e-6)),
    }


def phase_host(out: Out, device, backend, tiny: bool):
    from flux_npu import ops

    rounds, calls = (2, 2) if tiny else (21, 200)
    with ops.use_backend(backend), torch.no_grad():
        for name, (stock, patched) in host_cases(device).items():
            if not out.fits("host", name, 3):
                return
            times = {"stock": [], "patched": []}
            for fn in (stock, patched):
                fn()
            for i in range(rounds):
                for variant in (("stock", "patched") if i % 2 == 0 else ("patched", "stock")):
                    fn = stock if variant == "stock" else patched
                    sync(device)
                    t = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    times[variant].append((time.perf_counter() - t) / calls)
            ratios = [p / s for s, p in zip(times["stock"], times["patched"], strict=True)]
            out.row("host", op=name, stock_us=statistics.median(times["stock"]) * 1e6,
                    patched_us=statistics.median(times["patched"]) * 1e6, patched_over_stock=statistics.median(ratios),
                    ratio_min=min(ratios), ratio_max=max(ratios), rounds=rounds, calls=calls,
                    **significance(times["stock"], times["patched"]),
                    note="per call, host-bound (tiny tensors; the GPU work is negligible)")


def build_model(preset: str, device, dtype):
    from diffusers import FluxTransformer2DModel

    from flux_npu import models

    cfg = models.preset_config(preset)
    torch.manual_seed(0)
    with torch.device(device), models.default_dtype(dtype):  # initialised on the device: seconds, not minutes
        model = FluxTransformer2DModel(**cfg)
    return model.eval(), cfg


def model_inputs(cfg, res, text_len, device, dtype, seed):
    from flux_npu import models

    return models.make_inputs(cfg, resolution=res, text_len=text_len, dtype=dtype, device=device, seed=seed)


def sdpa_context(device, backend, training: bool):
    """(context factory, reason): the SDPA backends the patched attention allows in this mode on
    this device, applied to the stock model too. Same routing for both, and stock training must
    not run cuDNN SDPA's backward where it is known broken (torch >= 2.11 on H100 crashed stock
    Flux training with an illegal memory access, which would end the phase)."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext, "cpu: no SDPA routing"
    from torch.nn.attention import sdpa_kernel

    from flux_npu.backends.cuda import route_for, sdpa_enums

    route = route_for(backend, torch.cuda.current_device(), training)
    if not route.backends:
        return contextlib.nullcontext, route.reason
    chosen = sdpa_enums(route.backends)
    return (lambda: sdpa_kernel(chosen, set_priority=True)), route.reason


def peak_gib(device, fn) -> float | None:
    """Peak memory allocated during one call of fn, GiB (cuda only)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def phase_model(out: Out, device, backend, tiny: bool):
    """Stock vs patched Flux-mini on the same weights and the same LoRA adapters (rank 16 on
    models.LORA_TARGETS, added before the copy): inference with the adapters disabled, and a LoRA
    training step's forward+backward (gradients of the adapters only, no optimiser: the optimiser
    step is the same for both)."""
    from peft import LoraConfig

    import flux_npu
    from flux_npu import models, ops

    dtype = torch.bfloat16
    preset, resolutions, text_len, repeats = ("tiny", (32,), 8, 2) if tiny else ("flux-mini", (512, 1024), 512, 5)
    if not out.fits("model", f"build {preset}", 20):
        return
    t = time.perf_counter()
    stock, cfg = build_model(preset, device, dtype)
    torch.manual_seed(1)
    stock.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                 target_modules=list(models.LORA_TARGETS)))
    patched = copy.deepcopy(stock)
    params = {id(m): models.trainable_params(m, "lora") for m in (stock, patched)}
    handle = flux_npu.patch(backend, model=patched)
    out.row("model", status="built", preset=preset, seconds=time.perf_counter() - t,
            params=sum(p.numel() for p in stock.parameters()), lora_params=sum(p.numel() for p in params[id(stock)]),
            patched=str(handle)[:400])
    for res in resolutions:
        if not out.fits("model", f"{preset} res {res}", MODEL_CONFIG_ESTIMATE.get(res, 60)):
            continue
        inp = model_inputs(cfg, res, text_len, device, dtype, seed=1)
        kw = inp.as_kwargs()
        tokens = f"{inp.hidden_states.shape[1]}+{text_len}"

        def infer(m, kw=kw):
            with torch.no_grad():
                return m(**kw).sample

        def train(m, kw=kw):
            o = m(**kw).sample
            return torch.autograd.grad(o.float().square().mean(), params[id(m)])

        for m in (stock, patched):
            m.disable_adapters()
        ops.reset_dispatch_stats()
        ref = infer(stock).float()
        stock_calls = sum(ops.dispatch_stats()["served"].values())  # 0: the stock model runs none of our ops
        err = rel_err(infer(patched).float(), ref)
        served = ops.dispatch_stats()["served"]
        out.row("model", status="checked", tokens=tokens, rel_err_patched_vs_stock_bf16=err, stock_op_calls=stock_calls,
                patched_op_calls={f"{k[0]}:{k[2]}": n for k, n in served.items() if n})
        for mode, fn in (("infer", infer), ("train", train)):
            for m in (stock, patched):
                m.disable_adapters() if mode == "infer" else m.enable_adapters()
            ctx, routing = sdpa_context(device, backend, mode == "train")
            times = {"stock": [], "patched": []}
            with ctx():
                # the first call of each is also the warm-up (Triton compiles, caches)
                peaks = {v: peak_gib(device, lambda m=m, fn=fn: fn(m))
                         for v, m in (("stock", stock), ("patched", patched))}
                for i in range(repeats):
                    for variant in (("stock", "patched") if i % 2 == 0 else ("patched", "stock")):
                        s = wall(lambda: fn(stock if variant == "stock" else patched), device)  # noqa: B023
                        times[variant].append(s)
                        out.row("model", tokens=tokens, mode=mode, variant=variant, repeat=i, seconds=s)
            ratios = [s / p for s, p in zip(times["stock"], times["patched"], strict=True)]
            out.row("model", summary=True, tokens=tokens, mode=mode, stock_s=statistics.median(times["stock"]),
                    patched_s=statistics.median(times["patched"]), speedup=statistics.median(ratios),
                    speedup_min=min(ratios), speedup_max=max(ratios), repeats=repeats, sdpa_routing=routing,
                    **significance(times["stock"], times["patched"]),
                    stock_peak_gib=peaks["stock"], patched_peak_gib=peaks["patched"],
                    note="LoRA step forward+backward (adapter gradients, no optimiser)" if mode == "train"
                    else "inference, adapters disabled")


def phase_compile(out: Out, device, backend, tiny: bool, compile_backend: str):
    import flux_npu

    dtype = torch.bfloat16
    preset, res, text_len, steps = ("tiny", 16, 8, 2) if tiny else ("block", 1024, 512, 4)
    if not out.fits("compile", preset, 150):
        return
    stock, cfg = build_model(preset, device, dtype)
    patched = copy.deepcopy(stock)
    handle = flux_npu.patch(backend, model=patched)
    try:
        for variant, model in (("stock", stock), ("patched", patched)):
            if not out.fits("compile", f"{preset} {variant}", 75):
                return
            graphs = []

            def counting(gm, example_inputs):
                graphs.append(len(gm.graph.nodes))  # noqa: B023
                if compile_backend == "inductor":
                    from torch._inductor.compile_fx import compile_fx

                    return compile_fx(gm, example_inputs)
                from torch._dynamo.backends.debugging import aot_eager

                return aot_eager(gm, example_inputs)

            torch._dynamo.reset()
            compiled = torch.compile(model, backend=counting)
            times = []
            with torch.no_grad():
                for step in range(steps):
                    kw = model_inputs(cfg, res, text_len, device, dtype, seed=10 + step).as_kwargs()
                    times.append(wall(lambda: compiled(**kw), device))  # noqa: B023
            out.row("compile", variant=variant, preset=preset, backend=compile_backend, first_call_s=times[0],
                    steady_s=statistics.median(times[1:]), steady_min_s=min(times[1:]), steady_max_s=max(times[1:]),
                    graphs=len(graphs), recompiles=max(len(graphs) - 1, 0), graph_nodes=graphs, steps=steps)
    finally:
        handle.undo()
        torch._dynamo.reset()


def phase_lora(out: Out, device, backend, tiny: bool):
    """A LoRA training step (AdamW) on the patched Flux-mini with the default attention routing:
    no crash, a finite loss, which SDPA backend ran. Its own model: each phase is its own process."""
    from peft import LoraConfig

    from flux_npu import ops
    from flux_npu.backends.cuda import sdpa_routing_line
    from flux_npu.kernels.cuda.attention import last_sdpa_choices

    if not out.fits("lora", "lora step", 45):
        return
    import flux_npu
    from flux_npu import models

    model, cfg = build_model("tiny" if tiny else "flux-mini", device, torch.bfloat16)
    flux_npu.patch(backend, model=model)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                 target_modules=list(models.LORA_TARGETS)))
    params = models.trainable_params(model, "lora")
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    res, text_len = (32, 8) if tiny else (512, 512)
    ops.reset_dispatch_stats()
    for step in range(1 if tiny else 2):
        inp = model_inputs(cfg, res, text_len, device, torch.bfloat16, seed=20 + step)
        target = torch.randn_like(inp.hidden_states)
        t = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(**inp.as_kwargs()).sample.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        loss = float(loss.detach())
        out.row("lora", step=step, loss=loss, finite=math.isfinite(loss),
                seconds=time.perf_counter() - t, lora_params=sum(p.numel() for p in params),
                sdpa_choices=last_sdpa_choices() if device.type == "cuda" else "n/a (cpu)",
                sdpa_routing=sdpa_routing_line(True, backend),
                served=sorted({f"{k[0]}:{k[2]}" for k, n in ops.dispatch_stats()["served"].items() if n}))


def phase_parity(out: Out, device, tiny: bool):
    backend = "cuda" if device.type == "cuda" else "cpu"
    golden = os.path.join(REPO, "tests", "golden", "parity_cpu.safetensors")
    one = ["--dtypes", "fp32", "--cases", "rms_norm"]  # the smoke run: one case
    shapes = ["tiny", *one] if tiny else ["tiny", "width"]
    only = ["--shapes", "tiny", *one] if tiny else []
    cmds = [
        ("check cpu golden", [sys.executable, "-m", "flux_npu", "parity", "check", golden, "--backend", backend,
                              *only, "-o", os.path.join(out.dir, f"parity-cpu-on-{backend}.json")]),
        ("record golden", [sys.executable, "-m", "flux_npu", "parity", "record", "--backend", backend, "--shapes",
                           *shapes, "-o", os.path.join(out.dir, f"parity_{backend}.safetensors")]),
    ]
    for what, cmd in cmds:
        if not out.fits("parity", what, 30):
            return
        t = time.perf_counter()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=max(out.left(), 1))
            rc, tail = res.returncode, (res.stdout + res.stderr)[-1500:]
        except subprocess.TimeoutExpired as exc:
            rc, tail = "timeout", str(exc)[-500:]
        out.row("parity", what=what, rc=rc, seconds=time.perf_counter() - t, command=" ".join(cmd[1:]), tail=tail)


# -- main ---------------------------------------------------------------------------------------

def ensure_diffusers():
    """Install diffusers and importlib_metadata from REPO/wheels when diffusers does not import
    (the GPU image has no network and no diffusers); a clear exit when the wheels are missing."""
    try:
        import diffusers  # noqa: F401

        return
    except ImportError:
        pass
    wheels = os.path.join(REPO, "wheels")
    if not os.path.isdir(wheels) or not any(f.startswith("diffusers-") for f in os.listdir(wheels)):
        sys.exit("gpu_quick.py: diffusers is not installed and there is no diffusers wheel in wheels/; on a machine "
                 "with network: pip download diffusers==0.42.1 importlib_metadata==8.7.0 tabulate --no-deps -d wheels")
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels]
    if subprocess.run([*pip, "diffusers", "importlib_metadata"]).returncode != 0:
        # a dependency without a wheel here (the image's transformers brings most of diffusers' own):
        # the two wheels alone, then let the import say what is still missing
        print("gpu_quick.py: installing diffusers from wheels/ with its dependencies failed; retrying --no-deps")
        subprocess.run([*pip, "--no-deps", "diffusers", "importlib_metadata"], check=True)
    import diffusers  # noqa: F401  (an ImportError here names the missing dependency)


def ensure_tabulate():
    """tabulate renders every text table (a core dependency since issue 19); the GPU image may lack
    it: installed from REPO/wheels like diffusers."""
    try:
        import tabulate  # noqa: F401
        return
    except ImportError:
        pass
    wheels = os.path.join(REPO, "wheels")
    if subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels,
                       "tabulate"]).returncode != 0:
        sys.exit("gpu_quick.py: tabulate is not installed and not in wheels/; on a machine with network: "
                 "pip download tabulate --no-deps -d wheels")


def summary(out: Out, rows: list) -> str:
    lines = [f"# bench/gpu_quick.py: {round(time.time() - out.start)} s of a {out.budget:.0f} s budget", ""]
    for r in rows:
        if r.get("status") in ("error", "timeout", "crashed"):
            lines.append(f"- {r['phase']}: {r['status'].upper()} {r.get('error')}")
        elif r.get("status") == "skipped":
            lines.append(f"- {r['phase']}: SKIPPED {r['what']} ({r['note']})")
        elif r["phase"] == "kernels" and "op" in r:
            err = (f", rel err {r['rel_err_vs_float64']:.1e}{'' if r['correct'] else ' WRONG'}"
                   if "rel_err_vs_float64" in r else "")
            lines.append(f"- kernel {r['op']} {r['direction']}: {r['us']:.1f} us, {r['gbps']:.0f} GB/s, "
                         f"{100 * r['copy_fraction']:.0f}% of copy ({r['method']}){err}")
        elif r["phase"] == "host" and "op" in r:
            lines.append(f"- host {r['op']}: patched/stock {r['patched_over_stock']:.2f} "
                         f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}){_verdict(r)}")
        elif r["phase"] == "model" and r.get("summary"):
            lines.append(f"- model {r['tokens']} {r['mode']}: stock/patched {r['speedup']:.2f}x "
                         f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}){_verdict(r)}")
        elif r["phase"] == "compile" and "variant" in r:
            lines.append(f"- compile {r['variant']}: first {r['first_call_s']:.1f} s, "
                         f"steady {r['steady_s'] * 1e3:.1f} ms, {r['graphs']} graph(s)")
        elif r["phase"] == "lora" and "step" in r:
            lines.append(f"- lora step {r['step']}: loss {r['loss']:.4g} finite={r['finite']} sdpa={r['sdpa_choices']}")
        elif r["phase"] == "parity" and "what" in r:
            lines.append(f"- parity {r['what']}: rc {r['rc']}")
    return "\n".join(lines) + "\n"


def run_phase(name: str, args, out: Out, cap: float) -> None:
    """Run one phase in a child process (its own session, so a kill takes its whole group) with
    `cap` seconds; what it measured is already in rows.jsonl; a timeout, a crash or a non-zero exit
    becomes a row here with the tail of its stderr (kept whole in log.txt)."""
    import signal

    log_path = os.path.join(out.dir, "log.txt")
    with open(log_path, "a") as log:
        log.write(f"\n== phase {name} (cap {cap:.0f} s) ==\n")
        log.flush()
        offset = log.tell()
        cmd = [sys.executable, os.path.abspath(__file__), out.dir, "--phase-child", name, "--budget", f"{cap:.1f}",
               "--start", repr(out.start), "--device", args.device, "--compile-backend", args.compile_backend,
               *(["--tiny"] if args.tiny else [])]
        t = time.monotonic()
        # its own process group (not its own session: whatever stops this script stops it too)
        child = subprocess.Popen(cmd, stdout=None, stderr=log, cwd=REPO, process_group=0)
        status = None
        stop = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):  # stopped from outside: take the phase's whole group along
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            signal.signal(signal.SIGTERM, stop)
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_term)
        try:
            rc = child.wait(timeout=cap + min(15.0, max(2.0, cap / 10)))  # the child checks its own budget
        except subprocess.TimeoutExpired:
            status = "timeout"
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
                try:
                    os.killpg(child.pid, sig)
                    rc = child.wait(timeout=wait)
                    break
                except ProcessLookupError:
                    rc = child.wait()
                    break
                except subprocess.TimeoutExpired:
                    continue
        except KeyboardInterrupt:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            raise
        finally:
            signal.signal(signal.SIGTERM, stop)
    if status is None and rc == 0:
        return
    with open(log_path, errors="replace") as f:
        f.seek(offset)
        tail = f.read()[-2000:]
    if status == "timeout":
        error = f"stopped after {time.monotonic() - t:.0f} s (cap {cap:.0f} s); rows taken before the stop are kept"
    else:
        status = "crashed"
        how = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
        error = f"the phase's process ended with {how} (a CUDA fault or a crash; the next phase starts afresh)"
    out.row(name, status=status, error=error, stderr_tail=tail)


def child_main(name: str, args) -> int:
    """One phase in this process: its rows are appended to rows.jsonl."""
    # the tests' stand-ins for a CUDA fault and a hung compile: GPU_QUICK_FAULT="env=crash,host=hang"
    fault = dict(f.split("=", 1) for f in os.environ.get("GPU_QUICK_FAULT", "").split(",") if "=" in f).get(name)
    if fault == "crash":
        os.abort()
    if fault == "hang":
        time.sleep(3600)
    out = Out(args.out, args.budget, args.tiny, start=args.start)
    device = torch.device(args.device)
    sys.path.insert(0, REPO)
    from flux_npu import ops
    from flux_npu.backends import cuda

    backend = cuda.BACKEND if device.type == "cuda" else cuda.BACKEND.with_device_type("cpu")
    ops.prepare(backend)
    runs = {
        "env": lambda: phase_env(out, device, backend),
        "kernels": lambda: phase_kernels(out, device, backend, args.tiny),
        "host": lambda: phase_host(out, device, backend, args.tiny),
        "model": lambda: phase_model(out, device, backend, args.tiny),
        "compile": lambda: phase_compile(out, device, backend, args.tiny, args.compile_backend),
        "lora": lambda: phase_lora(out, device, backend, args.tiny),
        "parity": lambda: phase_parity(out, device, args.tiny),
    }
    try:
        runs[name]()
    except Exception as exc:  # a phase that fails is a row; the next phase still runs
        import traceback

        out.row(name, status="error", error=f"{type(exc).__name__}: {exc}"[:500], tb=traceback.format_exc()[-2000:])
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="output directory (rows.jsonl, summary.md, parity files)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for everything (default 540: nine minutes)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: the CPU end-to-end check)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes everywhere (a smoke run; figures mean nothing)")
    p.add_argument("--only", default="", help=f"comma-separated phases ({','.join(PHASES)})")
    p.add_argument("--skip", default="", help="comma-separated phases to leave out")
    p.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager"))
    p.add_argument("--phase-child", choices=PHASES, help=argparse.SUPPRESS)  # internal: one phase in a child
    p.add_argument("--start", type=float, default=None, help=argparse.SUPPRESS)  # internal: the run's start
    p.add_argument("--phase-cap", type=float, default=None, help="seconds each phase may run (default: CAP per phase)")
    args = p.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    skip = [s for s in args.skip.split(",") if s]
    for s in only + skip:
        if s not in PHASES:
            p.error(f"unknown phase {s!r}; phases: {', '.join(PHASES)}")
    if args.phase_child:
        return child_main(args.phase_child, args)
    out = Out(args.out, args.budget, args.tiny)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_quick.py: no CUDA device visible to torch; for the CPU smoke run pass --device cpu --tiny")
    ensure_diffusers()  # once, here: the children import what this installed
    ensure_tabulate()
    with open(os.path.join(out.dir, "rows.jsonl")) as f:
        before = sum(1 for _ in f)  # rows of an earlier run into the same directory stay out of the summary
    for name in PHASES:
        if (only and name not in only) or name in skip:
            continue
        if not out.fits(name, "phase", ESTIMATE[name]):
            continue
        cap = args.phase_cap or (out.budget if args.tiny else CAP[name])
        run_phase(name, args, out, min(cap, out.left()))
    with open(os.path.join(out.dir, "rows.jsonl")) as f:
        rows = [json.loads(line) for line in list(f)[before:]]
    text = summary(out, rows)
    with open(os.path.join(out.dir, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
