"""The small ones of issue 18 item 9: clear errors naming the fix instead of raw ones."""

import pytest
import torch

import flux_npu
from flux_npu import ops


def test_patch_model_must_be_a_module():
    with pytest.raises(TypeError, match=r"patch\(model=...\) takes a torch.nn.Module.*got int"):
        flux_npu.patch("cpu", model=5)


def test_patch_module_needs_a_module():
    with pytest.raises(TypeError, match=r"patch_module\(\) takes an imported module.*NoneType"):
        flux_npu.patch_module(None)


def test_patch_ops_must_be_names():
    with pytest.raises(TypeError, match="op name or a list of op names, got int"):
        flux_npu.patch("cpu", ops=5)
    with pytest.raises(TypeError, match="op names"):
        flux_npu.patch("cpu", exclude=[1])


def test_get_backend_of_a_number_names_the_backends():
    with pytest.raises(TypeError, match="backend name.*got int 123.*registered backends: .*cpu"):
        flux_npu.get_backend(123)


def test_float64_mask_with_float32_q_is_a_clear_error():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(TypeError, match=r"float32 or q's dtype.*mask.to\(q.dtype\)"):
        ops.attention(q, q, q, mask=torch.zeros(1, 1, 3, 3, dtype=torch.float64))
    ref = ops.reference.attention(q.double(), q.double(), q.double(), mask=torch.zeros(1, 1, 3, 3))
    out = ops.attention(q, q, q, mask=torch.zeros(1, 1, 3, 3))  # float32 masks are fine, as for SDPA
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


def test_zero_heads_is_a_clear_error():
    q, kv = torch.randn(1, 2, 3, 4), torch.randn(1, 0, 3, 4)
    with pytest.raises(ValueError, match="0 heads"):
        ops.attention(q, kv, kv)


def test_reloaded_diffusers_module_is_patched_again_and_undone():
    """importlib.reload of diffusers' Flux module while patched: models built from the reloaded
    classes run our ops (the handle's rows say it was patched again), and undo restores them.
    In a subprocess: reloading diffusers would change class identities for the other tests."""
    import os
    import subprocess
    import sys

    code = """
import importlib, warnings
import torch
import flux_npu
from flux_npu import ops
import diffusers.models.transformers.transformer_flux as tf
warnings.simplefilter("error", RuntimeWarning)  # undo must not find stale records
stock_call = tf.FluxAttnProcessor.__call__
h = flux_npu.patch("cpu", targets=["diffusers"])
importlib.reload(tf)
assert tf.FluxAttnProcessor.__call__ is not stock_call
m = tf.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                              axes_dims_rope=(2, 2, 4))
ops.reset_dispatch_stats()
with torch.no_grad():
    m(hidden_states=torch.randn(1, 4, 8), encoder_hidden_states=torch.randn(1, 3, 16),
      pooled_projections=torch.randn(1, 16), timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 3),
      txt_ids=torch.zeros(3, 3))
served = ops.dispatch_stats()["served"]
assert any(op == "attention" for (op, _, _) in served), served
assert any(r.status == "reloaded" for r in h.report())
h.undo()
assert tf.FluxAttnProcessor.__call__.__module__ == tf.__name__
print("OK")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
