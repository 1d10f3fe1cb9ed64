"""Kernel capabilities as data (kernels/caps.py): the common decline reasons are derived from each
kernel's declaration, and `flux-npu info` prints the declarations."""

import torch

from flux_npu import ops, report
from flux_npu.backends import cuda, npu
from flux_npu.kernels.caps import Caps
from flux_npu.ops import catalogue, registry


def test_reasons_come_from_the_declaration():
    from flux_npu.backends import cpu

    caps = Caps("lib", dtypes=(torch.float32,), dtype_note=" (f32 only)", max_row=8, nonempty=True)
    b = cpu.BACKEND
    assert caps.reason(b, torch.zeros(2, 4)) is None
    assert caps.reason(b, torch.zeros(2, 4, dtype=torch.float16)) == "dtype torch.float16 (f32 only)"
    assert caps.reason(b, torch.zeros(2, 4, device="meta")).startswith("tensor on device 'meta'")
    assert caps.reason(b, torch.zeros(0, 4)) == "empty tensor (nothing to launch)"
    assert "longer than one block holds (8)" in caps.reason(b, torch.zeros(2, 9), row=9)
    assert caps.reason(b, torch.zeros(2, 4, dtype=torch.bool)) is None  # masks: dtype rule is for floats
    lib = caps.using(library=lambda backend, device_type, op: f"no {op}", vendor_op="fused", library_first=True)
    assert lib.reason(b, torch.zeros(2, 4, dtype=torch.float16)) == "no fused"  # library first
    assert lib.describe() == "lib.fused; dtypes f32; rows <= 8; non-empty"


def test_fused_kernels_of_cuda_and_npu_declare_capabilities_their_checks_use():
    """Every fused (non-composed, non-SDPA) kernel declares caps, and a float64 input is declined
    with the declaration's own dtype words."""
    x = torch.zeros(2, 5, 16, dtype=torch.float64, device="meta")
    for backend in (cuda.BACKEND.with_device_type("meta"), npu.BACKEND.with_device_type("meta")):
        for op in ("rms_norm", "layer_norm_modulate"):
            for k in registry.kernels_for(op, backend):
                assert k.caps is not None, (backend.name, op, k.name)
        k = registry.kernels_for("rms_norm", backend)[0]
        why = k.why_not(backend, x, None, 1e-6, None)
        assert why is not None and ("torch_npu not importable" in why or k.caps.dtype_note in why), why


def test_info_lists_the_declared_capabilities():
    data = report.collect(backend="cuda")
    rows = {r[0]: r[1] for b in data["backends"] if b["name"] == "cuda" for r in b.get("capabilities", [])}
    assert rows["rms_norm: triton.rms_norm"] == "triton; dtypes f32,bf16,f16; rows <= 16384; non-empty"
    assert all(op in catalogue.OPS for op in (k.split(":")[0] for k in rows if ":" in k))
    assert ops.OPS == catalogue.OPS
