"""Backend registry: selection order, clear errors, third-party backends, device utilities."""

import dataclasses

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


def test_mixed_case_backend_name_is_refused_and_lookups_ignore_case():
    """A backend registered as 'Acme' used to be listed but impossible to fetch."""
    mixed = Backend("Acme", "cpu", lambda: None, frozenset({torch.float32}), False, "gloo", "cpu")
    with pytest.raises(BackendError, match="lower case.*register it as 'acme'"):
        flux_npu.register_backend(mixed)
    assert "Acme" not in [b.name for b in flux_npu.backends.registered_backends()]
    with pytest.raises(ValueError, match="lower case"):
        ops.register_kernel("rms_norm", "Acme", "acme.rms")
    assert flux_npu.get_backend(" CPU ").name == "cpu"


def test_kernel_module_that_fails_to_import_is_a_reason_every_call(tmp_path, monkeypatch):
    """The import error used to surface once; later calls silently ran the reference."""
    (tmp_path / "broken_kernels_mod.py").write_text("raise ImportError('libfoo.so: cannot open shared object')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = Backend("brokenk", "cpu", lambda: None, frozenset({torch.float32}), True, "gloo", "cpu",
                     kernel_modules=("broken_kernels_mod",))
    flux_npu.register_backend(broken)
    try:
        x = torch.randn(2, 8)
        for _ in range(2):
            out = ops.rms_norm(x, None, backend="brokenk")
            assert torch.equal(out, ops.reference.rms_norm(x, None))
        (reason, n), = [(r, n) for (op, b, r), n in ops.dispatch_stats()["fallback"].items() if b == "brokenk"]
        assert n == 2 and "broken_kernels_mod failed to import" in reason and "libfoo.so" in reason
        assert "libfoo.so" in ops.explain("rms_norm", broken, x, None, 1e-6, None)[1][0]
        ops.set_strict(True)
        with pytest.raises(ops.KernelDeclined, match="libfoo.so"):
            ops.rms_norm(x, None, backend="brokenk")
    finally:
        unregister_backend("brokenk")


# -- cuda: attention routed around known-bad SDPA backends (pure functions, faked inputs) -----------


def test_sdpa_route_excludes_cudnn_for_training_on_sm90_since_torch_2_11():
    from flux_npu.backends.cuda import sdpa_route

    r = sdpa_route("2.11.0+cu130", (9, 0), training=True)
    assert r.backends == ("flash", "efficient", "math")
    assert "196678" in r.reason and "FLUX_NPU_SDPA_BACKENDS" in r.reason and "sm_90" in r.reason
    assert sdpa_route("2.13.0", (9, 0), training=True).backends == ("flash", "efficient", "math")  # no fix known
    for version, cc, training in (("2.11.0", (9, 0), False), ("2.10.2", (9, 0), True), ("2.11.0", (8, 0), True),
                                  ("2.11.0", None, True)):
        assert sdpa_route(version, cc, training).backends is None, (version, cc, training)


def test_sdpa_route_fact_with_a_fix_and_the_override():
    from flux_npu.backends.cuda import SDPA_FACTS, sdpa_route

    fixed = [dataclasses.replace(SDPA_FACTS[0], fixed_in=(2, 12))]
    assert sdpa_route("2.11.1", (9, 0), True, facts=fixed).backends == ("flash", "efficient", "math")
    assert sdpa_route("2.12.0", (9, 0), True, facts=fixed).backends is None
    r = sdpa_route("2.11.0", (9, 0), True, override="cudnn, FLASH")
    assert r.backends == ("cudnn", "flash") and "FLUX_NPU_SDPA_BACKENDS" in r.reason
    with pytest.raises(ValueError, match="unknown or no SDPA backends.*flash,efficient,math"):
        sdpa_route("2.11.0", (9, 0), True, override="cudnn,triton")


def test_cuda_attention_runs_under_the_routed_sdpa_backends():
    """The cuda kernel on CPU tensors with the route given as a backend option: an SDPA backend list
    CPU cannot serve makes SDPA refuse (proof the restriction is applied), math serves, and the
    routed call compiles without a graph break."""
    from flux_npu.backends import cuda as cuda_backend

    def routed(names):
        opts = tuple(o for o in cuda_backend.BACKEND.options if o[0] != "sdpa_backends")
        b = dataclasses.replace(cuda_backend.BACKEND, options=opts + (("sdpa_backends", names),))
        return b.with_device_type("cpu")

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    with pytest.raises(RuntimeError, match="No viable backend|No available kernel"):
        ops.attention(q, k, v, backend=routed(("efficient",)))
    b = routed(("math",))
    assert cuda_backend.route_for(b, None, True).reason.startswith("SDPA backends math (from backend option")
    out = ops.attention(q, k, v, backend=b)
    from flux_npu.testing import assert_close

    assert_close(out, ops.reference.attention(q.double(), k.double(), v.double()), torch.float32)
    compiled = torch.compile(lambda q, k, v: ops.attention(q, k, v, backend=b), backend="eager", fullgraph=True)
    assert_close(compiled(q, k, v), out.detach().double(), torch.float32)
    # the refused call and the math call went to the kernel; calls inside a compiled graph are not counted
    assert ops.dispatch_stats()["served"][("attention", "cuda", "torch.sdpa")] == 2


def test_sdpa_routing_is_in_the_cuda_capability_rows():
    from flux_npu.backends import cuda as cuda_backend

    rows = dict(cuda_backend.BACKEND.option("capability_rows")())
    assert "cudnn" in rows["sdpa routing (training)"] and "196678" in rows["known-bad sdpa"]
    assert cuda_backend.sdpa_routing_line(True)
