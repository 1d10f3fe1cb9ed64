"""The npu backend's fused kernels, one op at a time, through the torch_npu CONTRACT EMULATOR
(tests/npu_emulator: CPU tensors, not hardware). Each kernel is compared with the plain-torch
reference forward and backward; the emulator's call record shows the arguments each fused op got;
every documented limit the backend relies on is fed an input just past it and must fall back with
its reason; and the emulator itself must reject what the real op rejects. (layer_norm_modulate and
gated_residual have nothing npu-specific beyond their kernel: tests/ops/test_<op>.py covers them on
the emulator with every other op and backend.)"""

import math
import re

import pytest
import torch
from npu_emulator import record

from flux_npu import ops
from flux_npu.ops import KernelDeclined
from flux_npu.testing import assert_close

pytestmark = pytest.mark.emulator


def _fallbacks(op):
    return {reason: n for (o, _b, reason), n in ops.dispatch_stats()["fallback"].items() if o == op}


def _served(op, kernel):
    return ops.dispatch_stats()["served"][(op, "npu", kernel)]


def _grads(out, inputs, seed=7):
    g = torch.Generator().manual_seed(seed)
    cot = torch.randn(out.shape, generator=g).to(out.dtype)
    return torch.autograd.grad(out, inputs, cot)


def _leaf(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)


# -- attention ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
@pytest.mark.parametrize("mask_kind", [None, "keys", "full", "2d"])
def test_emulator_attention_matches_reference(npu_emulated, dtype, layout, mask_kind):
    B, H, Hkv, S, D = 2, 4, 2, 37, 40  # GQA, odd sequence, head dim not a multiple of 16
    shape = lambda h: (B, h, S, D) if layout == "BHSD" else (B, S, h, D)  # noqa: E731
    q, k, v = (_leaf(*shape(h), dtype=dtype, seed=s) for s, h in ((1, H), (2, Hkv), (3, Hkv)))
    g = torch.Generator().manual_seed(4)
    mask = {
        None: None,
        "keys": torch.rand(B, 1, 1, S, generator=g) > 0.3,
        "full": torch.rand(B, H, S, S, generator=g) > 0.3,
        "2d": torch.rand(S, S, generator=g) > 0.3,
    }[mask_kind]
    if mask is not None:
        mask[..., 0] = True  # no fully masked row
    out = ops.attention(q, k, v, mask, layout=layout, backend=npu_emulated)
    assert _served("attention", "torch_npu.npu_fusion_attention") == 1
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = ops.reference.attention(qf, kf, vf, mask, layout=layout)
    assert_close(out, ref, dtype)
    for got, want, name in zip(_grads(out, (q, k, v)), _grads(ref, (qf, kf, vf)), "qkv", strict=False):
        assert_close(got, want, dtype, scale=2, what=f"d{name}")
    (call,) = record.calls("npu_fusion_attention")
    assert call["args"]["input_layout"] == ("BNSD" if layout == "BHSD" else "BSND")
    assert call["args"]["head_num"] == H
    assert "scale" in call["explicit"] and call["args"]["scale"] == pytest.approx(1 / math.sqrt(D))
    assert call["args"]["keep_prob"] == 1.0
    assert call["tensors"]["query"]["shape"] == tuple(q.shape)  # caller's layout, no transpose
    if mask is None:
        assert call["args"]["atten_mask"] is None
    else:
        assert call["tensors"]["atten_mask"]["dtype"] == torch.bool
        assert call["tensors"]["atten_mask"]["shape"] in ((B, 1, S, S), (B, H, S, S), (S, S))
    assert not record.FLOAT64


def test_emulator_attention_mask_meaning_is_inverted(npu_emulated):
    """A mask that hides half the keys changes the result; the fused path must hide the same half
    (it passes ~mask, since the op's True means masked out)."""
    q, k, v = (_leaf(1, 2, 8, 16, dtype=torch.float32, seed=s) for s in (1, 2, 3))
    mask = torch.zeros(1, 1, 1, 8, dtype=torch.bool)
    mask[..., :4] = True
    out = ops.attention(q, k, v, mask, backend=npu_emulated)
    assert_close(out, ops.reference.attention(q, k, v, mask))
    unmasked = ops.reference.attention(q, k, v)
    assert (out - unmasked).abs().max() > 1e-2  # the mask matters at this input


# -- RoPE --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["cos_sin_bshd", "cos_sin_bhsd", "bfl"])
def test_emulator_apply_rope_matches_reference(npu_emulated, dtype, form):
    B, H, S, D = 2, 3, 19, 24
    pos = torch.arange(S, dtype=torch.float32) * 1.7
    if form == "bfl":
        x = _leaf(B, H, S, D, dtype=dtype, seed=1)
        freqs = ops.rope_freqs(pos[None], D, 10000.0, form="bfl", backend=npu_emulated).unsqueeze(1)  # (1,1,S,D/2,2,2)
        seq, want_r1 = 2, (1, 1, S, D)
    else:
        seq = 1 if form == "cos_sin_bshd" else 2
        x = _leaf(*((B, S, H, D) if seq == 1 else (B, H, S, D)), dtype=dtype, seed=1)
        freqs = ops.rope_freqs(pos, D, 10000.0, form="cos_sin", backend=npu_emulated)
        want_r1 = (1, S, 1, D) if seq == 1 else (1, 1, S, D)
    out = ops.apply_rope(x, freqs, sequence_dim=seq, backend=npu_emulated)
    assert _served("apply_rope", "torch_npu.npu_rotary_mul") == 1
    xf = x.detach().float().requires_grad_()
    ref = ops.reference.apply_rope(xf, freqs, seq)
    assert_close(out, ref, dtype)
    (gx,), (gref,) = _grads(out, (x,)), _grads(ref, (xf,))
    assert_close(gx, gref, dtype, what="dx")
    (call,) = record.calls("npu_rotary_mul")
    assert call["args"]["rotary_mode"] == "interleave"
    assert call["tensors"]["r1"]["shape"] == want_r1 and call["tensors"]["r2"]["shape"] == want_r1
    assert call["tensors"]["r1"]["dtype"] == dtype
    assert not record.FLOAT64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulator_apply_rope_bfl_per_sample_freqs(npu_emulated, dtype):
    """BFL code builds pe per sample, (B, 1, S, D/2, 2, 2): interleave mode has no per-batch
    cos/sin, so each sample is rotated by its own (1,1,S,D) operands."""
    B, H, S, D = 3, 2, 11, 16
    pos = torch.randn(B, S, generator=torch.Generator().manual_seed(5)) * 20  # different per sample
    freqs = ops.rope_freqs(pos, D, 10000.0, form="bfl", backend=npu_emulated).unsqueeze(1)
    x = _leaf(B, H, S, D, dtype=dtype, seed=1)
    out = ops.apply_rope(x, freqs, backend=npu_emulated)
    assert _served("apply_rope", "torch_npu.npu_rotary_mul") == 1
    xf = x.detach().float().requires_grad_()
    ref = ops.reference.apply_rope(xf, freqs)
    assert_close(out, ref, dtype)
    assert_close(_grads(out, (x,))[0], _grads(ref, (xf,))[0], dtype, what="dx")
    calls = record.calls("npu_rotary_mul")
    assert len(calls) == B
    assert all(c["tensors"]["input"]["shape"] == (1, H, S, D) and c["tensors"]["r1"]["shape"] == (1, 1, S, D)
               for c in calls)


def test_emulator_rope_operands_follow_writes_that_bump_no_version(npu_emulated):
    """No operand cache: a `.data.copy_` refresh of the freqs (no version bump) is rotated by."""
    S, D = 16, 32
    cos, sin = ops.rope_freqs(torch.arange(S).float(), D, form="cos_sin", backend=npu_emulated)
    x = torch.randn(1, S, 2, D)
    ops.apply_rope(x, (cos, sin), sequence_dim=1, backend=npu_emulated)
    fresh = ops.rope_freqs(torch.arange(S).float() * 3 + 1, D, form="cos_sin", backend=npu_emulated)
    cos.data.copy_(fresh[0])
    sin.data.copy_(fresh[1])
    out = ops.apply_rope(x, (cos, sin), sequence_dim=1, backend=npu_emulated)
    assert len(record.calls("npu_rotary_mul")) == 2
    assert_close(out, ops.reference.apply_rope(x, fresh, 1))


# -- RMSNorm -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_kind", ["same", "float32", None])
def test_emulator_rms_norm_matches_reference(npu_emulated, dtype, weight_kind):
    x = _leaf(2, 5, 3, 40, dtype=dtype, seed=1)
    w = None if weight_kind is None else _leaf(40, dtype=dtype if weight_kind == "same" else torch.float32, seed=2)
    out_dtype = torch.float32 if weight_kind == "float32" else None  # as the BFL RMSNorm promotes
    out = ops.rms_norm(x, w, 1e-6, out_dtype, backend=npu_emulated)
    assert _served("rms_norm", "torch_npu.npu_rms_norm") == 1
    assert out.dtype == (out_dtype or dtype)
    leaves = [t.detach().float().requires_grad_() for t in (x, w) if t is not None]
    ref = ops.reference.rms_norm(leaves[0], leaves[1] if w is not None else None, 1e-6)
    assert_close(out.float(), ref, dtype)
    got = _grads(out, [t for t in (x, w) if t is not None])
    want = _grads(ref, leaves)
    for a, b in zip(got, want, strict=False):
        assert_close(a, b, dtype, scale=2, what="grad")
    (call,) = record.calls("npu_rms_norm")
    assert call["args"]["epsilon"] == 1e-6 and "epsilon" in call["explicit"]
    assert call["tensors"]["gamma"]["dtype"] == dtype


def test_emulator_rope_freqs_in_float32_on_the_device(npu_emulated):
    """RoPE frequencies on an npu-owned tensor never touch float64 (the device lacks it)."""
    from npu_emulator.guards import Float64Watch

    pos = torch.arange(64).float()
    with Float64Watch() as watch:
        cos, sin = ops.rope_freqs(pos, 56, 10000.0, form="cos_sin", backend=npu_emulated)
    assert watch.ops == []
    ref = ops.reference.rope_freqs(pos, 56, 10000.0, form="cos_sin")
    assert_close(cos, ref[0], torch.float32)
    assert_close(sin, ref[1], torch.float32)


# -- limits: just past each documented one, the kernel declines with its reason ------------------------


def _attn_args(B=1, H=2, S=8, D=16, dtype=torch.float32, Dv=None, mask=None):
    q = torch.randn(B, H, S, D, dtype=dtype)
    return q, torch.randn(B, H, S, D, dtype=dtype), torch.randn(B, H, S, Dv or D, dtype=dtype), mask


LIMIT_CASES = [
    ("attention", lambda: _attn_args(D=769), "head dim 769 > 768"),
    ("attention", lambda: _attn_args(H=257, S=2, D=4), "257 query heads > 256"),
    ("attention", lambda: _attn_args(dtype=torch.float64), "dtype torch.float64"),
    ("attention", lambda: _attn_args(Dv=8), "shapes differ"),
    ("apply_rope",
     lambda: (torch.randn(1, 1, 2, 896), ops.reference.rope_freqs(torch.arange(2.0), 896, form="cos_sin"), 2),
     "head dim 896"),
    ("apply_rope",
     lambda: (torch.randn(1, 1000, 2, 8), ops.reference.rope_freqs(torch.arange(2.0), 8, form="cos_sin"), 2),
     "1000 heads: npu_rotary_mul interleave needs B*N < 1000"),
    ("apply_rope", lambda: (torch.randn(2, 2, 4, 8), ops.reference.rope_freqs(torch.arange(16.0).view(2, 2, 4), 8), 2),
     "vary over heads"),
    ("apply_rope", lambda: (torch.randn(1, 2, 4, 8, dtype=torch.float64),
                            ops.reference.rope_freqs(torch.arange(4.0), 8, form="cos_sin"), 2), "dtype torch.float64"),
    ("rms_norm", lambda: (torch.randn(16), torch.ones(16), 1e-6, None), "1-D input"),
    ("rms_norm", lambda: (torch.randn(2, 16, dtype=torch.float64), None, 1e-6, None), "dtype torch.float64"),
]


@pytest.mark.parametrize("op,make,reason", LIMIT_CASES, ids=[f"{c[0]}-{c[2][:24]}" for c in LIMIT_CASES])
def test_emulator_limit_falls_back_with_reason(npu_emulated, op, make, reason):
    args = make()
    out = getattr(ops, op)(*args, backend=npu_emulated)
    fallbacks = _fallbacks(op)
    assert len(fallbacks) == 1 and reason in next(iter(fallbacks)), fallbacks
    assert _served(op, "reference") == 1 and not record.calls()  # no emulated op was called
    ref = getattr(ops.reference, op)(*args)
    assert_close(out, ref, out.dtype)
    ops.set_strict(True)
    with pytest.raises(KernelDeclined, match=re.escape(reason)):
        getattr(ops, op)(*args, backend=npu_emulated)


def test_emulator_limit_inside_is_served(npu_emulated):
    """The other side of the limits: D = 768, 999 heads, and B*N >= 1000 split into batch chunks
    that each keep B*N < 1000 (the emulator raises past it)."""
    q, k, v, _ = _attn_args(S=4, D=768)
    assert_close(ops.attention(q, k, v, backend=npu_emulated), ops.reference.attention(q, k, v))
    cs = ops.reference.rope_freqs(torch.arange(2.0), 8, form="cos_sin")
    x = torch.randn(1, 999, 2, 8)
    assert_close(ops.apply_rope(x, cs, 2, backend=npu_emulated), ops.reference.apply_rope(x, cs, 2))
    record.clear()
    x = _leaf(40, 2, 25, 8, dtype=torch.float32, seed=3)  # BSND, B*N = 1000
    out = ops.apply_rope(x, cs, 1, backend=npu_emulated)
    xf = x.detach().clone().requires_grad_()
    ref = ops.reference.apply_rope(xf, cs, 1)
    assert_close(out, ref)
    assert_close(_grads(out, (x,))[0], _grads(ref, (xf,))[0], what="dx")
    assert [c["tensors"]["input"]["shape"][0] for c in record.calls("npu_rotary_mul")] == [39, 1]
    assert _served("attention", "torch_npu.npu_fusion_attention") == 1
    assert _served("apply_rope", "torch_npu.npu_rotary_mul") == 2
    assert not _fallbacks("attention") and not _fallbacks("apply_rope")


def test_emulator_old_torch_npu_without_rotary_mode_falls_back():
    """A build whose npu_rotary_mul has no `rotary_mode` (half mode only) must not be used: half
    mode rotates (x[i], x[i+D/2]), not Flux's adjacent pairs."""
    from npu_emulator.install import emulated_npu_backend

    with emulated_npu_backend(rotary_mode=False) as backend:
        x = torch.randn(1, 2, 4, 8)
        cs = ops.reference.rope_freqs(torch.arange(4.0), 8, form="cos_sin")
        out = ops.apply_rope(x, cs, 2, backend=backend)
        (reason,) = _fallbacks("apply_rope")
        assert "no 'rotary_mode' argument" in reason and "parameters: self, r1, r2" in reason
        assert_close(out, ops.reference.apply_rope(x, cs, 2))
        assert not record.calls("npu_rotary_mul")


def test_emulator_910a_declines_bf16_and_fusion_attention():
    from npu_emulator.install import emulated_npu_backend

    from flux_npu.backends.npu import capability_rows, soc_capabilities

    with emulated_npu_backend(device_name="Ascend910A (emulated)", bf16=False) as backend:
        caps = soc_capabilities()
        assert caps["soc"] == "910A" and caps["bf16"] is False and caps["fusion_attention"] is False
        assert any("no bfloat16" in line for line in caps["limits"])
        assert ("bfloat16", "no") in capability_rows()
        x = torch.randn(2, 16, dtype=torch.bfloat16)
        ops.rms_norm(x, torch.ones(16, dtype=torch.bfloat16), backend=backend)
        assert any("bfloat16 is not supported on Ascend910A" in r for r in _fallbacks("rms_norm"))
        q, k, v, _ = _attn_args()
        ops.attention(q, k, v, backend=backend)
        assert any("fusion_attention is not available on Ascend910A" in r for r in _fallbacks("attention"))
        ops.rms_norm(x.float(), torch.ones(16), backend=backend)  # float32 RMSNorm is fine on 910A
        assert _served("rms_norm", "torch_npu.npu_rms_norm") == 1


# -- the emulator is as strict as the real op -----------------------------------------------------------


def test_emulator_rejects_what_the_real_ops_reject(npu_emulated):
    import torch_npu

    assert torch_npu.EMULATED
    x = torch.randn(1, 2, 4, 8)
    c = torch.ones(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="D must be even"):
        torch_npu.npu_rotary_mul(torch.randn(1, 2, 4, 7), c[..., :7], c[..., :7], rotary_mode="interleave")
    with pytest.raises(RuntimeError, match="D must be even and < 896"):
        torch_npu.npu_rotary_mul(torch.randn(1, 1, 1, 896), torch.ones(1, 1, 1, 896), torch.ones(1, 1, 1, 896),
                                 rotary_mode="interleave")
    with pytest.raises(RuntimeError, match="B\\*N < 1000"):
        torch_npu.npu_rotary_mul(torch.randn(40, 25, 4, 8), c, c, rotary_mode="interleave")
    with pytest.raises(RuntimeError, match="not a supported broadcast"):  # per-batch cos: half mode only
        torch_npu.npu_rotary_mul(torch.randn(2, 2, 4, 8), torch.ones(2, 1, 4, 8), torch.ones(2, 1, 4, 8),
                                 rotary_mode="interleave")
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch_npu.npu_rotary_mul(x.bfloat16(), c, c, rotary_mode="interleave")
    with pytest.raises(RuntimeError, match=r"\[-1, 1\]"):
        torch_npu.npu_rotary_mul(x, c * 2, c, rotary_mode="interleave")
    with pytest.raises(TypeError):
        torch_npu.npu_rotary_mul(x, c, c, mode="interleave")  # wrong argument name
    q = torch.randn(1, 2, 4, 769)
    with pytest.raises(RuntimeError, match="1..768"):
        torch_npu.npu_fusion_attention(q, q, q, head_num=2, input_layout="BNSD")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="head_num=3"):
        torch_npu.npu_fusion_attention(q, q, q, head_num=3, input_layout="BNSD")
    with pytest.raises(TypeError, match="head_num"):
        torch_npu.npu_fusion_attention(q, q, q, head_num=2.0, input_layout="BNSD")
    with pytest.raises(TypeError, match="atten_mask must be bool"):
        torch_npu.npu_fusion_attention(q, q, q, head_num=2, input_layout="BNSD", atten_mask=torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match="atten_mask shape"):
        torch_npu.npu_fusion_attention(q, q, q, head_num=2, input_layout="BNSD",
                                       atten_mask=torch.zeros(1, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="one dtype"):
        torch_npu.npu_fusion_attention(q, q.bfloat16(), q, head_num=2, input_layout="BNSD")
    with pytest.raises(NotImplementedError):
        torch_npu.npu_fusion_attention(q, q, q, head_num=2, input_layout="TND")
    with pytest.raises(RuntimeError, match="gamma dtype"):
        torch_npu.npu_rms_norm(x.bfloat16(), torch.ones(8), epsilon=1e-6)
    with pytest.raises(TypeError):
        torch_npu.npu_rms_norm(x, torch.ones(8), eps=1e-6)  # the keyword is `epsilon`
    with pytest.raises(RuntimeError, match="2..8 dims"):
        torch_npu.npu_rms_norm(torch.randn(8), torch.ones(8))
    record.clear()
    with pytest.raises(RuntimeError, match="float64"):
        torch_npu.npu_rms_norm(x.double(), torch.ones(8, dtype=torch.float64))
    assert record.FLOAT64 == [("npu_rms_norm", "self"), ("npu_rms_norm", "gamma")]


def test_emulator_semantics_match_the_documentation(npu_emulated):
    """scale defaults to 1.0 (not 1/sqrt(D)); atten_mask True = masked out; 7-tuple result;
    (y, rstd) from npu_rms_norm; interleave rotates adjacent pairs, half rotates halves."""
    import torch_npu

    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    res = torch_npu.npu_fusion_attention(q, k, v, head_num=2, input_layout="BNSD")
    assert isinstance(res, tuple) and len(res) == 7
    assert_close(res[0], ops.reference.attention(q, k, v, scale=1.0))
    hide = torch.zeros(6, 6, dtype=torch.bool)
    hide[:, 3:] = True
    out = torch_npu.npu_fusion_attention(q, k, v, head_num=2, input_layout="BNSD", atten_mask=hide, scale=0.5)[0]
    assert_close(out, ops.reference.attention(q, k, v, ~hide, scale=0.5))
    bsh = torch_npu.npu_fusion_attention(q.transpose(1, 2).flatten(2), k.transpose(1, 2).flatten(2),
                                         v.transpose(1, 2).flatten(2), head_num=2, input_layout="BSH")[0]
    assert_close(bsh, res[0].transpose(1, 2).flatten(2))
    x = torch.randn(2, 3, 16)
    y, rstd = torch_npu.npu_rms_norm(x, torch.full((16,), 2.0), epsilon=1e-5)
    assert rstd.shape == (2, 3, 1) and rstd.dtype == torch.float32
    assert_close(y, ops.reference.rms_norm(x, torch.full((16,), 2.0), 1e-5))
    x = torch.randn(1, 1, 3, 4)
    ang = torch.tensor([0.3, 0.3, 1.1, 1.1])
    r1, r2 = ang.cos().expand(1, 1, 3, 4).contiguous(), ang.sin().expand(1, 1, 3, 4).contiguous()
    inter = torch_npu.npu_rotary_mul(x, r1, r2, rotary_mode="interleave")
    x0, x1 = x[..., 0], x[..., 1]
    assert torch.allclose(inter[..., 0], x0 * math.cos(0.3) - x1 * math.sin(0.3), atol=1e-6)
    assert torch.allclose(inter[..., 1], x1 * math.cos(0.3) + x0 * math.sin(0.3), atol=1e-6)
    half = torch_npu.npu_rotary_mul(x, r1, r2)
    assert torch.allclose(half[..., 0], x[..., 0] * math.cos(0.3) - x[..., 2] * math.sin(0.3), atol=1e-6)


def test_emulator_limits_on_meta_tensors(npu_emulated):
    """Limits too large to allocate, checked on meta tensors (as `flux-npu info` does)."""
    meta = npu_emulated.with_device_type("meta")
    q = torch.empty(1, 2, (1 << 20) + 1, 64, device="meta")
    kernel, reasons = ops.explain("attention", meta, q, q, q, None, None, "BHSD")
    assert kernel is None and "beyond the op's range" in reasons[-1]  # [0]: FIA declines float32
    x = torch.empty((1,) * 8 + (16,), device="meta")
    kernel, reasons = ops.explain("rms_norm", meta, x, None, 1e-6, None)
    assert kernel is None and "9-D input" in reasons[0]
    kernel, _ = ops.explain("rms_norm", meta, x[0], None, 1e-6, None)
    assert kernel == "torch_npu.npu_rms_norm"
    assert record.calls() == []


# -- masks, fully masked rows, general matrices, empty inputs (issues 11 and 12) ---------------------


@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_emulator_zero_or_neginf_float_mask_is_served_as_a_bool_mask(npu_emulated, layout):
    """Chroma's additive masks hold only 0 and -inf: exactly a boolean mask, so the fused op serves
    them; a query row with every key masked gives zeros like the reference."""
    B, H, S, D = 2, 2, 6, 16
    q, k, v = (_leaf(B, H, S, D, dtype=torch.float32, seed=s) for s in (1, 2, 3))
    keep = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(4)) > 0.4
    keep[..., 0] = True
    keep[1, :, 3] = False  # a fully masked query row
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    t = (lambda x: x) if layout == "BHSD" else (lambda x: x.transpose(1, 2))
    for mask in (additive, keep):
        record.clear()
        out = ops.attention(t(q), t(k), t(v), mask=mask, layout=layout, backend=npu_emulated)
        ref = reference_attention(q, k, v, keep)
        assert_close(t(out), ref, torch.float32)
        assert t(out)[1, :, 3].abs().max() == 0
        (call,) = record.calls("npu_fusion_attention")
        assert call["tensors"]["atten_mask"]["dtype"] == torch.bool
        g_out, g_ref = _grads(out, (q, k, v)), _grads(t(ref), (q, k, v))
        for a, b in zip(g_out, g_ref, strict=False):
            assert_close(a, b, torch.float32)
    assert _served("attention", "torch_npu.npu_fusion_attention") == 2 and not _fallbacks("attention")


def reference_attention(q, k, v, keep):
    return ops.reference.attention(q.double(), k.double(), v.double(), mask=keep).float()


def test_emulator_general_bfl_matrices_fall_back_with_reason(npu_emulated):
    x = torch.randn(1, 2, 5, 8)
    mats = torch.randn(1, 1, 5, 4, 2, 2)
    out = ops.apply_rope(x, mats, backend=npu_emulated)
    assert_close(out, ops.reference.apply_rope(x.double(), mats.double()), torch.float32)
    (reason,) = _fallbacks("apply_rope")
    assert "not rotations" in reason and not record.calls("npu_rotary_mul")
    ops.set_strict(True)
    with pytest.raises(KernelDeclined, match="not rotations"):
        ops.apply_rope(x, mats.clone(), backend=npu_emulated)


def test_emulator_zero_size_rope(npu_emulated):
    for x in (torch.randn(0, 2, 4, 8), torch.randn(1, 2, 0, 8)):
        cs = ops.reference.rope_freqs(torch.arange(float(x.shape[2])), 8, form="cos_sin")
        assert ops.apply_rope(x, cs, backend=npu_emulated).shape == x.shape
        q, k = ops.qk_norm_rope(x, x, torch.ones(8), torch.ones(8), cs, backend=npu_emulated)
        assert q.shape == k.shape == x.shape
