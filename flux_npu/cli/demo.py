"""`flux-npu demo`: the main job on the embedded default.

1. the backend report (what is available, what was chosen and why);
2. a random-init tiny diffusers Flux, forward and backward, stock vs patched: output and gradient
   errors against the tolerance table, and which kernels served each op;
3. a short op benchmark, stock vs patched, on the same backend.
Exit code 1 if the patched model does not match the stock one.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..shapes import DTYPES as SHAPE_DTYPES

DTYPES = {k: v for k, v in SHAPE_DTYPES.items() if k in ("fp32", "bf16")}


def register(sub):
    p = sub.add_parser("demo", help="backend report, tiny-Flux patched-vs-stock check, short op benchmark")
    p.add_argument("--backend", help="backend name (default: FLUX_NPU_BACKEND, then auto-detect)")
    p.add_argument("--preset", default="tiny", help="Flux preset for the check (default: tiny)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model dtype (default: fp32)")
    p.add_argument("--res", type=int, default=256, help="image resolution in pixels (default: 256)")
    p.add_argument("--no-bench", action="store_true", help="skip the op benchmark")
    p.set_defaults(func=run)


def _grads(model, inputs):
    out = model(**inputs.as_kwargs()).sample
    loss = (out.float() ** 2).mean()
    loss.backward()
    grads = {"output": out.detach().clone(), "d hidden_states": inputs.hidden_states.grad.clone(),
             "d encoder_hidden_states": inputs.encoder_hidden_states.grad.clone()}
    params = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    inputs.hidden_states.grad = None
    inputs.encoder_hidden_states.grad = None
    return grads, params


def check_patched_model(backend, preset="tiny", dtype=torch.float32, res=256, out=None):
    """Stock vs patched tiny Flux forward+backward; returns True when every tensor is within tolerance."""
    from .. import models, ops, patch
    from ..testing import rel_err, tolerance
    from ..utils.table import format_table

    out = out or sys.stdout
    model = models.build_diffusers_flux(preset, dtype=dtype, device=backend.device())
    cfg = models.preset_config(preset)
    inputs = models.make_inputs(cfg, resolution=res, text_len=16, dtype=dtype, device=backend.device(),
                                requires_grad=True)
    stock, stock_params = _grads(model, inputs)
    ops.reset_dispatch_stats()
    with patch(backend) as handle:
        patched, patched_params = _grads(model, inputs)
    print(handle.report_table(), file=out)
    # bf16: both runs round differently from each other; allow the small factor the tests allow
    tol = tolerance(dtype, 1.0 if dtype == torch.float32 else 2.0)
    rows, ok = [], True
    for name, ref in stock.items():
        err = rel_err(patched[name], ref)
        good = err <= tol
        ok &= good
        rows.append((name, tuple(ref.shape), f"{err:.2e}", f"{tol:.0e}", "ok" if good else "FAIL"))
    worst_name, worst = max(((n, rel_err(patched_params[n], g)) for n, g in stock_params.items()), key=lambda t: t[1])
    ok &= worst <= tol and patched_params.keys() == stock_params.keys()
    rows.append((f"d parameters ({len(stock_params)} tensors, worst: {worst_name})", "", f"{worst:.2e}", f"{tol:.0e}",
                 "ok" if worst <= tol else "FAIL"))
    dtype_name = str(dtype).replace("torch.", "")
    print(f"\ntiny Flux ({preset}, {dtype_name}): patched vs stock, forward and backward", file=out)
    print(format_table(("tensor", "shape", "rel err", "tol", "result"), rows), file=out)
    from ..report import dispatch_tables

    print("\n" + dispatch_tables(), file=out)  # the same tables FLUX_NPU_REPORT=1 prints at exit
    return ok


def run(args) -> int:
    from .. import get_backend, report

    backend = get_backend(args.backend)
    data = report.collect(backend=backend.name)
    for b in data["backends"]:
        b.pop("routing", None)
    print(report.render(data))
    print()
    ok = check_patched_model(backend, args.preset, DTYPES[args.dtype], args.res)
    if not args.no_bench:
        print("\nop benchmark (stock vs patched, quick)")
        try:
            from ..benchmark import ops as ops_bench
        except ImportError as exc:
            print(f"op benchmark unavailable: {exc}")
        else:
            parser = argparse.ArgumentParser()
            ops_bench.add_arguments(parser)
            ops_bench.run(parser.parse_args(["--quick", "--backend", backend.name]))
    print("\nresult:", "patched model matches stock" if ok else "MISMATCH between patched and stock model")
    return 0 if ok else 1
