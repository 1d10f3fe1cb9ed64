"""The cuda backend's kernels (on the `device` fixture: CUDA tensors and compiled Triton on a GPU
host, else CPU tensors through the interpreter) and the cpu backend's kernels agree with the
float64 reference (computed on the CPU), forward and backward, through the public ops and at the
call shapes the patches use. This also covers the CPU kernels this layer tunes (e.g. the
composed CPU qk_norm_rope)."""

import pytest
import torch

from flux_npu import ops
from flux_npu.backends import cpu as cpu_backend
from flux_npu.backends import cuda as cuda_backend
from flux_npu.kernels.cuda import _checks
from flux_npu.ops import reference
from flux_npu.testing import assert_close

BACKENDS = {
    "cpu": cpu_backend.BACKEND,
    "cuda": cuda_backend.BACKEND,  # bound to CPU tensors (interpreter) when the device is cpu
}
EXPECTED = {
    ("cpu", "qk_norm_rope"): "torch.rms_norm+complex_mul",
    ("cuda", "qk_norm_rope"): "triton.qk_norm_rope",
}


@pytest.fixture(params=list(BACKENDS), ids=list(BACKENDS))
def backend_name(request):
    if request.param == "cuda" and _checks.triton_import_error():
        pytest.skip("triton not installed")
    return request.param


@pytest.fixture
def on(backend_name, device):
    """(backend, tensor device) of the case: the cpu backend on CPU tensors; the cuda backend on
    the test device (itself on a GPU, its code path on CPU tensors under the interpreter)."""
    if backend_name == "cpu":
        return BACKENDS["cpu"], torch.device("cpu")
    b = BACKENDS["cuda"]
    return (b if device.type == "cuda" else b.with_device_type("cpu")), device


def _grads(outs, leaves, seed):
    torch.manual_seed(seed)
    total = sum((o.float() * torch.randn(o.shape).to(o.device)).sum() for o in outs)
    return torch.autograd.grad(total, leaves)


def _c64(t):
    return t.detach().cpu().double().requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", ["cos_sin", "bfl"])
def test_qk_norm_rope_parity(backend_name, on, form, dtype):
    backend, dev = on
    torch.manual_seed(11)
    B, S, H, D = 2, 13, 3, 40
    if form == "cos_sin":
        q = torch.randn(B, S, 3 * H * D, dtype=dtype).to(dev).chunk(3, -1)[0].unflatten(-1, (H, D))
        k = torch.randn(B, S, H, D, dtype=dtype)
        freqs, seq = reference.rope_freqs(torch.arange(S).float() * 3, D, form="cos_sin"), 1
    else:
        q, k = torch.randn(B, H, S, D, dtype=dtype).to(dev), torch.randn(B, H, S, D, dtype=dtype)
        freqs, seq = reference.rope_freqs(torch.rand(B, S) * 50, D, form="bfl").unsqueeze(1), 2
    q, k = q.detach().requires_grad_(), k.to(dev).requires_grad_()
    qw = torch.randn(D, dtype=dtype).to(dev).requires_grad_()
    kw = torch.randn(D, dtype=dtype).to(dev).requires_grad_()
    f64 = freqs.double() if isinstance(freqs, torch.Tensor) else tuple(t.double() for t in freqs)
    freqs = freqs.float().to(dev) if isinstance(freqs, torch.Tensor) else tuple(t.float().to(dev) for t in freqs)
    ops.set_strict(True)
    outs = ops.qk_norm_rope(q, k, qw, kw, freqs, 1e-6, seq, backend=backend)
    grads = _grads(outs, (q, k, qw, kw), 5)
    leaves64 = [_c64(t) for t in (q, k, qw, kw)]
    refs = reference.qk_norm_rope(*leaves64, f64, 1e-6, seq)
    ref_grads = _grads(refs, leaves64, 5)
    for name, o, r in zip(("q", "k"), outs, refs, strict=False):
        assert o.dtype == dtype and o.device.type == dev.type
        assert_close(o, r, dtype, what=f"{backend_name} {name}")
    for name, g, r in zip(("q", "k", "q_weight", "k_weight"), grads, ref_grads, strict=False):
        assert_close(g, r, dtype, what=f"{backend_name} grad {name}")
    served = ops.dispatch_stats()["served"]
    assert served[("qk_norm_rope", backend.name, EXPECTED[(backend_name, "qk_norm_rope")])] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_ops_parity(backend_name, on, dtype):
    """rms_norm, apply_rope and layer_norm_modulate as a Flux block calls them, fwd and bwd."""
    backend, dev = on
    torch.manual_seed(3)
    B, S, H, D, hidden = 1, 17, 2, 48, 96
    q = torch.randn(B, S, H * D, dtype=dtype).to(dev).unflatten(-1, (H, D)).detach().requires_grad_()
    w = torch.randn(D, dtype=dtype).to(dev).requires_grad_()
    cs64 = reference.rope_freqs(torch.arange(S).float(), D, form="cos_sin")
    x = torch.randn(B, S, hidden, dtype=dtype).to(dev).requires_grad_()
    emb = torch.randn(B, 2 * hidden, dtype=dtype).to(dev).requires_grad_()
    shift, scale = emb.chunk(2, dim=1)
    ops.set_strict(True)

    def run(fns, q, w, x, shift, scale):
        cs = tuple(t.to(q.device, torch.float32 if q.dtype != torch.float64 else torch.float64) for t in cs64)
        return (
            fns.apply_rope(fns.rms_norm(q, w, 1e-6), cs, 1),
            fns.layer_norm_modulate(x, shift[:, None], scale[:, None], 1e-6),
        )

    class Ours:
        rms_norm = staticmethod(lambda a, b, e: ops.rms_norm(a, b, e, backend=backend))
        apply_rope = staticmethod(lambda a, f, s: ops.apply_rope(a, f, s, backend=backend))
        layer_norm_modulate = staticmethod(lambda a, b, c, e: ops.layer_norm_modulate(a, b, c, e, backend=backend))

    outs = run(Ours, q, w, x, shift, scale)
    grads = _grads(outs, (q, w, x, emb), 9)
    leaves = [_c64(t) for t in (q, w, x, emb)]
    sh64, sc64 = leaves[3].chunk(2, dim=1)
    refs = run(reference, leaves[0], leaves[1], leaves[2], sh64, sc64)
    ref_grads = _grads(refs, leaves, 9)
    for name, o, r in zip(("rope(rms_norm(q))", "layer_norm_modulate"), outs, refs, strict=False):
        assert_close(o, r, dtype, scale=2, what=f"{backend_name} {name}")  # two roundings in a row
    for name, g, r in zip(("q", "weight", "x", "emb"), grads, ref_grads, strict=False):
        assert_close(g, r, dtype, scale=2, what=f"{backend_name} grad {name}")
    assert not ops.dispatch_stats()["fallback"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("weight", ["same", "float32", None])
def test_cpu_rms_norm_inference_path(dtype, weight):
    """The CPU rms_norm's no-grad fast path (vector_norm + scaling) against the float64 reference,
    including a float32 weight on a half input (BFL RMSNorm's promote(x, scale) output)."""
    torch.manual_seed(21)
    x = torch.randn(3, 7, 2, 48, dtype=dtype) * 4
    w = None if weight is None else torch.randn(48, dtype=dtype if weight == "same" else torch.float32)
    out_dtype = None if w is None else torch.promote_types(dtype, w.dtype)
    with torch.no_grad():
        y = ops.rms_norm(x, w, 1e-6, out_dtype, backend=BACKENDS["cpu"])
    ref = reference.rms_norm(x.double(), None if w is None else w.double(), 1e-6)
    assert y.dtype == (out_dtype or dtype)
    assert_close(y, ref, dtype, what="cpu rms_norm (no grad)")
    assert ops.dispatch_stats()["served"][("rms_norm", "cpu", "torch.rms_norm")] == 1
