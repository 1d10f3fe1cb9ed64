"""The torch_npu contract details issue 17 found by reading the 2.14.0 wheel, each closed on the
npu code path and tested through the CONTRACT EMULATOR (tests/npu_emulator: CPU tensors, never a
hardware result):

- npu_rms_norm takes gamma in x's dtype; a float32 weight (Flux's QK-norm scales in full
  fine-tuning) must still get a float32 gradient that never went through bf16;
- npu_rotary_mul's interleave mode exists only with jit_compile=False: the RoPE check declines it
  under jit_compile=True with the reason;
- no-grad (inference) attention runs npu_fused_infer_attention_score (FIA, inference-only, no
  backward) where its documented limits hold, and npu_fusion_attention everywhere else.
Every comparison is against a float64 plain-torch computation of the same maths."""

import math

import pytest
import torch
from npu_emulator import record

from flux_npu import ops
from flux_npu.ops import KernelDeclined, registry
from flux_npu.testing import assert_close, rel_err

pytestmark = pytest.mark.emulator

FIA = "torch_npu.npu_fused_infer_attention_score"
FA = "torch_npu.npu_fusion_attention"


def _rand(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _served(op):
    return {k: n for (o, _b, k), n in ops.dispatch_stats()["served"].items() if o == op and n}


def _fallbacks(op):
    return {r: n for (o, _b, r), n in ops.dispatch_stats()["fallback"].items() if o == op}


# -- rms_norm: a float32 weight's gradient stays float32 ------------------------------------------------


def _rms64(x, w, eps):
    x64, w64 = x.detach().double(), w.detach().double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return x64 * rstd * w64, x64 * rstd


@pytest.mark.parametrize("out_dtype", [None, torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_weight_gradient_is_not_rounded_on_the_npu_path(npu_emulated, dtype, out_dtype):
    eps = 1e-6
    x = _rand(2, 37, 3, 128, seed=1, dtype=dtype).requires_grad_()
    w = (1 + 0.1 * _rand(128, seed=2)).requires_grad_()  # float32, as Flux keeps its norm scales
    ops.reset_dispatch_stats()
    record.clear()
    y = ops.rms_norm(x, w, eps, out_dtype, backend=npu_emulated)
    assert y.dtype == (out_dtype or dtype)
    assert _served("rms_norm") == {"torch_npu.npu_rms_norm": 1}
    (call,) = record.calls("npu_rms_norm")
    assert call["tensors"]["gamma"]["dtype"] == dtype  # the op gets gamma in x's dtype, as documented
    dy = _rand(*y.shape, seed=3, dtype=y.dtype)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert dw.dtype == torch.float32
    y64, normed64 = _rms64(x, w, eps)
    dw64 = (dy.double() * normed64).sum(dim=(0, 1, 2))
    # float32 accuracy: no bf16/fp16 rounding on the way back
    assert_close(dw, dw64, torch.float32, what="dweight")
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(_rms64_graph(x64, w.detach().double(), eps), x64, dy.double())
    assert_close(dx, dx64, dtype, scale=2, what="dx")
    assert_close(y, y64, dtype, what="output")
    # what the old code did (a differentiable cast of the weight to x's dtype before the op) is
    # measurably worse, so this test can tell the two apart
    w_old = w.detach().requires_grad_()
    old = npu_emulated_rms_norm_old(x.detach(), w_old, eps)
    (dw_old,) = torch.autograd.grad(old, w_old, dy.to(old.dtype))
    assert rel_err(dw_old, dw64) > 10 * rel_err(dw, dw64)


def _rms64_graph(x64, w64, eps):
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64


def npu_emulated_rms_norm_old(x, w, eps):
    import torch_npu

    return torch_npu.npu_rms_norm(x, w.to(x.dtype), epsilon=eps)[0]


def test_qk_norm_float32_weights_get_float32_gradients_on_the_npu_path(npu_emulated):
    """Flux single blocks: qk_norm_rope composes the npu rms_norm and RoPE kernels."""
    B, H, S, D, eps = 1, 3, 11, 64, 1e-6
    q = _rand(B, H, S, D, seed=4, dtype=torch.bfloat16).requires_grad_()
    k = _rand(B, H, S, D, seed=5, dtype=torch.bfloat16).requires_grad_()
    wq = (1 + 0.1 * _rand(D, seed=6)).requires_grad_()
    wk = (1 + 0.1 * _rand(D, seed=7)).requires_grad_()
    freqs = ops.rope_freqs(torch.arange(S, dtype=torch.float32), D, form="cos_sin", backend=npu_emulated)
    record.clear()
    oq, ok = ops.qk_norm_rope(q, k, wq, wk, freqs, eps, backend=npu_emulated)
    assert len(record.calls("npu_rms_norm")) == 2 and len(record.calls("npu_rotary_mul")) == 2
    dq, dk = _rand(*oq.shape, seed=8, dtype=oq.dtype), _rand(*ok.shape, seed=9, dtype=ok.dtype)
    gwq, gwk = torch.autograd.grad((oq, ok), (wq, wk), (dq, dk))
    assert gwq.dtype == gwk.dtype == torch.float32

    # the float64 reference of the composition: RMSNorm (rounded to bf16 between the two, as
    # unfused Flux does; the rounding is constant w.r.t. the weight), then the rotation
    for x, w, d, got in ((q, wq, dq, gwq), (k, wk, dk, gwk)):
        x64 = x.detach().double()
        w64 = w.detach().double().requires_grad_()
        n = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
        cos, sin = (f.double() for f in freqs)
        rot = torch.stack((-n[..., 1::2], n[..., 0::2]), -1).flatten(-2)
        (g64,) = torch.autograd.grad(n * cos + rot * sin, w64, d.double())
        assert_close(got, g64, torch.bfloat16, what="qk-norm weight gradient")  # bf16 inputs to the rotation


# -- RoPE: interleave needs jit_compile=False ------------------------------------------------------------


def test_rope_declines_interleave_under_jit_compile_true(npu_emulated):
    import torch_npu

    x = _rand(2, 4, 9, 128, seed=10, dtype=torch.bfloat16)
    freqs = ops.rope_freqs(torch.arange(9, dtype=torch.float32), 128, form="cos_sin", backend=npu_emulated)
    assert torch_npu.npu.is_jit_compile_false()  # the A2/A3 default: the fused op serves
    try:
        torch_npu.npu.set_compile_mode(jit_compile=True)
        registry.invalidate_plans()  # the mode is read when a signature is planned (documented)
        ops.reset_dispatch_stats()
        record.clear()
        out = ops.apply_rope(x, freqs, backend=npu_emulated)
        assert record.calls("npu_rotary_mul") == []
        (reason,) = _fallbacks("apply_rope")
        assert "jit_compile=True" in reason and "set_compile_mode(jit_compile=False)" in reason, reason
        ref = ops.reference.apply_rope(x.double(), tuple(f.double() for f in freqs))
        assert_close(out, ref, torch.bfloat16)
        ops.set_strict(True)
        registry.invalidate_plans()
        with pytest.raises(KernelDeclined, match="jit_compile=True"):
            ops.apply_rope(x, freqs, backend=npu_emulated)
        # the emulator, like the documented op, has no interleave mode then
        r1, r2 = (f.to(x.dtype).reshape(1, 1, 9, 128) for f in freqs)
        with pytest.raises(RuntimeError, match="only rotary_mode='half'"):
            torch_npu.npu_rotary_mul(x, r1, r2, rotary_mode="interleave")
    finally:
        ops.set_strict(False)
        torch_npu.npu.set_compile_mode(jit_compile=False)
        registry.invalidate_plans()
    ops.reset_dispatch_stats()
    record.clear()
    out = ops.apply_rope(x, freqs, backend=npu_emulated)
    assert _served("apply_rope") == {"torch_npu.npu_rotary_mul": 1} and len(record.calls("npu_rotary_mul")) == 1
    assert_close(out, ops.reference.apply_rope(x.double(), tuple(f.double() for f in freqs)), torch.bfloat16)


# -- attention: FIA for calls that need no backward ------------------------------------------------------


def _attn64(q, k, v, mask, layout):
    return ops.reference.attention(q.double(), k.double(), v.double(), mask, layout=layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
@pytest.mark.parametrize("mask_kind", [None, "keys", "2d", "dead_row"])
def test_no_grad_attention_runs_fia(npu_emulated, dtype, layout, mask_kind):
    B, H, Hkv, S, D = 2, 4, 2, 37, 48  # GQA, odd sequence, D a multiple of 16 (FIA needs it)
    shape = lambda h: (B, h, S, D) if layout == "BHSD" else (B, S, h, D)  # noqa: E731
    q, k, v = (_rand(*shape(h), seed=s, dtype=dtype) for s, h in ((11, H), (12, Hkv), (13, Hkv)))
    g = torch.Generator().manual_seed(14)
    mask = {None: None, "keys": torch.rand(B, 1, 1, S, generator=g) > 0.3,
            "2d": torch.rand(S, S, generator=g) > 0.3, "dead_row": torch.rand(S, S, generator=g) > 0.3}[mask_kind]
    if mask is not None:
        mask[..., 0] = True
    if mask_kind == "dead_row":
        mask[5] = False  # query row 5 attends to nothing: zeros, as the reference defines
    ops.reset_dispatch_stats()
    record.clear()
    with torch.no_grad():
        out = ops.attention(q, k, v, mask, layout=layout, backend=npu_emulated)
    assert _served("attention") == {FIA: 1} and not _fallbacks("attention")
    assert record.calls("npu_fusion_attention") == []
    (call,) = record.calls("npu_fused_infer_attention_score")
    a = call["args"]
    assert a["input_layout"] == ("BNSD" if layout == "BHSD" else "BSND")
    assert a["num_heads"] == H and a["num_key_value_heads"] == Hkv
    assert "scale" in call["explicit"] and a["scale"] == pytest.approx(1 / math.sqrt(D))
    if mask is not None:
        m = call["tensors"]["atten_mask"]
        assert m["dtype"] == torch.bool and m["shape"] in ((1, 1, S, S), (B, 1, S, S))
    assert_close(out, _attn64(q, k, v, mask, layout), dtype)
    if mask_kind == "dead_row":
        row = out[:, :, 5] if layout == "BHSD" else out[:, 5]
        assert torch.equal(row, torch.zeros_like(row))
    assert not record.FLOAT64


def test_attention_that_needs_a_backward_runs_fusion_attention(npu_emulated):
    q, k, v = (_rand(1, 4, 16, 64, seed=s, dtype=torch.bfloat16).requires_grad_() for s in (15, 16, 17))
    ops.reset_dispatch_stats()
    record.clear()
    out = ops.attention(q, k, v, backend=npu_emulated)
    assert _served("attention") == {FA: 1} and record.calls("npu_fused_infer_attention_score") == []
    out.float().pow(2).sum().backward()  # FA has a backward
    assert q.grad is not None and torch.isfinite(q.grad).all()
    # the same signature without grad is planned on its own and goes to FIA
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            ops.attention(q, k, v, backend=npu_emulated)
    assert _served("attention") == {FA: 1, FIA: 2}
    # inputs that need no grad, grad mode on: FIA too
    ops.attention(q.detach(), k.detach(), v.detach(), backend=npu_emulated)
    assert _served("attention")[FIA] == 3


@pytest.mark.parametrize("case, reason", [
    ("float32", "takes float16 and bfloat16"),
    ("head_dim_40", "multiple of 16"),
    ("per_head_mask", "per-head mask"),
    ("additive_mask", "additive"),
])
def test_fia_limits_hand_over_to_fusion_attention(npu_emulated, case, reason):
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    D = 40 if case == "head_dim_40" else 64
    q, k, v = (_rand(2, 4, 16, D, seed=s, dtype=dtype) for s in (18, 19, 20))
    mask = None
    if case == "per_head_mask":
        mask = torch.rand(2, 4, 16, 16, generator=torch.Generator().manual_seed(21)) > 0.3
        mask[..., 0] = True
    if case == "additive_mask":
        mask = torch.zeros(16, 16)
        mask[:, 3] = float("-inf")
    name, reasons = ops.explain("attention", npu_emulated, q, k, v, mask, None, "BHSD")
    assert name == FA and reason in reasons[0], reasons
    ops.reset_dispatch_stats()
    with torch.no_grad():
        out = ops.attention(q, k, v, mask, backend=npu_emulated)
    assert _served("attention") == {FA: 1} and not _fallbacks("attention")  # FA served: no fallback
    assert_close(out, _attn64(q, k, v, mask, "BHSD"), dtype)


def test_emulated_fia_rejects_what_the_documentation_rejects(npu_emulated):
    import torch_npu

    fia = torch_npu.npu_fused_infer_attention_score
    q = _rand(1, 2, 8, 64, seed=22, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="float16, bfloat16"):
        fia(q.float(), q.float(), q.float(), num_heads=2, input_layout="BNSD")
    with pytest.raises(RuntimeError, match="not contiguous"):
        fia(q.transpose(2, 3), q, q, num_heads=2, input_layout="BNSD")
    with pytest.raises(RuntimeError, match="multiple of 16"):
        x = _rand(1, 2, 8, 40, seed=23, dtype=torch.bfloat16)
        fia(x, x, x, num_heads=2, input_layout="BNSD")
    with pytest.raises(TypeError):
        fia(q, q, q, 2)  # everything after value is keyword-only
    with pytest.raises(RuntimeError, match="atten_mask shape"):
        fia(q, q, q, num_heads=2, input_layout="BNSD", atten_mask=torch.zeros(1, 2, 8, 8, dtype=torch.bool))
    qg = q.clone().requires_grad_()
    out = fia(qg, q, q, num_heads=2, input_layout="BNSD", scale=0.125)[0]
    with pytest.raises(RuntimeError, match="not implemented"):
        out.float().sum().backward()
