"""rope_freqs on every backend (cpu, cuda via the `device` fixture, npu on the emulator) against the
catalogue's float64 reference, forward and backward (tests/op_checks.py)."""

import pytest
import torch
from op_checks import SHAPE_IDS, check_op, on  # noqa: F401  (the backend fixture)
from torch.utils._python_dispatch import TorchDispatchMode

from flux_npu import ops
from flux_npu.backends import Backend
from flux_npu.ops import reference
from flux_npu.testing import rel_err


@pytest.mark.parametrize("shape", SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_freqs(on, dtype, shape):  # noqa: F811
    check_op("rope_freqs", on, dtype, shape)


class _RecordDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
        return out


def test_rope_freqs_without_float64_and_its_precision(seed):
    """A backend without float64 builds RoPE frequencies in float32: no float64 tensor is created,
    and the result stays within float32 tolerance of the float64 reference at Flux positions."""
    no_f64 = Backend("nof64", "cpu", lambda: None, frozenset({torch.float32}), False, "gloo", "cpu")
    side = torch.arange(128, dtype=torch.float32)  # 2048 px: 128 latent tokens per side
    for dim in (16, 56):
        with _RecordDtypes() as rec:
            f32 = ops.rope_freqs(side, dim, 10000.0, form="cos_sin", backend=no_f64)
        assert torch.float64 not in rec.dtypes
        f64 = reference.rope_freqs(side, dim, 10000.0, form="cos_sin", compute_dtype=torch.float64)
        for a, b in zip(f32, f64, strict=False):
            assert rel_err(a, b) < 1e-5
    with _RecordDtypes() as rec:
        ops.rope_freqs(side, 16, 10000.0, form="cos_sin", backend="cpu")
    assert torch.float64 in rec.dtypes  # the cpu backend keeps the BFL float64 maths
