"""Training-trajectory check: does a short fine-tune on this backend follow the reference's loss curve?

Op-level parity says each fused op is accurate; a porting team is also asked whether the *training*
follows the GPU's. This runs a short, deterministic fine-tune of a small Flux-width model (head
dim 128 and Flux's RoPE axes (16, 56, 56), two heads, one double and one single block) on synthetic
data, twice: LoRA (peft, r=4, on the attention projections) and full fine-tuning, N AdamW steps
with a flow-matching loss. Every step records the loss and the gradient norm. The shipped
reference (`flux_npu/data/trajectory/reference.json`) is the same run in float32 on the CPU with
stock diffusers (no flux-npu patch); a CUDA reference can be added by `--write` on a GPU.

The tolerance is measured, not guessed: the same bf16 run is repeated with its weights rounded
from float32 to bf16 stochastically (three seeds) instead of to nearest, which is the size of
difference two devices' roundings make, and its largest relative deviation from the float32
reference, per metric, over all steps and repeats, is the *spread*. A backend passes when its
bf16 (or float32) run stays within RULE x spread of the reference at every step (RULE = 2, as in
Ascend's accuracy rule), with a floor for float32 runs.

    python -m flux_npu.trajectory --write          # regenerate the shipped reference and spread
    flux-npu verify                                # runs the check as its 'trajectory' phase
"""

from __future__ import annotations

import json
import math
import os

import torch

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "trajectory", "reference.json")
MODES = ("lora", "full")
RULE = 2.0  # allowed deviation = RULE x the measured bf16 spread
FLOOR = 1e-4  # relative floor of a tolerance (float32 runs of another device: summation order)
SPREAD_SEEDS = (1, 2, 3)

# a small Flux-width transformer: real head dim and RoPE axes, few heads and blocks
CONFIG = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128,
              num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
              axes_dims_rope=(16, 56, 56))
RUN = dict(steps=8, batch=2, resolution=64, text_len=8, samples=4, seed=0, lora_rank=4, lr_lora=1e-3, lr_full=2e-4)


def _stochastic_round(model, dtype, seed: int):
    """Round every float32 parameter to `dtype` stochastically (seeded), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            lo = p.data.to(dtype)  # nearest
            lo32 = lo.float()
            # the neighbour on the other side of the float32 value, one ulp of `dtype` away
            step = torch.where(lo32 > p.data, -1.0, 1.0) * torch.finfo(dtype).eps * lo32.abs().clamp_min(1e-30)
            other = (lo32 + step).to(dtype).float()
            span = (other - lo32).abs()
            frac = torch.where(span > 0, (p.data - lo32).abs() / span.clamp_min(1e-30), torch.zeros_like(span))
            pick = torch.rand(p.shape, generator=g) < frac
            p.data = torch.where(pick, other, lo32)


def run(backend=None, mode: str = "lora", dtype=torch.float32, patched: bool = True, stochastic_seed=None,
        steps: int | None = None) -> dict[str, list[float]]:
    """One short fine-tune; returns {'loss': [...], 'grad_norm': [...]} per step (floats).

    backend: where it runs (device and, when `patched`, the kernels). stochastic_seed: round the
    float32-initialised weights to `dtype` stochastically with this seed (the spread runs)."""
    from . import models, patch
    from .ops import registry

    if mode not in MODES:
        raise ValueError(f"trajectory mode must be one of {MODES}, got {mode!r}")
    b = registry.resolve_backend(backend)
    device = b.device()
    steps = steps or RUN["steps"]
    model = models.build_diffusers_flux("tiny", dtype=torch.float32, device="cpu", seed=RUN["seed"], **CONFIG)
    if mode == "lora":
        from peft import LoraConfig

        torch.manual_seed(RUN["seed"] + 7)
        model.add_adapter(LoraConfig(r=RUN["lora_rank"], lora_alpha=RUN["lora_rank"], init_lora_weights="gaussian",
                                     target_modules=list(models.LORA_TARGETS)))
        # peft's B starts at zero: give it a small seeded value so the first steps already move the output
        g = torch.Generator().manual_seed(RUN["seed"] + 8)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.01 * torch.randn(p.shape, generator=g))
    if stochastic_seed is not None and dtype != torch.float32:
        _stochastic_round(model, dtype, stochastic_seed)
    model = model.to(device=device, dtype=dtype)
    params = models.trainable_params(model, mode)
    model.train()
    opt = torch.optim.AdamW(params, lr=RUN["lr_lora"] if mode == "lora" else RUN["lr_full"], weight_decay=0.0)
    data = [models.make_inputs(CONFIG, resolution=RUN["resolution"], text_len=RUN["text_len"], batch=RUN["batch"],
                               dtype=torch.float32, device="cpu", seed=100 + i) for i in range(RUN["samples"])]
    g = torch.Generator().manual_seed(RUN["seed"] + 1)
    losses, norms = [], []
    ctx = patch(backend=b, targets=["diffusers"]) if patched else _null()
    with ctx:
        for step in range(steps):
            inp = data[step % len(data)]
            x0 = inp.hidden_states
            noise = torch.randn(x0.shape, generator=g)
            t = torch.rand(x0.shape[0], generator=g)
            xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
            kw = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
                  for k, v in inp.as_kwargs().items()}
            kw.update(hidden_states=xt.to(device=device, dtype=dtype), timestep=t.to(device=device, dtype=dtype))
            kw["img_ids"], kw["txt_ids"] = inp.img_ids.to(device), inp.txt_ids.to(device)
            pred = model(**kw, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).to(device))
            loss.backward()
            norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in params if p.grad is not None))
            losses.append(float(loss.detach().cpu()))
            norms.append(float(norm.detach().cpu()))
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"loss": losses, "grad_norm": norms}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _rel_dev(got: list[float], ref: list[float]) -> list[float]:
    out = []
    for a, r in zip(got, ref, strict=True):
        if not (math.isfinite(a) and math.isfinite(r)):
            out.append(math.inf)
        else:
            out.append(abs(a - r) / max(abs(r), 1e-12))
    return out


def measure_reference(progress=print) -> dict:
    """The float32 CPU reference (stock diffusers) and the measured bf16 spread, per mode."""
    from .utils.versions import versions

    data = {"config": CONFIG, "run": RUN, "rule": RULE, "floor": FLOOR, "versions": versions(),
            "device": "cpu (float32, stock diffusers)", "modes": {}}
    for mode in MODES:
        ref = run("cpu", mode, torch.float32, patched=False)
        spreads = {"loss": [], "grad_norm": []}
        for s in SPREAD_SEEDS:
            r = run("cpu", mode, torch.bfloat16, patched=False, stochastic_seed=s)
            for k in spreads:
                spreads[k].append(max(_rel_dev(r[k], ref[k])))
        spread = {k: max(v) for k, v in spreads.items()}
        data["modes"][mode] = {"reference": ref, "spread_runs": spreads, "spread": spread,
                               "tolerance": {k: max(RULE * v, FLOOR) for k, v in spread.items()}}
        progress(f"{mode}: loss {ref['loss'][0]:.4f} -> {ref['loss'][-1]:.4f}; bf16 spread "
                 f"loss {spread['loss']:.2e}, grad norm {spread['grad_norm']:.2e}")
    data["how"] = (f"reference: {RUN['steps']} AdamW steps of stock diffusers in float32 on the CPU; spread: the "
                   f"same run in bf16 with the float32-initialised weights rounded stochastically (seeds "
                   f"{list(SPREAD_SEEDS)}) instead of to nearest, largest relative deviation from the reference "
                   f"over steps and seeds; tolerance = max({RULE:g} x spread, {FLOOR:g})")
    return data


def load_reference(path: str = REFERENCE) -> dict:
    with open(path) as f:
        return json.load(f)


def check(backend=None, dtype=None, reference: dict | None = None, modes=MODES) -> dict:
    """Run the trajectory on `backend` (patched; bf16 where the backend has it, else float32) and
    judge it against the shipped reference. Returns {'ok', 'dtype', 'modes': {mode: {...}}}."""
    from .ops import registry

    b = registry.resolve_backend(backend)
    ref = reference or load_reference()
    if dtype is None:
        dtype = torch.bfloat16 if torch.bfloat16 in b.dtypes else torch.float32
    out = {"backend": b.name, "dtype": str(dtype).replace("torch.", ""), "modes": {}, "how": ref.get("how")}
    ok = True
    for mode in modes:
        r = ref["modes"][mode]
        got = run(b, mode, dtype, patched=True)
        entry = {"reference": r["reference"], "got": got, "tolerance": r["tolerance"], "spread": r["spread"],
                 "deviation": {}, "worst": {}, "ok": True}
        for k in ("loss", "grad_norm"):
            dev = _rel_dev(got[k], r["reference"][k])
            entry["deviation"][k] = dev
            worst = max(range(len(dev)), key=lambda i: dev[i])
            entry["worst"][k] = {"step": worst, "deviation": dev[worst], "tolerance": r["tolerance"][k]}
            if not dev[worst] <= r["tolerance"][k]:
                entry["ok"] = False
        ok = ok and entry["ok"]
        out["modes"][mode] = entry
    out["ok"] = ok
    return out


def plot(result: dict, path: str, title: str = "") -> None:
    """Loss and gradient-norm curves, reference vs this backend, with the tolerance band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["modes"])
    fig, axes = plt.subplots(len(modes), 2, figsize=(10, 3.2 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        e = result["modes"][mode]
        for j, k in enumerate(("loss", "grad_norm")):
            ax = axes[i][j]
            ref, got, tol = e["reference"][k], e["got"][k], e["tolerance"][k]
            steps = list(range(len(ref)))
            ax.fill_between(steps, [v * (1 - tol) for v in ref], [v * (1 + tol) for v in ref], alpha=0.25,
                            label=f"reference +/- {tol:.1e}")
            ax.plot(steps, ref, "k-", lw=1, label="reference (cpu float32)")
            ax.plot(steps, got, "o--", ms=3, label=f"{result['backend']} {result['dtype']}")
            ax.set_title(f"{mode}: {k} ({'pass' if e['ok'] else 'FAIL'})", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle(title or f"training trajectory: {result['backend']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m flux_npu.trajectory", description=__doc__.split("\n")[0])
    p.add_argument("--write", action="store_true", help=f"measure and write the reference to {REFERENCE}")
    p.add_argument("-o", "--output", default=REFERENCE, help="where --write writes (default: the shipped file)")
    args = p.parse_args(argv)
    if not args.write:
        p.print_help()
        return 2
    from .utils.output import write_output

    data = measure_reference()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_output(args.output, json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
