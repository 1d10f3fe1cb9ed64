"""attention on every backend (cpu, cuda via the `device` fixture, npu on the emulator) against the
catalogue's float64 reference, forward and backward (tests/op_checks.py)."""

import math

import pytest
import torch
from op_checks import SHAPE_IDS, check_op, on  # noqa: F401  (the backend fixture)

from flux_npu import ops
from flux_npu.ops import catalogue, reference
from flux_npu.testing import assert_close


@pytest.mark.parametrize("shape", SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention(on, dtype, shape):  # noqa: F811
    check_op("attention", on, dtype, shape)


@pytest.mark.parametrize("shape", list(catalogue.info("attention").extra_samples))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_attention_extra(on, dtype, shape):  # noqa: F811
    check_op("attention", on, dtype, shape)
    if on[0].name in ("cpu", "cuda") and shape == "bool-mask-bshd":  # a bool mask reaches the fused kernel
        stats = ops.dispatch_stats()
        assert stats["served"][("attention", on[0].name, "torch.sdpa")] == 1 and not stats["fallback"], stats


def test_attention_reference_is_sdpa_maths(seed):
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64) for _ in range(3))
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    expect = torch.softmax(scores, -1) @ v
    assert_close(reference.attention(q, k, v), expect, torch.float64)
    expect = torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1) @ v
    assert_close(reference.attention(q, k, v, scale=0.3), expect, torch.float64)
