"""qk_norm_rope on every backend (cpu, cuda via the `device` fixture, npu on the emulator) against the
catalogue's float64 reference, forward and backward (tests/op_checks.py): the named shapes, and the
catalogue's extra samples (q a strided third of a fused projection; BFL's (B, H, S, D) layout with
per-sample rotation matrices), where cpu and cuda must serve them with their fused kernel (strict)."""

import pytest
import torch
from op_checks import SHAPE_IDS, check_op, on  # noqa: F401  (the backend fixture)

from flux_npu import ops
from flux_npu.ops import catalogue

KERNEL = {"cpu": "torch.rms_norm+complex_mul", "cuda": "triton.qk_norm_rope"}


@pytest.mark.parametrize("shape", SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qk_norm_rope(on, dtype, shape):  # noqa: F811
    check_op("qk_norm_rope", on, dtype, shape)


@pytest.mark.parametrize("shape", list(catalogue.info("qk_norm_rope").extra_samples))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_qk_norm_rope_extra(on, dtype, shape, monkeypatch):  # noqa: F811
    name = on[0].name
    ops.set_strict(name in KERNEL)  # a fallback raises
    launches = []
    if name == "cuda":  # record the Triton launches: q and k go in one launch each way
        from flux_npu.kernels.cuda import _triton

        real = _triton.launch

        def recording(kernel):
            launches.append(kernel.fn.__name__)
            return real(kernel)

        monkeypatch.setattr(_triton, "launch", recording)
    check_op("qk_norm_rope", on, dtype, shape, grad_scale=1.0)  # the old per-backend tests' tolerance
    if name in KERNEL:
        assert ops.dispatch_stats()["served"][("qk_norm_rope", name, KERNEL[name])] == 1
    if name == "cuda":
        assert launches == ["_rope_fwd", "_rope_bwd"], launches
