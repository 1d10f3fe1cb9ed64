# ruff: noqa: F811  (the layout_path fixture, imported from test_patch_codebases, is a parameter name)
"""diffusers Flux under accelerate's and diffusers' memory features, patched (issue 15 item 4):
sequential CPU offload (accelerate `cpu_offload`: weights on meta until each module's hook loads
them), model CPU offload (`cpu_offload_with_hook`), group offloading (`enable_group_offload`, leaf
and block level) and layerwise casting (`enable_layerwise_casting`, fp8 storage). The patched
processors go through the modules (so the hooks run) or hand back, counted; nothing raises where
stock does not, and the output matches stock."""

import copy

import pytest
import torch
from flux_helpers import diffusers_model_and_inputs
from test_patch_codebases import layout_path  # noqa: F401  (fixture)

import flux_npu
from flux_npu import ops
from flux_npu.testing import rel_err, tolerance

accelerate = pytest.importorskip("accelerate")


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs.as_kwargs()).sample


def _sequential(model):
    return accelerate.cpu_offload(model, execution_device=torch.device("cpu"))


def _model_offload(model):
    accelerate.cpu_offload_with_hook(model, execution_device=torch.device("cpu"))
    return model


def _group_leaf(model):
    model.enable_group_offload(torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="leaf_level")
    return model


def _group_block(model):
    model.enable_group_offload(torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1)
    return model


def _layerwise_fp8(model):
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    return model


@pytest.mark.parametrize("setup", [_sequential, _model_offload, _group_leaf, _group_block, _layerwise_fp8],
                         ids=["sequential_cpu_offload", "model_cpu_offload", "group_leaf", "group_block",
                              "layerwise_fp8"])
def test_memory_features_patched_match_stock(setup):
    model, inputs = diffusers_model_and_inputs("tiny")
    model = setup(copy.deepcopy(model))
    stock = _forward(model, inputs)
    with flux_npu.patch("cpu", targets=["diffusers"]) as handle:
        ops.reset_dispatch_stats()
        patched = _forward(model, inputs)
        stats = ops.dispatch_stats()
        counts = [c for c in handle.row_counts() if c["symbol"] == "FluxAttnProcessor.__call__"]
    assert torch.isfinite(patched).all()
    assert rel_err(patched, stock) <= tolerance(torch.float32)
    assert stats["served"].get(("attention", "cpu", "torch.sdpa"), 0) > 0  # the fused attention still ran
    assert counts and counts[0]["calls"] > 0


def test_sequential_offload_norms_handed_back_counted():
    """Under accelerate's sequential offload the QK-norm weights sit on meta until the norm's own
    hook loads them: the patched processor calls the norm (its hook runs), counted with the reason."""
    model, inputs = diffusers_model_and_inputs("tiny")
    model = _sequential(model)
    with flux_npu.patch("cpu", targets=["diffusers"]):
        ops.reset_dispatch_stats()
        _forward(model, inputs)
        fb = ops.dispatch_stats()["fallback"]
    rms = {r: n for (op, b, r), n in fb.items() if op == "rms_norm"}
    assert rms and all("hooks" in r for r in rms), fb


def test_bfl_layout_under_sequential_offload(layout_path):
    """A BFL-layout model (current ComfyUI's) under accelerate's cpu_offload: QKNorm reads no
    weight behind a hook's back; the output matches stock."""
    layout_path("comfy_current_model", "comfy")
    import comfy.model_management
    from comfy.ldm.flux.model import Flux, FluxParams
    from flux_helpers import bfl_inputs

    comfy.model_management.in_training = True  # plain torch RoPE (comfy-kitchen's autograd-less ops not needed)
    torch.manual_seed(0)
    model = _sequential(Flux(FluxParams()))
    inputs = bfl_inputs(model, batch=1, side=4, text_len=3)
    with torch.no_grad():
        stock = model.forward_orig(**inputs)
        with flux_npu.patch("cpu", targets=["bfl"]):
            ops.reset_dispatch_stats()
            patched = model.forward_orig(**inputs)
            fb = ops.dispatch_stats()["fallback"]
    assert rel_err(patched, stock) <= tolerance(torch.float32)
    assert [n for (op, b, r), n in fb.items() if op == "rms_norm" and "hooks" in r] == [6]
