"""The cuda backend: its probe, its op table, and its kernels on the `device` fixture's tensors
(CUDA with Triton compiled when a GPU is present, else CPU tensors through
`BACKEND.with_device_type("cpu")` and Triton's interpreter): which kernel serves each op, why
kernels decline, and that a patched Flux model gives the unpatched model's output."""

import os
import subprocess
import sys

import pytest
import torch

from flux_npu import ops
from flux_npu.backends import cuda as cuda_backend
from flux_npu.kernels.cuda import _checks
from flux_npu.ops import reference
from flux_npu.testing import assert_close

CUDA = cuda_backend.BACKEND
ON_CPU = CUDA.with_device_type("cpu")
needs_triton = pytest.mark.skipif(_checks.triton_import_error() is not None, reason="triton not installed")


@pytest.fixture
def kernels(device):
    """The cuda backend bound to the test device: itself on a GPU, else its code path on CPU tensors."""
    return CUDA if device.type == "cuda" else ON_CPU


def test_probe_and_description():
    assert CUDA.dist_backend == "nccl" and CUDA.autocast_device_type == "cuda"
    assert CUDA.option("min_compute_capability") == (7, 0)
    reason = CUDA.unavailable_reason()
    if torch.cuda.is_available() and torch.version.cuda:
        assert reason is None and cuda_backend.compute_capability() is not None
    else:
        assert "torch.cuda.is_available() is False" in reason or "no CUDA runtime" in reason
        assert cuda_backend.compute_capability() is None


def test_probe_rejects_transfer_to_npu(monkeypatch):
    """transfer_to_npu makes torch.cuda.is_available() True on Ascend: no CUDA runtime -> reason."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "no CUDA runtime" in cuda_backend._probe()


def _inputs(dtype=torch.float32, device="cpu"):
    torch.manual_seed(7)
    B, S, H, D = 2, 11, 3, 32
    q = torch.randn(B, S, 3 * H * D, dtype=dtype).to(device).chunk(3, -1)[0].unflatten(-1, (H, D))
    k = torch.randn(B, S, H, D, dtype=dtype).to(device)
    cs = tuple(t.float().to(device) for t in reference.rope_freqs(torch.arange(S).float(), D, form="cos_sin"))
    pe = reference.rope_freqs(torch.arange(S).float()[None], D, form="bfl").unsqueeze(1).float().to(device)
    return q, k, cs, pe


def _c64(t):
    return t.cpu().double() if isinstance(t, torch.Tensor) else tuple(x.cpu().double() for x in t)


@needs_triton
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ops_are_served_by_triton_kernels(dtype, device, kernels):
    q, k, cs, pe = _inputs(dtype, device)
    w = torch.randn(q.shape[-1], dtype=dtype).to(device)
    x = torch.randn(2, 9, 80, dtype=dtype).to(device)
    shift, scale = torch.randn(2, 1, 80, dtype=dtype).to(device), torch.randn(2, 1, 80, dtype=dtype).to(device)
    ops.set_strict(True)  # a declining kernel would raise instead of falling back
    q64, k64, w64, x64 = _c64(q), _c64(k), _c64(w), _c64(x)
    got = {
        "rms_norm": (ops.rms_norm(q, w, 1e-6, backend=kernels), reference.rms_norm(q64, w64, 1e-6)),
        "apply_rope": (ops.apply_rope(q, cs, 1, backend=kernels), reference.apply_rope(q64, _c64(cs), 1)),
        "apply_rope/bfl": (
            ops.apply_rope(k.transpose(1, 2), pe, backend=kernels), reference.apply_rope(k64.transpose(1, 2), _c64(pe)),
        ),
        "layer_norm_modulate": (
            ops.layer_norm_modulate(x, shift, scale, 1e-6, backend=kernels),
            reference.layer_norm_modulate(x64, _c64(shift), _c64(scale), 1e-6),
        ),
        "attention": (
            ops.attention(q, k, k, layout="BSHD", backend=kernels), reference.attention(q64, k64, k64, layout="BSHD"),
        ),
    }
    yq, yk = ops.qk_norm_rope(q, k, w, None, cs, 1e-6, 1, backend=kernels)
    rq, rk = reference.qk_norm_rope(q64, k64, w64, None, _c64(cs), 1e-6, 1)
    got["qk_norm_rope/q"], got["qk_norm_rope/k"] = (yq, rq), (yk, rk)
    for name, (out, ref) in got.items():
        assert out.dtype == dtype and out.device == q.device
        assert_close(out, ref, dtype, what=name)
    served = ops.dispatch_stats()["served"]
    assert served[("rms_norm", "cuda", "triton.rms_norm")] == 1
    assert served[("apply_rope", "cuda", "triton.rope")] == 2
    assert served[("qk_norm_rope", "cuda", "triton.qk_norm_rope")] == 1
    assert served[("layer_norm_modulate", "cuda", "triton.layer_norm_modulate")] == 1
    assert served[("attention", "cuda", "torch.sdpa")] == 1
    assert not ops.dispatch_stats()["fallback"]
    from flux_npu.kernels.cuda.attention import last_sdpa_choices

    assert any(key[0] == device.type and key[1] == dtype for key in last_sdpa_choices())


def _reason(op, *args, backend=ON_CPU):
    name, reasons = ops.explain(op, backend, *args)
    assert name is None, f"{op} unexpectedly served by {name}"
    return "; ".join(reasons)


def test_kernels_decline_with_reasons(monkeypatch):
    """The checks on CPU tensors (the interpreter's case; on a GPU host the variable is set here:
    checks only, nothing is launched)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, cs, pe = _inputs()
    assert "float64" in _reason("rms_norm", q.double(), None, 1e-6, None)
    assert "empty" in _reason("rms_norm", torch.randn(2, 0, 16), None, 1e-6, None)
    assert "device 'meta'" in _reason("rms_norm", q.to("meta"), None, 1e-6, None)
    long_row = torch.empty(2, 16385, device="meta")
    meta = CUDA.with_device_type("meta")
    assert "longer than one block" in _reason("rms_norm", long_row, None, 1e-6, None, backend=meta)
    x = torch.randn(2, 5, 16)
    shift = scale = torch.randn(1, 5, 16)
    assert "constant after them" in _reason("layer_norm_modulate", x, shift, scale, 1e-6)
    cs_grad = (cs[0].clone().requires_grad_(), cs[1])
    assert "require grad" in _reason("apply_rope", q, cs_grad, 1)
    assert "at most 4" in _reason("apply_rope", torch.randn(1, 2, 3, 11, 8), pe[..., :4, :, :], 2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in _reason("apply_rope", q, cs, 1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_checks, "triton_import_error", lambda: "triton is not importable (test)")
    assert "not importable" in _reason("qk_norm_rope", q, k, None, None, cs, 1e-6, 1)


def test_strict_mode_raises_with_reason():
    ops.set_strict(True)
    with pytest.raises(ops.KernelDeclined, match="float64"):
        ops.rms_norm(torch.randn(3, 8, dtype=torch.float64), backend=ON_CPU)
    ops.set_strict(False)
    out = ops.rms_norm(torch.randn(3, 8, dtype=torch.float64), backend=ON_CPU)
    assert out.dtype == torch.float64
    assert any("float64" in key[2] for key in ops.dispatch_stats()["fallback"])


def test_routing_report_on_meta_tensors():
    """`flux-npu info` asks the cuda backend's checks about meta tensors at Flux shapes."""
    from flux_npu.report import op_routing

    rows = {(op, preset): (kernel, why) for op, preset, kernel, why in op_routing(CUDA)}
    for op, kernel in [
        ("rms_norm", "triton.rms_norm"),
        ("apply_rope", "triton.rope"),
        ("qk_norm_rope", "triton.qk_norm_rope"),
        ("layer_norm_modulate", "triton.layer_norm_modulate"),
        ("attention", "torch.sdpa"),
        ("gated_residual", "torch.addcmul"),
    ]:
        for preset in ("flux-dev", "flux-mini", "tiny"):
            assert rows[(op, preset)][0] == kernel, (op, preset, rows[(op, preset)])


def test_package_imports_without_triton():
    """flux_npu and the cuda kernel registrations import with triton absent; kernels say why."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, flux_npu\n"
        "from flux_npu import ops\n"
        "from flux_npu.backends.cuda import BACKEND\n"
        "b = BACKEND.with_device_type('cpu')\n"
        "name, reasons = ops.explain('rms_norm', b, torch.randn(2, 8), None, 1e-6, None)\n"
        "assert name is None and 'not importable' in reasons[0], reasons\n"
        "meta = BACKEND.with_device_type('meta')\n"
        "name, reasons = ops.explain('rms_norm', meta, torch.empty(1, 4, 2, 8, device='meta'), None, 1e-6, None)\n"
        "assert name is None and 'not installed' in reasons[0], reasons\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@needs_triton
@pytest.mark.triton
def test_patched_tiny_flux_matches_stock(device, kernels):
    """A diffusers Flux model patched onto the cuda backend's kernels (on the test device) gives
    the stock model's output and input gradient."""
    import flux_npu
    from flux_npu.models import build_diffusers_flux, make_inputs, preset_config

    model = build_diffusers_flux("tiny", device=device)
    inputs = make_inputs(preset_config("tiny"), resolution=64, text_len=5, seed=3, requires_grad=True, device=device)
    ref = model(**inputs.as_kwargs()).sample
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), inputs.hidden_states)
    handle = flux_npu.patch(backend=kernels, targets=["diffusers"])
    try:
        out = model(**inputs.as_kwargs()).sample
        (grad,) = torch.autograd.grad(out.square().sum(), inputs.hidden_states)
    finally:
        handle.undo()
    served = ops.dispatch_stats()["served"]
    assert served[("rms_norm", "cuda", "triton.rms_norm")] > 0
    assert served[("apply_rope", "cuda", "triton.rope")] > 0
    assert served[("layer_norm_modulate", "cuda", "triton.layer_norm_modulate")] > 0
    # both streams of every double block: the fused gated residual + AdaLN kernel
    assert served[("adaln_residual", "cuda", "triton.adaln_residual")] == 2 * len(model.transformer_blocks)
    assert_close(out, ref, torch.float32, scale=10, what="patched model output")
    assert_close(grad, ref_grad, torch.float32, scale=10, what="patched model input grad")
