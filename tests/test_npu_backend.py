"""The npu backend around its kernels: what happens without torch_npu (the normal case on this
machine), what `flux-npu info` says, the checks on meta tensors, transfer_to_npu, per-SoC
capabilities, install/uninstall of the contract emulator. (The precision RoPE frequencies keep when
built in float32 on the npu is tests/ops/test_rope_freqs.py's.)"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from npu_emulator import record

import flux_npu
from flux_npu import ops, report
from flux_npu.backends import BackendError, get_backend
from flux_npu.backends import npu as npu_backend
from flux_npu.patches.transfer import MODULE as TRANSFER_MODULE

FUSED = {"attention": "torch_npu.npu_fusion_attention", "apply_rope": "torch_npu.npu_rotary_mul",
         "rms_norm": "torch_npu.npu_rms_norm"}

no_torch_npu = pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None,
                                  reason="a real torch_npu is installed here")


@no_torch_npu
def test_without_torch_npu_get_backend_names_the_import_failure():
    npu_backend.reset_runtime_cache()
    with pytest.raises(BackendError) as err:
        get_backend("npu")
    msg = str(err.value)
    assert "'npu'" in msg and "torch_npu not importable: ModuleNotFoundError" in msg
    assert "FLUX_NPU_BACKEND" in msg  # names the fix: pick another backend
    assert "npu" not in flux_npu.available_backends()
    caps = npu_backend.soc_capabilities()
    assert caps["available"] is False and "torch_npu not importable" in caps["reason"]
    assert npu_backend.capability_rows()[0][1].startswith("none (torch_npu not importable")


@no_torch_npu
def test_without_torch_npu_meta_checks_give_the_reason():
    """`flux-npu info` routing runs the checks on meta tensors: each fused op's reason is the import."""
    npu_backend.reset_runtime_cache()
    rows = {(op, preset): (kernel, why) for op, preset, kernel, why in report.op_routing(npu_backend.BACKEND)}
    for op, kernel in FUSED.items():
        for preset in ("flux-dev", "flux-mini", "tiny"):
            got, why = rows[(op, preset)]
            assert got == "reference" and f"{kernel}: torch_npu not importable" in why, (op, preset, why)


@no_torch_npu
def test_info_cli_shows_why_npu_is_unavailable():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FLUX_NPU_BACKEND", None)
    out = subprocess.run([sys.executable, "-m", "flux_npu", "info", "--backend", "npu"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    npu_row = next(line for line in out.stdout.splitlines() if line.startswith("npu "))
    assert "no" in npu_row.split() and "torch_npu not importable: ModuleNotFoundError" in npu_row
    assert "torch_npu.npu_fusion_attention: torch_npu not importable" in out.stdout


@pytest.mark.emulator
def test_emulator_meta_checks_serve_flux_shapes(npu_emulated):
    """With torch_npu present, the checks accept Flux-dev / Flux-mini / tiny shapes on meta
    tensors without calling any op (no allocation, no host sync)."""
    rows = report.op_routing(npu_emulated)
    # the routing samples need no backward: inference attention is FIA's (training: FA, below)
    fused = dict(FUSED, attention="torch_npu.npu_fused_infer_attention_score")
    for op, preset, kernel, why in rows:
        if op in fused:
            assert kernel == fused[op], (op, preset, why)
    meta = npu_emulated.with_device_type("meta")
    for S in (4096 + 512, 1024 + 512):  # flux-dev / flux-mini token counts, 24 heads of 128
        q = torch.empty(1, 24, S, 128, device="meta", dtype=torch.bfloat16, requires_grad=True)
        kernel, reasons = ops.explain("attention", meta, q, q, q, None, None, "BHSD")
        assert kernel == FUSED["attention"] and "a backward is needed" in reasons[0], reasons
    assert record.calls() == []


@pytest.mark.emulator
def test_emulator_install_and_uninstall(monkeypatch):
    from npu_emulator.install import emulated_npu_backend

    monkeypatch.delenv("FLUX_NPU_BACKEND", raising=False)
    with emulated_npu_backend() as backend:
        assert backend.name == "npu" and backend.device_type == "cpu" and not backend.supports_float64
        real = get_backend("npu")  # the probe passes through the emulated torch.npu
        assert real.device_type == "npu" and real.dist_backend == "hccl" and real.autocast_device_type == "npu"
        assert "Ascend910B2 (emulated)" in real.utils.device_name()
        caps = npu_backend.soc_capabilities()
        got = (caps["soc"], caps["bf16"], caps["fusion_attention"], caps["rotary_interleave"])
        assert got == ("A2", True, True, True)
        # tensors on the CPU are not the real backend's: its kernels decline them by device
        x = torch.randn(2, 8)
        ops.rms_norm(x, torch.ones(8), backend=real)
        (reason,) = [r for (op, _b, r) in ops.dispatch_stats()["fallback"] if op == "rms_norm"]
        assert "tensor on device 'cpu'; backend npu takes 'npu' tensors" in reason
    assert "torch_npu" not in sys.modules and not hasattr(torch, "npu")
    assert importlib.util.find_spec("torch_npu") is None
    assert get_backend().name == "cpu"
    assert "npu" not in flux_npu.available_backends()


@pytest.mark.parametrize("name,family", [("Ascend910B2", "A2"), ("Ascend910B4-1", "A2"), ("Ascend910_9391", "A3"),
                                         ("Ascend910A", "910A"), ("Ascend910ProB", "910A"), ("Ascend310P3", "310P"),
                                         ("Something", "unknown")])
def test_soc_family(name, family):
    assert npu_backend.soc_family(name) == family


# -- transfer_to_npu ---------------------------------------------------------------------------------


def _transfer_row(handle):
    (row,) = [r for r in handle.report() if r.target == TRANSFER_MODULE]
    return row


@pytest.mark.emulator
def test_emulator_transfer_to_npu_imported_and_reported(npu_emulated):
    with flux_npu.patch(backend=npu_emulated, targets=["bfl"]) as handle:
        assert not [r for r in handle.report() if r.target == TRANSFER_MODULE]
    assert not record.calls("contrib.transfer_to_npu")  # never without asking
    with flux_npu.patch(backend=npu_emulated, targets=["bfl"], transfer_to_npu=True) as handle:
        row = _transfer_row(handle)
        assert row.status == "patched" and "not undoable" in row.reason and "nccl -> hccl" in row.reason
        assert TRANSFER_MODULE in handle.report_table()
    assert len(record.calls("contrib.transfer_to_npu")) == 1


def test_transfer_to_npu_only_on_npu():
    with flux_npu.patch(backend="cpu", targets=["bfl"], transfer_to_npu=True) as handle:
        row = _transfer_row(handle)
        assert row.status == "skipped" and "only for the npu backend (active: cpu)" in row.reason


@no_torch_npu
def test_transfer_to_npu_without_torch_npu_is_skipped_with_reason():
    with flux_npu.patch(backend=npu_backend.BACKEND, targets=["bfl"], transfer_to_npu=True) as handle:
        row = _transfer_row(handle)
        assert row.status == "skipped" and "cannot import torch_npu.contrib.transfer_to_npu" in row.reason
        assert "ModuleNotFoundError" in row.reason
