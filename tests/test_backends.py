"""Backend registry: selection order, clear errors, third-party backends, device utilities."""

import pytest
import torch

import flux_npu
from flux_npu import ops
from flux_npu.backends import Backend, BackendError, selection_report, unregister_backend
from flux_npu.backends import cpu as cpu_backend


def test_cpu_is_available_and_auto_detected(monkeypatch):
    monkeypatch.delenv("FLUX_NPU_BACKEND", raising=False)
    assert "cpu" in flux_npu.available_backends()
    b = flux_npu.get_backend()
    # no NPU or GPU on CI machines: auto-detection must walk past both and say why
    if not torch.cuda.is_available():
        assert b.name == "cpu"
        rep = selection_report()
        assert rep["how"] == "auto-detect"
        skipped = dict(rep["skipped"])
        assert "torch_npu not importable" in skipped["npu"]
        assert "cuda" in skipped


def test_env_var_then_explicit_name(monkeypatch):
    monkeypatch.setenv("FLUX_NPU_BACKEND", "cpu")
    assert flux_npu.get_backend().name == "cpu"
    assert selection_report()["how"] == "env FLUX_NPU_BACKEND"
    monkeypatch.setenv("FLUX_NPU_BACKEND", "no-such-device")
    with pytest.raises(BackendError, match="unknown flux_npu backend 'no-such-device'.*from env FLUX_NPU_BACKEND"):
        flux_npu.get_backend()
    # an explicit name wins over the environment
    assert flux_npu.get_backend("cpu").name == "cpu"
    assert selection_report()["how"] == "explicit"


def test_unknown_backend_error_names_known_backends():
    with pytest.raises(BackendError) as info:
        flux_npu.get_backend("tpu")
    msg = str(info.value)
    for name in ("npu", "cuda", "cpu"):
        assert name in msg


def test_unavailable_npu_error_carries_import_failure():
    # torch_npu is absent on CI machines (it needs Ascend's CANN)
    with pytest.raises(BackendError, match=r"'npu'.*not available here: torch_npu not importable: .*torch_npu"):
        flux_npu.get_backend("npu")


def test_backend_capabilities():
    b = flux_npu.get_backend("cpu")
    assert b.dist_backend == "gloo" and b.autocast_device_type == "cpu" and b.supports_float64
    npu = flux_npu.backends.npu.BACKEND
    assert npu.dist_backend == "hccl" and npu.autocast_device_type == "npu"
    assert not npu.supports_float64 and torch.float64 not in npu.dtypes
    cuda = flux_npu.backends.cuda.BACKEND
    assert cuda.dist_backend == "nccl" and cuda.autocast_device_type == "cuda"
    assert set(ops.fused_ops(b)) >= {"attention", "apply_rope", "rms_norm", "layer_norm_modulate"}


def test_third_party_backend_registers_detects_and_serves(monkeypatch):
    monkeypatch.delenv("FLUX_NPU_BACKEND", raising=False)  # auto-detection is what this tests
    calls = []
    mine = Backend(
        name="acme",
        device_type="cpu",
        probe=lambda: None,
        dtypes=frozenset({torch.float32}),
        supports_float64=False,
        dist_backend="gloo",
        autocast_device_type="cpu",
        priority=1,  # ahead of npu/cuda/cpu in auto-detection
    )
    flux_npu.register_backend(mine)
    try:
        with pytest.raises(BackendError, match="already registered"):
            flux_npu.register_backend(mine)
        assert flux_npu.get_backend().name == "acme"

        @ops.register_kernel("rms_norm", "acme", "acme.rms")
        def _acme_rms(backend, x, weight, eps, out_dtype):
            calls.append(x.shape)
            return ops.reference.rms_norm(x, weight, eps, out_dtype)

        x = torch.randn(3, 8)
        ops.rms_norm(x, torch.ones(8), backend="acme")
        assert calls == [torch.Size([3, 8])]
        assert ops.dispatch_stats()["served"][("rms_norm", "acme", "acme.rms")] == 1
    finally:
        unregister_backend("acme")
    assert flux_npu.get_backend().name != "acme"


def test_probe_that_crashes_is_a_reason_not_a_crash():
    def boom():
        raise OSError("driver exploded")

    b = Backend("broken", "cpu", boom, frozenset(), False, "gloo", "cpu")
    assert b.unavailable_reason() == "probe failed: OSError: driver exploded"
    assert not b.available


def test_cpu_device_utils_time_and_memory():
    u = cpu_backend.BACKEND.utils
    t = u.timer()
    t.start()
    torch.randn(256, 256) @ torch.randn(256, 256)
    assert t.stop() > 0
    u.reset_peak_memory()
    before = u.peak_memory_bytes()
    big = torch.ones(64 * 1024 * 1024 // 4 * 4)  # 64 MiB, written so it is resident
    big.add_(1)
    after = u.peak_memory_bytes()
    assert after - before >= 32 * 1024 * 1024
    del big
    u.synchronize()  # no-op on CPU, must not raise
    assert isinstance(u.device_name(), str) and u.device_name()
