"""Third-party Flux code layouts, patched vs stock, forward and backward: ComfyUI
(`comfy.ldm.flux.*` called the way its sampler calls it: `transformer_options` always filled, an
attention mask) and kohya sd-scripts (`library.flux_models`, one module found by its structure,
bool `txt_attention_mask`). The layouts in tests/comfy_model and tests/kohya_model are our own
code shaped like the originals. Routing counts prove which kernels served; hand-backs to stock
code are counted with their reason; the emulated npu path calls the fused torch_npu ops."""

import copy
import os
import sys

import pytest
import torch
from flux_helpers import assert_bf16_no_worse, bfl_inputs

import flux_npu
from flux_npu import ops
from flux_npu.patches import engine
from flux_npu.testing import rel_err, tolerance

HERE = os.path.dirname(__file__)


def _forget(prefix):
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


@pytest.fixture
def layout_path():
    """Put a test layout directory on sys.path for one test; forget its modules afterwards."""
    added = []

    def add(dirname, top):
        path = os.path.join(HERE, dirname)
        sys.path.insert(0, path)
        added.append((path, top))

    yield add
    for h in engine.live_handles():
        h.undo()
    for path, top in added:
        sys.path.remove(path)
        _forget(top)


def _run(model, fn, kwargs, leaves):
    """fn(**kwargs) forward, then backward of a fixed random cotangent: output, leaf grads and
    every parameter grad, as float32."""
    model.zero_grad(set_to_none=True)
    for t in leaves.values():
        t.grad = None
    out = fn(**kwargs)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(11)).to(out.dtype)
    out.backward(cot)
    res = {"out": out.detach().float()}
    res.update({"d_" + k: t.grad.float() for k, t in leaves.items()})
    res.update({"d_" + n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    return res


def _check_fp32(patched, stock):
    errs = {k: rel_err(patched[k], stock[k]) for k in stock}
    bad = {k: e for k, e in errs.items() if not e <= tolerance(torch.float32)}
    assert not bad, f"float32 patched vs stock beyond {tolerance(torch.float32)}: {bad}"


def _cast(inputs, dtype):
    out = {}
    for k, v in inputs.items():
        nv = v.detach().to(dtype) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v
        out[k] = nv.requires_grad_(True) if v.requires_grad else nv
    return out


# -- ComfyUI ------------------------------------------------------------------------------------


def _comfy(layout_path, dtype=torch.float32):
    layout_path("comfy_model", "comfy")
    from comfy.ldm.flux.model import Flux, FluxParams

    torch.manual_seed(0)
    return Flux(FluxParams()).to(dtype)


def _comfy_kwargs(model, inputs, mask_kind):
    """What ComfyUI's sampler hands forward_orig: transformer_options always filled, and here a
    text-padding attention mask (bool True = attend, or additive 0/-inf) over all L tokens."""
    b, n_txt, n_img = inputs["txt"].shape[0], inputs["txt"].shape[1], inputs["img"].shape[1]
    keep = torch.ones(b, n_txt + n_img, dtype=torch.bool)
    keep[1, n_txt - 2:n_txt] = False  # the second sample has two padding text tokens
    mask = keep[:, None, :].expand(b, n_txt + n_img, n_txt + n_img)  # (B, L, S): ComfyUI's 3-D form
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape, dtype=inputs["img"].dtype).masked_fill(~mask, float("-inf"))
    elif mask_kind is None:
        mask = None
    opts = {"sigmas": torch.tensor([0.7]), "cond_or_uncond": [0, 1], "patches": {}, "transformer_index": 0,
            "sample_sigmas": torch.linspace(1, 0, 5)}
    return dict(inputs, transformer_options=opts, attn_mask=mask)


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_comfy_sampler_path_float32_is_served(layout_path, mask_kind):
    model = _comfy(layout_path)
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _comfy_kwargs(model, inputs, mask_kind)
    leaves = {"img": inputs["img"], "txt": inputs["txt"]}
    stock = _run(model, model.forward_orig, kwargs, leaves)
    with flux_npu.patch("cpu", targets=["bfl"]) as handle:
        patched_rows = {(r.target, r.symbol) for r in handle.report() if r.status == "patched"}
        assert ("comfy.ldm.flux.math", "attention") in patched_rows
        assert ("comfy.ldm.flux.math", "apply_rope1") in patched_rows
        import comfy.ldm.flux.math as math_
        from comfy.ldm.flux import layers

        assert layers.attention is math_.attention  # `from .math import attention` was rebound too
        ops.reset_dispatch_stats()
        patched = _run(model, model.forward_orig, kwargs, leaves)
        stats = ops.dispatch_stats()
    _check_fp32(patched, stock)
    assert not stats["fallback"], stats["fallback"]
    served = stats["served"]
    assert served[("attention", "cpu", "torch.sdpa")] == 4  # 2 double + 2 single blocks, all served
    assert served[("apply_rope", "cpu", "torch.complex_mul")] == 8
    assert served[("rms_norm", "cpu", "torch.rms_norm")] == 12
    assert served[("rope_freqs", "cpu", "reference")] == 3
    assert served[("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul")] == 2 * 4 + 2 + 1  # AdaLN everywhere
    assert served[("gated_residual", "cpu", "torch.addcmul")] == 2 * 4 + 2


def test_comfy_bfloat16(layout_path):
    model = _comfy(layout_path)
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _comfy_kwargs(model, inputs, "bool")
    ref32 = _run(model, model.forward_orig, kwargs, {"img": inputs["img"], "txt": inputs["txt"]})
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    i16 = _cast(inputs, torch.bfloat16)
    k16 = _comfy_kwargs(m16, i16, "bool")
    leaves = {"img": i16["img"], "txt": i16["txt"]}
    stock = _run(m16, m16.forward_orig, k16, leaves)
    with flux_npu.patch("cpu", targets=["bfl"]):
        ops.reset_dispatch_stats()
        patched = _run(m16, m16.forward_orig, k16, leaves)
        assert ops.dispatch_stats()["served"][("attention", "cpu", "torch.sdpa")] == 4
    assert_bf16_no_worse(patched, stock, ref32)


def test_comfy_attention_override_is_handed_back_and_counted(layout_path):
    model = _comfy(layout_path)
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _comfy_kwargs(model, inputs, None)
    seen = []

    def override(func, *args, **kw):  # a user's attention swap, as ComfyUI custom nodes install
        seen.append(1)
        return func(*args, **kw)

    kwargs["transformer_options"]["optimized_attention_override"] = override
    leaves = {"img": inputs["img"], "txt": inputs["txt"]}
    stock = _run(model, model.forward_orig, kwargs, leaves)
    n_stock = len(seen)
    with flux_npu.patch("cpu", targets=["bfl"]) as handle:
        ops.reset_dispatch_stats()
        patched = _run(model, model.forward_orig, kwargs, leaves)
        stats = ops.dispatch_stats()
        table = handle.report_table()
    assert len(seen) == 2 * n_stock == 8, "the user's override did not run for every attention call"
    assert not [k for k in stats["served"] if k[0] == "attention"]
    reasons = {r: n for (op, b, r), n in stats["fallback"].items() if op == "attention"}
    assert list(reasons.values()) == [4] and "optimized_attention_override" in next(iter(reasons))
    assert "run-time hand-backs" in table and "optimized_attention_override" in table
    from flux_npu import report  # what `flux-npu info --patches` shows for this process

    runtime = report.patch_runtime()
    assert [h["calls"] for h in runtime["handbacks"] if "optimized_attention_override" in h["reason"]] == [4]
    assert "optimized_attention_override" in report.render({"versions": {}, "backends": [], "patches": [],
                                                           "patch_runtime": runtime})
    assert stats["served"][("rms_norm", "cpu", "torch.rms_norm")] == 12  # the rest is still fused
    _check_fp32(patched, stock)


def test_comfy_emulated_npu_calls_fused_ops(layout_path, npu_emulated):
    from npu_emulator import record

    model = _comfy(layout_path)
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _comfy_kwargs(model, inputs, "bool")
    leaves = {"img": inputs["img"], "txt": inputs["txt"]}
    stock = _run(model, model.forward_orig, kwargs, leaves)
    record.clear()
    with flux_npu.patch(backend=npu_emulated, targets=["bfl"]):
        ops.reset_dispatch_stats()
        patched = _run(model, model.forward_orig, kwargs, leaves)
        stats = ops.dispatch_stats()
    _check_fp32(patched, stock)
    assert not stats["fallback"], stats["fallback"]
    fa = record.calls("npu_fusion_attention")
    assert len(fa) >= 4 and all(c["args"]["input_layout"] == "BNSD" for c in fa)
    assert record.calls("npu_rotary_mul") and record.calls("npu_rms_norm")


# -- kohya sd-scripts ---------------------------------------------------------------------------


def _kohya(layout_path, dtype=torch.float32):
    layout_path("kohya_model", "library")
    import library.flux_models as fm

    torch.manual_seed(0)
    return fm, fm.Flux(fm.FluxParams()).to(dtype)


def _kohya_kwargs(inputs):
    b, n_txt = inputs["txt"].shape[:2]
    mask = torch.ones(b, n_txt, dtype=torch.long)
    mask[1, -2:] = 0  # kohya's txt_attention_mask: 1 = token, 0 = padding
    return dict(inputs, txt_attention_mask=mask)


def test_kohya_module_found_by_structure_and_served_with_its_bool_mask(layout_path):
    fm, model = _kohya(layout_path)
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _kohya_kwargs(inputs)
    leaves = {"img": inputs["img"], "txt": inputs["txt"]}
    stock = _run(model, model, kwargs, leaves)
    with flux_npu.patch("cpu", targets=["bfl"]) as handle:
        rows = [r for r in handle.report() if r.target == "library.flux_models" and r.status == "patched"]
        assert {r.symbol for r in rows} >= {"attention", "rope", "apply_rope", "RMSNorm.forward", "QKNorm.forward",
                                            "EmbedND.forward"}
        ops.reset_dispatch_stats()
        patched = _run(model, model, kwargs, leaves)
        stats = ops.dispatch_stats()
    _check_fp32(patched, stock)
    assert not stats["fallback"], stats["fallback"]
    assert stats["served"][("attention", "cpu", "torch.sdpa")] == 4
    assert stats["served"][("rms_norm", "cpu", "torch.rms_norm")] == 12
    assert stats["served"][("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul")] == 2 * 4 + 2 + 1  # via _forward
    assert stats["served"][("gated_residual", "cpu", "torch.addcmul")] == 2 * 4 + 2
    assert fm.attention.__name__ == "attention" and not hasattr(fm.attention, "__wrapped_original__")  # undone


def test_kohya_imported_after_patch_is_hooked_by_structure(layout_path):
    layout_path("kohya_model", "library")
    handle = flux_npu.patch("cpu", targets=["bfl"])
    assert not [r for r in handle.report() if r.target.startswith("library")]
    import library.flux_models as fm  # imported after patch(): the import hook recognises it

    hooked = {r.symbol for r in handle.report() if r.target == "library.flux_models" and r.status == "patched"}
    assert hooked >= {"attention", "apply_rope", "QKNorm.forward", "DoubleStreamBlock._forward"}, hooked
    assert getattr(fm.attention, "__wrapped_original__", None) is not None
    assert getattr(fm.QKNorm.forward, "__wrapped__", None) is not None
    handle.undo()
    assert getattr(fm.attention, "__wrapped_original__", None) is None


def test_kohya_bfloat16_keeps_its_rmsnorm_dtype(layout_path):
    fm, model = _kohya(layout_path)
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _kohya_kwargs(inputs)
    ref32 = _run(model, model, kwargs, {"img": inputs["img"], "txt": inputs["txt"]})
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    i16 = _cast(inputs, torch.bfloat16)
    k16 = _kohya_kwargs(i16)
    leaves = {"img": i16["img"], "txt": i16["txt"]}
    stock = _run(m16, m16, k16, leaves)
    norm = fm.RMSNorm(4)  # float32 scale, bf16 input: kohya returns the input's dtype
    x = torch.randn(3, 4).to(torch.bfloat16)
    with flux_npu.patch("cpu", targets=["bfl"]):
        assert norm(x).dtype == torch.bfloat16
        patched = _run(m16, m16, k16, leaves)
    assert_bf16_no_worse(patched, stock, ref32)


def test_kohya_emulated_npu_calls_fused_ops_with_the_bool_mask(layout_path, npu_emulated):
    from npu_emulator import record

    fm, model = _kohya(layout_path)
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _kohya_kwargs(inputs)
    leaves = {"img": inputs["img"], "txt": inputs["txt"]}
    stock = _run(model, model, kwargs, leaves)
    record.clear()
    with flux_npu.patch(backend=npu_emulated, targets=["bfl"]):
        ops.reset_dispatch_stats()
        patched = _run(model, model, kwargs, leaves)
        stats = ops.dispatch_stats()
    _check_fp32(patched, stock)
    assert not stats["fallback"], stats["fallback"]
    fa = record.calls("npu_fusion_attention")
    assert len(fa) >= 4 and all("atten_mask" in c["tensors"] for c in fa[:4]), "the bool mask did not reach the op"
    assert record.calls("npu_rotary_mul") and record.calls("npu_rms_norm")


def test_comfy_patched_traces_as_one_graph_like_stock(layout_path):
    """torch.compile users: the attention replacement with ComfyUI's keyword arguments and the
    rewritten block forwards (AdaLN, gated residuals) add no graph break."""
    import torch._dynamo

    model = _comfy(layout_path)
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = {k: (v.detach() if isinstance(v, torch.Tensor) else v)
              for k, v in _comfy_kwargs(model, inputs, "bool").items()}
    torch._dynamo.reset()
    stock = torch._dynamo.explain(model.forward_orig)(**kwargs)
    with flux_npu.patch("cpu", targets=["bfl"]):
        torch._dynamo.reset()
        patched = torch._dynamo.explain(model.forward_orig)(**kwargs)
    torch._dynamo.reset()
    assert (patched.graph_count, patched.graph_break_count) == (stock.graph_count, stock.graph_break_count) == (1, 0), \
        [r.reason.split("\n")[0] for r in patched.break_reasons]
