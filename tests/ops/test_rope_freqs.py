"""rope_freqs on every backend (cpu, cuda via the `device` fixture, npu on the emulator) against the
catalogue's float64 reference, forward and backward (tests/op_checks.py); then building them without
float64 (a backend without it, the npu rule) and the precision that leaves at Flux positions."""

import pytest
import torch
from npu_emulator.guards import Float64Watch
from op_checks import SHAPE_IDS, check_op, on  # noqa: F401  (the backend fixture)
from torch.utils._python_dispatch import TorchDispatchMode

from flux_npu import models, ops
from flux_npu.backends import Backend, npu
from flux_npu.ops import reference
from flux_npu.testing import assert_close, max_abs_err, rel_err


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


@pytest.mark.parametrize("n_pos", [64, 128])
def test_rope_freqs_float32_precision_at_flux_shapes(n_pos):
    """Flux-dev RoPE: axes (16, 56, 56), theta 1e4, image positions 0..n_pos-1 per axis (64 at
    1024 px, 128 at 2048 px). Built in float32 on an npu-owned tensor vs the float64 reference;
    also the error this leaves in rotated queries (head dim 128)."""
    backend = npu.BACKEND.with_device_type("cpu")  # the npu precision rule on CPU tensors
    side = n_pos
    ids = torch.cat([torch.zeros(16, 3), models.image_ids(side * 16)])  # 16 text tokens at position 0
    axes = (16, 56, 56)
    with Float64Watch() as watch:
        got = [ops.rope_freqs(ids[:, i], d, 10000.0, form="cos_sin", backend=backend) for i, d in enumerate(axes)]
    assert watch.ops == []  # no float64 anywhere: the device has none
    want = [ops.reference.rope_freqs(ids[:, i], d, 10000.0, form="cos_sin") for i, d in enumerate(axes)]
    cos32, sin32 = (torch.cat([g[j] for g in got], -1) for j in (0, 1))
    cos64, sin64 = (torch.cat([w[j] for w in want], -1) for j in (0, 1))
    errs = dict(cos=rel_err(cos32, cos64), sin=rel_err(sin32, sin64),
                max_abs=max(max_abs_err(cos32, cos64), max_abs_err(sin32, sin64)))
    q = torch.randn(1, ids.shape[0], 4, 128, generator=torch.Generator().manual_seed(0))
    errs["rotated_q"] = rel_err(ops.reference.apply_rope(q, (cos32, sin32), 1),
                                ops.reference.apply_rope(q, (cos64, sin64), 1))
    print(f"rope_freqs float32 vs float64, positions < {n_pos}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert errs["cos"] <= 1e-5 and errs["sin"] <= 1e-5 and errs["rotated_q"] <= 1e-5
    assert errs["max_abs"] <= 2e-5
    assert errs["max_abs"] > 0  # float32 really was used (the float64 path would match exactly)
    assert_close(cos32, cos64, torch.float32)
