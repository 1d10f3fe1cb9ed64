"""apply_rope on every backend (cpu, cuda via the `device` fixture, npu on the emulator) against the
catalogue's float64 reference, forward and backward (tests/op_checks.py): the named shapes and the
catalogue's extra samples (both layouts, BFL's strided k, general matrices, the Triton kernel's
cases), then the reference against diffusers' and BFL's code."""

import pytest
import torch
from op_checks import SHAPE_IDS, check_op, on  # noqa: F401  (the backend fixture)

from flux_npu import ops
from flux_npu.ops import catalogue, reference
from flux_npu.ops.catalogue.apply_rope import ROPE_CASES
from flux_npu.testing import assert_close


@pytest.mark.parametrize("shape", SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_apply_rope(on, dtype, shape):  # noqa: F811
    check_op("apply_rope", on, dtype, shape)


@pytest.mark.parametrize("shape", list(catalogue.info("apply_rope").extra_samples))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_apply_rope_extra(on, dtype, shape):  # noqa: F811
    check_op("apply_rope", on, dtype, shape, grad_scale=1.0)  # the old per-backend tests' tolerance
    if on[0].name == "cuda" and shape in ROPE_CASES:  # the Triton kernel's cases
        assert ("apply_rope", "cuda", "triton.rope") in ops.dispatch_stats()["served"], ops.dispatch_stats()
    if on[0].name == "cpu":  # every form and layout here is the cpu kernel's
        assert ops.dispatch_stats()["served"][("apply_rope", "cpu", "torch.complex_mul")] == 1


def test_rope_reference_matches_stock_diffusers_and_bfl(seed):
    from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
    from flux import math as bfl_math

    S, D = 19, 16
    pos = torch.arange(S, dtype=torch.float32) * 0.5
    cos_d, sin_d = get_1d_rotary_pos_embed(D, pos, 10000, use_real=True, repeat_interleave_real=True,
                                           freqs_dtype=torch.float64)
    cos_r, sin_r = reference.rope_freqs(pos, D, 10000.0, form="cos_sin")
    assert_close(cos_r, cos_d, torch.float32) and assert_close(sin_r, sin_d, torch.float32)
    mats = reference.rope_freqs(pos[None], D, 10000.0, form="bfl")
    assert_close(mats, bfl_math.rope(pos[None], D, 10000), torch.float32)
    x = torch.randn(2, S, 3, D)
    assert_close(reference.apply_rope(x, (cos_r, sin_r), 1), apply_rotary_emb(x, (cos_d, sin_d), sequence_dim=1),
                 torch.float32)
    xb = x.transpose(1, 2)
    q_ref, _ = bfl_math.apply_rope(xb, xb, mats[:, None])
    assert_close(reference.apply_rope(xb, mats[:, None]), q_ref, torch.float32)


def test_reference_applies_general_matrices_as_bfl_does(seed):
    """BFL's apply_rope applies any 2x2 matrices (the CPU kernel used to assume rotations; the kernels
    run the catalogue's "general-matrices" sample above against this reference)."""
    from flux import math as bfl_math

    x, mats = torch.randn(2, 3, 7, 12).double(), torch.randn(2, 1, 7, 6, 2, 2).double()
    expect, _ = bfl_math.apply_rope(x, x, mats)
    assert_close(reference.apply_rope(x, mats), expect, torch.float64)
