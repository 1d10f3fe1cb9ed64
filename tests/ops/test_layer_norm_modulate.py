"""layer_norm_modulate on every backend (cpu, cuda via the `device` fixture, npu on the emulator) against the
catalogue's float64 reference, forward and backward (tests/op_checks.py): the named shapes, and the
catalogue's extra samples (shift and scale strided halves of one embedding, an odd width), which cpu
and cuda serve with their own kernel (no fallback)."""

import pytest
import torch
from op_checks import SHAPE_IDS, check_op, on  # noqa: F401  (the backend fixture)

from flux_npu import ops
from flux_npu.ops import catalogue, reference
from flux_npu.testing import assert_close


@pytest.mark.parametrize("shape", SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_modulate(on, dtype, shape):  # noqa: F811
    check_op("layer_norm_modulate", on, dtype, shape)


@pytest.mark.parametrize("shape", list(catalogue.info("layer_norm_modulate").extra_samples))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_layer_norm_modulate_extra(on, dtype, shape):  # noqa: F811
    check_op("layer_norm_modulate", on, dtype, shape, grad_scale=1.0)  # the Triton tests' tolerance
    if on[0].name == "cuda":  # the Triton kernel takes every one of these
        assert ("layer_norm_modulate", "cuda", "triton.layer_norm_modulate") in ops.dispatch_stats()["served"]
    if on[0].name in ("cpu", "cuda"):
        stats = ops.dispatch_stats()
        assert not stats["fallback"], stats["fallback"]
        assert [k for k in stats["served"] if k[0] == "layer_norm_modulate"][0][2] != "reference", stats["served"]


def test_layer_norm_modulate_reference_matches_adaln(seed):
    norm = torch.nn.LayerNorm(40, elementwise_affine=False, eps=1e-6, dtype=torch.float64)
    x = torch.randn(2, 6, 40, dtype=torch.float64)
    shift, scale = torch.randn(2, 40, dtype=torch.float64), torch.randn(2, 40, dtype=torch.float64)
    stock = norm(x) * (1 + scale[:, None]) + shift[:, None]
    assert_close(reference.layer_norm_modulate(x, shift[:, None], scale[:, None], 1e-6), stock, torch.float64)
