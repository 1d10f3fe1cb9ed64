"""layer_norm_modulate on every backend (cpu, cuda via the `device` fixture, npu on the emulator) against the
catalogue's float64 reference, forward and backward (tests/op_checks.py): the named shapes, and the
catalogue's extra samples (shift and scale strided halves of one embedding, an odd width), which cpu
and cuda serve with their own kernel (no fallback)."""

import pytest
import torch
from op_checks import SHAPE_IDS, check_op, on  # noqa: F401  (the backend fixture)

from flux_npu import ops
from flux_npu.ops import catalogue


@pytest.mark.parametrize("shape", SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_modulate(on, dtype, shape):  # noqa: F811
    check_op("layer_norm_modulate", on, dtype, shape)


@pytest.mark.parametrize("shape", list(catalogue.info("layer_norm_modulate").extra_samples))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_modulate_extra(on, dtype, shape):  # noqa: F811
    check_op("layer_norm_modulate", on, dtype, shape)
    if on[0].name in ("cpu", "cuda"):
        stats = ops.dispatch_stats()
        assert not stats["fallback"], stats["fallback"]
        assert [k for k in stats["served"] if k[0] == "layer_norm_modulate"][0][2] != "reference", stats["served"]
