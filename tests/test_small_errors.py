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
