"""Whole Flux models through `flux_npu.patch(backend=<npu>)` with the torch_npu CONTRACT EMULATOR
(CPU tensors; these are parity and plumbing results, never NPU hardware results).

Unchanged model code (diffusers FluxTransformer2DModel, the BFL-layout flux.model.Flux), forward
and backward, against the same model unpatched: float32 within the float32 tolerance; bfloat16
compared, like stock bfloat16, with a float32 run of the same weights. During the patched run
every hot op goes to its torch_npu fused op (npu_fusion_attention with BSND/BNSD, head_num, scale;
npu_rotary_mul interleave; npu_rms_norm), nothing falls back, and no float64 tensor appears
anywhere (the device has none)."""

import math

import pytest
import torch
from npu_emulator import record
from npu_emulator.guards import Float64Watch

import flux_npu
from flux_npu import models, ops
from flux_npu.models import build_diffusers_flux, make_inputs, preset_config
from flux_npu.testing import rel_err, tolerance

pytestmark = pytest.mark.emulator

FUSED = {
    "attention": "torch_npu.npu_fusion_attention",
    "apply_rope": "torch_npu.npu_rotary_mul",
    "rms_norm": "torch_npu.npu_rms_norm",
}
FUSED_DIFFUSERS = dict(FUSED, layer_norm_modulate="torch.layer_norm(aclnn)+addcmul")  # AdaLN: diffusers patches only


def _run(model, kwargs, leaves, seed=11):
    """Forward, then backward of a fixed random projection of the output; returns the output
    and the gradients of the input leaves and of every parameter, as float32 tensors."""
    for p in model.parameters():
        p.grad = None
    for t in leaves.values():
        t.grad = None
    out = model(**kwargs)
    out = out.sample if hasattr(out, "sample") else out
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    out.backward(cot)
    res = {"out": out.detach().float()}
    res.update({f"d{k}": t.grad.float() for k, t in leaves.items()})
    res.update({f"d{n}": p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    return res


def _errors(got, ref):
    assert got.keys() == ref.keys()
    return {k: rel_err(got[k], ref[k]) for k in ref}


def _patched_run(backend, model, kwargs, leaves, fused=FUSED):
    record.clear()
    ops.reset_dispatch_stats()
    with flux_npu.patch(backend=backend) as handle, Float64Watch() as watch:
        res = _run(model, kwargs, leaves)
    assert any(r.status == "patched" for r in handle.report())
    assert watch.ops == [], f"float64 appeared in the patched run: {sorted(set(watch.ops))}"
    assert not record.FLOAT64
    stats = ops.dispatch_stats()
    assert not stats["fallback"], stats["fallback"]
    for op, kernel in fused.items():
        assert stats["served"][(op, "npu", kernel)] > 0, f"{op} never reached {kernel}: {stats['served']}"
    return res


def _check_calls(layout, heads, head_dim, samples=1):
    fa = record.calls("npu_fusion_attention")
    assert fa and all(c["args"]["input_layout"] == layout for c in fa)
    assert all(c["args"]["head_num"] == heads for c in fa)
    assert all("scale" in c["explicit"] and math.isclose(c["args"]["scale"], 1 / math.sqrt(head_dim)) for c in fa)
    rot = record.calls("npu_rotary_mul")
    assert rot and all(c["args"]["rotary_mode"] == "interleave" for c in rot)
    # operands are rebuilt per call (no cache can see every write to the freqs): one r1 shape for
    # all blocks, per sample when the BFL pe is built per sample
    assert {c["tensors"]["r1"]["shape"][0] for c in rot} <= {1, samples}
    assert record.calls("npu_rms_norm")


# -- diffusers -------------------------------------------------------------------------------------


def _diffusers_case(preset, resolution, text_len):
    cfg = preset_config(preset)
    model = build_diffusers_flux(preset, dtype=torch.float32, seed=0)
    inputs = make_inputs(cfg, resolution=resolution, text_len=text_len, seed=1)
    return cfg, model, inputs


def _diffusers_kwargs(inputs, dtype):
    kw = inputs.as_kwargs()
    leaves = {}
    for k in ("hidden_states", "encoder_hidden_states"):
        kw[k] = kw[k].detach().to(dtype).requires_grad_(True)
        leaves[k] = kw[k]
    for k in ("pooled_projections", "timestep", "guidance"):
        kw[k] = kw[k].to(dtype)
    kw["return_dict"] = True
    return kw, leaves


@pytest.mark.parametrize("preset,resolution,text_len",
                         [("tiny", 128, 8), pytest.param("block", 128, 8, marks=pytest.mark.slow)])
def test_emulator_diffusers_flux_float32_parity(npu_emulated, preset, resolution, text_len):
    cfg, model, inputs = _diffusers_case(preset, resolution, text_len)
    if preset == "block":
        # Flux width (24 heads x 128, ~0.5 B parameters): to keep the run short on a CPU only the
        # QK-norm weights (the parameters a fused op touches) collect gradients; input gradients
        # still flow through every block.
        for name, p in model.named_parameters():
            p.requires_grad_(".norm_" in name)
    kw, leaves = _diffusers_kwargs(inputs, torch.float32)
    ref = _run(model, kw, leaves)
    got = _patched_run(npu_emulated, model, kw, leaves, FUSED_DIFFUSERS)
    errs = _errors(got, ref)
    worst = max(errs, key=errs.get)
    print(f"{preset} float32: out {errs['out']:.3e}, worst of {len(errs) - 1} grads {errs[worst]:.3e} ({worst})")
    assert errs["out"] <= tolerance(torch.float32), errs["out"]
    assert errs[worst] <= tolerance(torch.float32), (worst, errs[worst])
    _check_calls("BSND", cfg["num_attention_heads"], cfg["attention_head_dim"])


def test_emulator_diffusers_flux_bfloat16_parity(npu_emulated):
    cfg, model, inputs = _diffusers_case("tiny", 128, 8)
    kw32, leaves32 = _diffusers_kwargs(inputs, torch.float32)
    ref = _run(model, kw32, leaves32)  # float32 truth for both bf16 runs
    model = model.to(torch.bfloat16)
    kw, leaves = _diffusers_kwargs(inputs, torch.bfloat16)
    stock = _errors(_run(model, kw, leaves), ref)
    patched = _errors(_patched_run(npu_emulated, model, kw, leaves, FUSED_DIFFUSERS), ref)
    _assert_bf16(patched, stock)
    _check_calls("BSND", cfg["num_attention_heads"], cfg["attention_head_dim"])


def _assert_bf16(patched, stock):
    """bf16 error is measured against float32 for both runs: the patched model must be about as
    close to float32 as stock bf16 is (a whole Flux stack in bf16 drifts by a few 1e-2 on its own)."""
    worst = max(patched, key=patched.get)
    inputs = [k for k in patched if k in ("dhidden_states", "dencoder_hidden_states", "dimg", "dtxt")]
    grads = ", ".join(f"{k} {patched[k]:.2e}/{stock[k]:.2e}" for k in inputs)
    print(f"bf16 vs float32: out patched {patched['out']:.3e} stock {stock['out']:.3e}; input grads {grads}; "
          f"worst grad {worst} patched {patched[worst]:.3e} stock {stock[worst]:.3e}")
    assert patched["out"] <= max(1.5 * stock["out"], tolerance(torch.bfloat16)), (patched["out"], stock["out"])
    for k in patched:  # every gradient: no worse than a small factor of stock bf16's own error
        assert patched[k] <= max(3 * stock[k], 3 * tolerance(torch.bfloat16)), (k, patched[k], stock[k])


# -- BFL layout -------------------------------------------------------------------------------------


def _bfl_case(batch=1):
    from flux.model import Flux, FluxParams

    params = FluxParams(in_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=96, mlp_ratio=2.0,
                        num_heads=3, depth=2, depth_single_blocks=2, axes_dim=(8, 12, 12))
    torch.manual_seed(0)
    model = Flux(params)
    with torch.no_grad():  # non-trivial RMSNorm scales, so their cast and gradient matter
        for name, p in model.named_parameters():
            if name.endswith("norm.scale"):
                p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    side, n_txt = 6, 5
    img_ids = models.image_ids(side * 16)
    B = batch
    data = dict(
        img=torch.randn(B, side * side, 16, generator=g), img_ids=img_ids.reshape(1, -1, 3).repeat(B, 1, 1),
        txt=torch.randn(B, n_txt, 32, generator=g), txt_ids=torch.zeros(B, n_txt, 3),
        timesteps=torch.rand(B, generator=g), y=torch.randn(B, 32, generator=g), guidance=torch.full((B,), 3.5),
    )
    return params, model, data


def _bfl_kwargs(data, dtype):
    kw = {k: (v.to(dtype) if k not in ("img_ids", "txt_ids") else v) for k, v in data.items()}
    leaves = {}
    for k in ("img", "txt"):
        kw[k] = kw[k].detach().requires_grad_(True)
        leaves[k] = kw[k]
    return kw, leaves


@pytest.mark.parametrize("batch", [1, 2])  # batch 2: pe is built per sample, (2, 1, L, D/2, 2, 2)
def test_emulator_bfl_flux_float32_parity(npu_emulated, batch):
    params, model, data = _bfl_case(batch)
    kw, leaves = _bfl_kwargs(data, torch.float32)
    ref = _run(model, kw, leaves)
    got = _patched_run(npu_emulated, model, kw, leaves)
    errs = _errors(got, ref)
    worst = max(errs, key=errs.get)
    print(f"bfl float32 batch {batch}: out {errs['out']:.3e}, "
          f"worst of {len(errs) - 1} grads {errs[worst]:.3e} ({worst})")
    assert errs["out"] <= tolerance(torch.float32), errs["out"]
    assert errs[worst] <= tolerance(torch.float32), (worst, errs[worst])
    _check_calls("BNSD", params.num_heads, params.hidden_size // params.num_heads, batch)


def test_emulator_bfl_flux_bfloat16_parity(npu_emulated):
    params, model, data = _bfl_case()
    kw32, leaves32 = _bfl_kwargs(data, torch.float32)
    ref = _run(model, kw32, leaves32)
    model = model.to(torch.bfloat16)
    kw, leaves = _bfl_kwargs(data, torch.bfloat16)
    stock = _errors(_run(model, kw, leaves), ref)
    patched = _errors(_patched_run(npu_emulated, model, kw, leaves), ref)
    _assert_bf16(patched, stock)
    _check_calls("BNSD", params.num_heads, params.hidden_size // params.num_heads)
