"""The other Flux-family models of diffusers at tiny sizes, patched vs stock, forward and backward
(output, input grads, every parameter grad): FLUX.2 (Flux2Transformer2DModel), Chroma (with the
pipeline's float attention mask) and FluxTransformer2DModel with IP-adapter processors. Routing
counts prove the QK norms, attention, RoPE and AdaLN reached our ops; undo restores identity."""

import copy

import pytest
import torch
from flux_helpers import assert_bf16_no_worse

import flux_npu
from flux_npu import ops
from flux_npu.testing import rel_err, tolerance


def _run(model, kwargs, leaves):
    model.zero_grad(set_to_none=True)
    for t in leaves.values():
        t.grad = None
    out = model(**kwargs).sample
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(11)).to(out.dtype))
    res = {"out": out.detach().float()}
    res.update({"d_" + k: t.grad.float() for k, t in leaves.items()})
    res.update({"d_" + n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    return res


ZERO = 1e-6  # gradients that are zero in exact arithmetic (a key bias under softmax) are rounding noise


def _check_fp32(patched, stock):
    assert patched.keys() == stock.keys()
    bad = {}
    for k in stock:
        if stock[k].norm() < ZERO:
            if not patched[k].norm() < ZERO:
                bad[k] = ("should be ~0", float(patched[k].norm()))
        elif not rel_err(patched[k], stock[k]) <= tolerance(torch.float32):
            bad[k] = rel_err(patched[k], stock[k])
    assert not bad, f"float32 patched vs stock beyond {tolerance(torch.float32)}: {bad}"


def _leaf(t, dtype):
    return t.to(dtype).requires_grad_(True)


def _class_attrs(module, names):
    out = {}
    for n in names:
        cls, attr = n.split(".")
        out[n] = getattr(module, cls).__dict__[attr]
    return out


# -- FLUX.2 -----------------------------------------------------------------------------------


def _flux2(dtype=torch.float32):
    from flux_npu.models import build_diffusers_flux2

    return build_diffusers_flux2("tiny", dtype=dtype, seed=0)


def _flux2_inputs(dtype, batch=2, side=4, text_len=5):
    g = torch.Generator().manual_seed(1)
    axis = torch.arange(float(side))
    grid = torch.meshgrid(torch.zeros(1), axis, axis, torch.zeros(1), indexing="ij")
    img_ids = torch.stack(grid, dim=-1).reshape(-1, 4)
    txt_ids = torch.zeros(text_len, 4)
    txt_ids[:, 3] = torch.arange(text_len)
    kwargs = dict(
        hidden_states=_leaf(torch.randn(batch, side * side, 8, generator=g), dtype),
        encoder_hidden_states=_leaf(torch.randn(batch, text_len, 24, generator=g), dtype),
        timestep=torch.rand(batch, generator=g).to(dtype),
        img_ids=img_ids, txt_ids=txt_ids, guidance=torch.full((batch,), 3.5).to(dtype),
    )
    return kwargs, {"hidden": kwargs["hidden_states"], "text": kwargs["encoder_hidden_states"]}


FLUX2_SYMBOLS = ("Flux2AttnProcessor.__call__", "Flux2ParallelSelfAttnProcessor.__call__",
                 "Flux2TransformerBlock.forward", "Flux2SingleTransformerBlock.forward", "Flux2PosEmbed.forward")


def test_flux2_float32_served_and_undone():
    from diffusers.models.transformers import transformer_flux2 as tf2

    model = _flux2()
    kwargs, leaves = _flux2_inputs(torch.float32)
    stock = _run(model, kwargs, leaves)
    before = _class_attrs(tf2, FLUX2_SYMBOLS)
    with flux_npu.patch("cpu", targets=["diffusers"]) as handle:
        rows = {r.symbol: r for r in handle.report() if r.target == tf2.__name__}
        assert all(rows[s].status == "patched" for s in FLUX2_SYMBOLS), {s: rows[s] for s in FLUX2_SYMBOLS}
        ops.reset_dispatch_stats()
        patched = _run(model, kwargs, leaves)
        stats = ops.dispatch_stats()
    _check_fp32(patched, stock)
    assert not stats["fallback"], stats["fallback"]
    served = stats["served"]
    assert served[("attention", "cpu", "torch.sdpa")] == 3  # 1 double + 2 single blocks
    assert served[("rms_norm", "cpu", "torch.rms_norm")] == 4 + 2 * 2  # q/k/added q/added k; q/k per single block
    assert served[("apply_rope", "cpu", "torch.complex_mul")] == 2 * 3  # through the patched apply_rotary_emb
    assert served[("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul")] == 4 + 2 + 1  # blocks + norm_out
    assert served[("gated_residual", "cpu", "torch.addcmul")] == 4 + 2
    assert served[("rope_freqs", "cpu", "reference")] == 4 * 2  # 4 axes, image and text ids
    assert _class_attrs(tf2, FLUX2_SYMBOLS) == before  # identity after undo
    assert all(_class_attrs(tf2, FLUX2_SYMBOLS)[k] is before[k] for k in before)


def test_flux2_bfloat16():
    model = _flux2()
    kwargs, leaves = _flux2_inputs(torch.float32)
    ref32 = _run(model, kwargs, leaves)
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    k16, l16 = _flux2_inputs(torch.bfloat16)
    stock = _run(m16, k16, l16)
    with flux_npu.patch("cpu", targets=["diffusers"]):
        ops.reset_dispatch_stats()
        patched = _run(m16, k16, l16)
        assert ops.dispatch_stats()["served"][("attention", "cpu", "torch.sdpa")] == 3
    assert_bf16_no_worse(patched, stock, ref32)


# -- Chroma -----------------------------------------------------------------------------------


def _chroma(dtype=torch.float32):
    from flux_npu.models import build_diffusers_chroma

    return build_diffusers_chroma("tiny", dtype=dtype, seed=0)


def _chroma_inputs(dtype, batch=2, side=4, text_len=5):
    from flux_npu import models

    g = torch.Generator().manual_seed(2)
    # the pipeline's mask: float 0/1 over text tokens (all but the first padding masked) + image tokens
    text_keep = torch.ones(batch, text_len, dtype=dtype)
    text_keep[1, -2:] = 0
    mask = torch.cat([text_keep, torch.ones(batch, side * side, dtype=torch.bool)], dim=1)
    kwargs = dict(
        hidden_states=_leaf(torch.randn(batch, side * side, 8, generator=g), dtype),
        encoder_hidden_states=_leaf(torch.randn(batch, text_len, 24, generator=g), dtype),
        timestep=torch.rand(batch, generator=g).to(dtype),
        img_ids=models.image_ids(side * 16), txt_ids=torch.zeros(text_len, 3), attention_mask=mask,
    )
    return kwargs, {"hidden": kwargs["hidden_states"], "text": kwargs["encoder_hidden_states"]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chroma_with_its_float_mask(dtype):
    model = _chroma()
    kwargs, leaves = _chroma_inputs(torch.float32)
    ref32 = _run(model, kwargs, leaves)
    m = copy.deepcopy(model).to(dtype)
    kw, lv = _chroma_inputs(dtype)
    stock = _run(m, kw, lv)
    with flux_npu.patch("cpu", targets=["diffusers"]):
        ops.reset_dispatch_stats()
        patched = _run(m, kw, lv)
        stats = ops.dispatch_stats()
    assert not stats["fallback"], stats["fallback"]
    served = stats["served"]
    assert served[("attention", "cpu", "torch.sdpa")] == 2  # the float mask is taken as additive, like SDPA
    # pruned norm1/norm1_context, norm2/norm2_context, the single block's norm
    assert served[("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul")] == 2 + 2 + 1
    assert served[("gated_residual", "cpu", "torch.addcmul")] == 4 + 1
    if dtype == torch.float32:
        _check_fp32(patched, stock)
    else:
        assert_bf16_no_worse(patched, stock, ref32)


# -- IP-adapter -------------------------------------------------------------------------------


def _ip_model():
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    from flux_npu import models

    model = models.build_diffusers_flux("tiny", seed=0)
    cfg = models.preset_config("tiny")
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    torch.manual_seed(3)
    for block in model.transformer_blocks:
        block.attn.set_processor(FluxIPAdapterAttnProcessor(inner, 20, num_tokens=(3,), scale=0.7))
    inputs = models.make_inputs(cfg, resolution=64, text_len=4, requires_grad=True, seed=0)
    ip = torch.randn(inputs.hidden_states.shape[0], 3, 20, generator=torch.Generator().manual_seed(4))
    kwargs = dict(inputs.as_kwargs(), joint_attention_kwargs={"ip_hidden_states": [ip.requires_grad_(True)]})
    return model, kwargs, {"hidden": inputs.hidden_states, "text": inputs.encoder_hidden_states, "ip": ip}


def test_ip_adapter_processor_attention_and_norms_served():
    model, kwargs, leaves = _ip_model()
    stock = _run(model, kwargs, leaves)
    with flux_npu.patch("cpu", targets=["diffusers"]) as handle:
        row = [r for r in handle.report() if r.symbol == "FluxIPAdapterAttnProcessor.__call__"][0]
        assert row.status == "patched" and "2 attention call(s)" in row.reason
        ops.reset_dispatch_stats()
        patched = _run(model, kwargs, leaves)
        stats = ops.dispatch_stats()
    _check_fp32(patched, stock)
    assert not stats["fallback"], stats["fallback"]
    served = stats["served"]
    # 2 double blocks with the IP processor (main + IP attention each) + 2 single blocks
    assert served[("attention", "cpu", "torch.sdpa")] == 2 * 2 + 2
    assert served[("rms_norm", "cpu", "torch.rms_norm")] == 2 * 4  # IP processors' QK norms
    assert served[("apply_rope", "cpu", "torch.complex_mul")] == 2 * 2  # through the patched apply_rotary_emb


def test_flux2_and_ip_adapter_emulated_npu_call_fused_ops(npu_emulated):
    from npu_emulator import record

    for build in ("flux2", "ip"):
        if build == "flux2":
            model = _flux2()
            kwargs, leaves = _flux2_inputs(torch.float32)
        else:
            model, kwargs, leaves = _ip_model()
        stock = _run(model, kwargs, leaves)
        record.clear()
        with flux_npu.patch(backend=npu_emulated, targets=["diffusers"]):
            ops.reset_dispatch_stats()
            patched = _run(model, kwargs, leaves)
            stats = ops.dispatch_stats()
        _check_fp32(patched, stock)
        assert not stats["fallback"], (build, stats["fallback"])
        fa = record.calls("npu_fusion_attention")
        assert fa and all(c["args"]["input_layout"] == "BSND" for c in fa), build
        assert record.calls("npu_rotary_mul") and record.calls("npu_rms_norm"), build


def test_chroma_float_mask_on_emulated_npu_is_served_through_pse(npu_emulated):
    """Chroma's pipeline mask is float 0/1, which diffusers' SDPA *adds* to the scores: not a
    boolean mask, so the npu kernel sends it as npu_fusion_attention's `pse` bias (issue 15 item 6;
    it used to go to the reference, building full B x H x S x S float32 scores). Correct, nothing
    handed back, every attention call on the fused op with a pse."""
    from npu_emulator import record

    model = _chroma()
    kwargs, leaves = _chroma_inputs(torch.float32)
    stock = _run(model, kwargs, leaves)
    record.clear()
    with flux_npu.patch(backend=npu_emulated, targets=["diffusers"]):
        ops.reset_dispatch_stats()
        patched = _run(model, kwargs, leaves)
        stats = ops.dispatch_stats()
    _check_fp32(patched, stock)
    assert not stats["fallback"], stats["fallback"]
    calls = [c for c in record.calls("npu_fusion_attention") if c["tensors"]["query"]["shape"][-2:] != (1, 2)]
    assert len(calls) == 2 and all(c["tensors"].get("pse") for c in calls)  # (the pse probe is the 1x2 call)
    assert record.calls("npu_rotary_mul") and record.calls("npu_rms_norm")


def test_flux2_instance_level_patch_reaches_its_processors_and_nothing_else():
    from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

    model, other = _flux2(), _flux2()
    kwargs, leaves = _flux2_inputs(torch.float32)
    stock = _run(model, kwargs, leaves)
    with flux_npu.patch("cpu", targets=["diffusers"], model=model) as handle:
        rows = {r.symbol: r for r in handle.report()}
        assert "on 1 instance(s)" in rows["Flux2AttnProcessor.__call__"].reason
        assert "on 2 instance(s)" in rows["Flux2ParallelSelfAttnProcessor.__call__"].reason
        ops.reset_dispatch_stats()
        _run(other, kwargs, leaves)
        assert not [k for k in ops.dispatch_stats()["served"] if k[0] in ("attention", "rms_norm")]
        patched = _run(model, kwargs, leaves)
        assert ops.dispatch_stats()["served"][("attention", "cpu", "torch.sdpa")] == 3
    _check_fp32(patched, stock)
    procs = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert {type(p) for p in procs} == {Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor}  # classes restored


# -- FLUX.3 -----------------------------------------------------------------------------------


def _flux3():
    from diffusers import Flux3Transformer2DModel

    torch.manual_seed(0)
    return Flux3Transformer2DModel(
        in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, timestep_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
    )


def test_flux3_float32_served():
    model = _flux3()
    kwargs, leaves = _flux2_inputs(torch.float32)  # same token/id layout: 4 RoPE axes
    kwargs.pop("guidance")
    stock = _run(model, kwargs, leaves)
    with flux_npu.patch("cpu", targets=["diffusers"]):
        ops.reset_dispatch_stats()
        patched = _run(model, kwargs, leaves)
        stats = ops.dispatch_stats()
    _check_fp32(patched, stock)
    assert not stats["fallback"], stats["fallback"]
    served = stats["served"]
    # image and text mode blocks (1 each), 2 single blocks
    assert served[("attention", "cpu", "torch.sdpa")] == 1 + 1 + 2
    assert served[("rms_norm", "cpu", "torch.rms_norm")] == 2 * 4
    assert served[("apply_rope", "cpu", "torch.complex_mul")] == 2 * 4
    assert served[("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul")] == 1 + 1 + 2 * 2 + 1  # + output norm
    assert served[("gated_residual", "cpu", "torch.addcmul")] == 1 + 1 + 2 * 2
