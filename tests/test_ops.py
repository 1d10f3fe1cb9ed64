"""The op catalogue on the cpu backend: each kernel against the float64 reference, forward and
backward, odd shapes, three dtypes; the references against the stock Flux code they stand for;
clear errors for bad input; fallback and strict mode."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import flux_npu
from flux_npu import ops
from flux_npu.backends import Backend
from flux_npu.ops import reference
from flux_npu.testing import assert_close, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _leaf(t, dtype):
    return t.to(dtype).detach().requires_grad_(True)


def _check_fwd_bwd(fn, ref, tensors, dtype, scale=1.0):
    """fn(*inputs in dtype) vs ref(*inputs in float64): output and every input gradient."""
    low = [_leaf(t, dtype) for t in tensors]
    high = [_leaf(t, torch.float64) for t in tensors]
    out, out_ref = fn(*low), ref(*high)
    assert out.dtype == dtype
    assert_close(out, out_ref, dtype, scale, "forward")
    g = torch.randn_like(out_ref)
    out.backward(g.to(dtype))
    out_ref.backward(g)
    for i, (a, b) in enumerate(zip(low, high, strict=False)):
        assert_close(a.grad, b.grad, dtype, scale, f"grad of input {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
@pytest.mark.parametrize("shape", [(1, 3, 17, 16), (2, 2, 33, 24)])
def test_attention(dtype, layout, shape, seed):
    B, H, S, D = shape
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    if layout == "BSHD":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    _check_fwd_bwd(lambda q, k, v: ops.attention(q, k, v, layout=layout),
                   lambda q, k, v: reference.attention(q, k, v, layout=layout), [q, k, v], dtype, scale=2.0)
    assert ops.dispatch_stats()["served"][("attention", "cpu", "torch.sdpa")] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_masks_and_gqa(dtype, seed):
    q = torch.randn(2, 4, 9, 16)
    k, v = torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    keep = torch.rand(2, 1, 1, 11) > 0.3
    keep[..., 0] = True  # every query attends to at least one key
    _check_fwd_bwd(lambda q, k, v: ops.attention(q, k, v, mask=keep),
                   lambda q, k, v: reference.attention(q, k, v, mask=keep), [q, k, v], dtype, scale=2.0)
    additive = torch.where(keep, 0.0, -1e4)
    out = ops.attention(q.to(dtype), k.to(dtype), v.to(dtype), mask=additive.to(dtype))
    assert_close(out, reference.attention(q.double(), k.double(), v.double(), mask=keep), dtype, 2.0)


def test_attention_reference_is_sdpa_maths(seed):
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64) for _ in range(3))
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    expect = torch.softmax(scores, -1) @ v
    assert_close(reference.attention(q, k, v), expect, torch.float64)
    expect = torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1) @ v
    assert_close(reference.attention(q, k, v, scale=0.3), expect, torch.float64)


def _cos_sin(S, D, theta=10000.0):
    return reference.rope_freqs(torch.arange(S, dtype=torch.float32) * 1.5, D, theta, form="cos_sin")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_dim", [1, 2])
def test_apply_rope_cos_sin(dtype, seq_dim, seed):
    B, H, S, D = 2, 3, 13, 24
    x = torch.randn(B, S, H, D) if seq_dim == 1 else torch.randn(B, H, S, D)
    cs = _cos_sin(S, D)
    _check_fwd_bwd(lambda x: ops.apply_rope(x, cs, seq_dim),
                   lambda x: reference.apply_rope(x, tuple(t.double() for t in cs), seq_dim), [x], dtype)
    assert ops.dispatch_stats()["served"][("apply_rope", "cpu", "torch.complex_mul")] == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rope_bfl_and_strided_input(dtype, seed):
    B, H, S, D = 2, 3, 11, 20
    pos = torch.randint(0, 50, (B, S)).float()
    freqs = reference.rope_freqs(pos, D, 10000.0, form="bfl").unsqueeze(1)  # (B, 1, S, D/2, 2, 2)
    qkv = torch.randn(B, S, 3, H, D).permute(2, 0, 3, 1, 4)  # BFL's strided q/k/v views
    x = qkv[1]
    assert not x.is_contiguous()
    out = ops.apply_rope(x.to(dtype), freqs)
    assert_close(out, reference.apply_rope(x.double(), freqs.double()), dtype)
    _check_fwd_bwd(lambda x: ops.apply_rope(x, freqs), lambda x: reference.apply_rope(x, freqs.double()), [x], dtype)


def test_rope_reference_matches_stock_diffusers_and_bfl(seed):
    from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
    from flux import math as bfl_math

    S, D = 19, 16
    pos = torch.arange(S, dtype=torch.float32) * 0.5
    cos_d, sin_d = get_1d_rotary_pos_embed(D, pos, 10000, use_real=True, repeat_interleave_real=True,
                                           freqs_dtype=torch.float64)
    cos_r, sin_r = reference.rope_freqs(pos, D, 10000.0, form="cos_sin")
    assert_close(cos_r, cos_d, torch.float32) and assert_close(sin_r, sin_d, torch.float32)
    mats = reference.rope_freqs(pos[None], D, 10000.0, form="bfl")
    assert_close(mats, bfl_math.rope(pos[None], D, 10000), torch.float32)
    x = torch.randn(2, S, 3, D)
    assert_close(reference.apply_rope(x, (cos_r, sin_r), 1), apply_rotary_emb(x, (cos_d, sin_d), sequence_dim=1),
                 torch.float32)
    xb = x.transpose(1, 2)
    q_ref, _ = bfl_math.apply_rope(xb, xb, mats[:, None])
    assert_close(reference.apply_rope(xb, mats[:, None]), q_ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 7, 64), (3, 5, 128), (2, 3, 96), (5, 131)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm(dtype, shape, with_weight, seed):
    x = torch.randn(*shape)
    if with_weight:
        w = torch.rand(shape[-1]) + 0.5
        _check_fwd_bwd(lambda x, w: ops.rms_norm(x, w, 1e-6), lambda x, w: reference.rms_norm(x, w, 1e-6),
                       [x, w], dtype)
    else:
        _check_fwd_bwd(lambda x: ops.rms_norm(x, None, 1e-6), lambda x: reference.rms_norm(x, None, 1e-6), [x], dtype)


def test_rms_norm_mixed_dtypes_and_out_dtype(seed):
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    w = torch.rand(64) + 0.5  # float32 weight on a bf16 input, as a bf16-autocast model holds it
    out = ops.rms_norm(x, w, 1e-6, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_close(out, reference.rms_norm(x.double(), w.double(), 1e-6), torch.float32, scale=1e2)  # input is bf16
    assert_close(ops.rms_norm(x, w), torch.nn.functional.rms_norm(x.float(), (64,), w, 1e-6), torch.bfloat16)


def test_rms_norm_reference_matches_torch_rmsnorm(seed):
    m = torch.nn.RMSNorm(48, eps=1e-6, dtype=torch.float64)
    torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    x = torch.randn(4, 48, dtype=torch.float64)
    assert_close(reference.rms_norm(x, m.weight, 1e-6), m(x), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 9, 64), (1, 5, 200)])
def test_layer_norm_modulate(dtype, shape, seed):
    B, S, D = shape
    x, shift, scale = torch.randn(B, S, D), torch.randn(B, 1, D), torch.randn(B, 1, D) * 0.5
    _check_fwd_bwd(lambda x, a, b: ops.layer_norm_modulate(x, a, b, 1e-6),
                   lambda x, a, b: reference.layer_norm_modulate(x, a, b, 1e-6), [x, shift, scale], dtype, scale=2.0)


def test_layer_norm_modulate_reference_matches_adaln(seed):
    norm = torch.nn.LayerNorm(40, elementwise_affine=False, eps=1e-6, dtype=torch.float64)
    x = torch.randn(2, 6, 40, dtype=torch.float64)
    shift, scale = torch.randn(2, 40, dtype=torch.float64), torch.randn(2, 40, dtype=torch.float64)
    stock = norm(x) * (1 + scale[:, None]) + shift[:, None]
    assert_close(reference.layer_norm_modulate(x, shift[:, None], scale[:, None], 1e-6), stock, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual(dtype, seed):
    x, g, y = torch.randn(2, 7, 48), torch.randn(2, 1, 48), torch.randn(2, 7, 48)
    _check_fwd_bwd(lambda x, g, y: ops.gated_residual(x, g, y), reference.gated_residual, [x, g, y], dtype, scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mod_shape", [(2, 1, 48), (48,)], ids=["B1D", "D"])
def test_adaln_residual_composes_the_cpu_kernels(dtype, mod_shape, seed):
    """h and n against the float64 references composed, forward and every gradient; the cpu
    backend serves it with its own gated_residual and layer_norm_modulate kernels (counted)."""
    x, y = torch.randn(2, 7, 48) * 2, torch.randn(2, 7, 48)
    gate, shift, scale = torch.randn(mod_shape), torch.randn(mod_shape) * 0.5, torch.randn(mod_shape) * 0.5
    low = [_leaf(t, dtype) for t in (x, gate, y, shift, scale)]
    high = [_leaf(t, torch.float64) for t in (x, gate, y, shift, scale)]
    ops.reset_dispatch_stats()
    h, n = ops.adaln_residual(*low, 1e-6)
    served = ops.dispatch_stats()["served"]
    rh, rn = reference.adaln_residual(*high, 1e-6)
    assert h.dtype == n.dtype == dtype
    assert_close(h, rh, dtype, what="h")
    assert_close(n, rn, dtype, 2.0, what="n")
    gh, gn = torch.randn_like(rh), torch.randn_like(rn)  # both outputs carry gradient, as in a block
    ((h * gh.to(dtype)).sum() + (n * gn.to(dtype)).sum()).backward()
    ((rh * gh).sum() + (rn * gn).sum()).backward()
    for name, a, b in zip(("x", "gate", "y", "shift", "scale"), low, high, strict=False):
        assert_close(a.grad, b.grad, dtype, 2.0, f"grad {name}")
    assert served[("adaln_residual", "cpu", "composed(gated_residual, layer_norm_modulate)")] == 1
    assert served[("gated_residual", "cpu", "torch.addcmul")] == 1
    assert served[("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul")] == 1


def test_adaln_residual_reference_is_the_unfused_flux_code(seed):
    """The reference against diffusers' two statements, float64 (h is what the norm reads)."""
    norm = torch.nn.LayerNorm(40, elementwise_affine=False, eps=1e-6, dtype=torch.float64)
    x, a = torch.randn(2, 6, 40, dtype=torch.float64), torch.randn(2, 6, 40, dtype=torch.float64)
    gate, shift, scale = (torch.randn(2, 40, dtype=torch.float64) for _ in range(3))
    h = x + gate[:, None] * a
    n = norm(h) * (1 + scale[:, None]) + shift[:, None]
    rh, rn = reference.adaln_residual(x, gate[:, None], a, shift[:, None], scale[:, None], 1e-6)
    assert_close(rh, h, torch.float64, what="h")
    assert_close(rn, n, torch.float64, what="n")


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


def _adaln_args(**change):
    args = dict(x=torch.randn(2, 5, 8), gate=torch.randn(2, 1, 8), y=torch.randn(2, 5, 8), shift=torch.randn(2, 1, 8),
                scale=torch.randn(2, 1, 8))
    args.update(change)
    return tuple(args.values())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ops.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 6), torch.randn(1, 2, 4, 6)),
         "head dims differ"),
        (lambda: ops.attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)),
         "not a multiple"),
        (lambda: ops.attention(torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)), "must be 4-D"),
        (lambda: ops.attention(*(torch.randn(1, 2, 4, 8),) * 3, mask=torch.ones(3, 3, dtype=torch.bool)),
         "does not broadcast"),
        (lambda: ops.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8).half(), torch.randn(1, 2, 4, 8)),
         "dtypes differ"),
        (lambda: ops.attention(*(torch.randn(1, 2, 4, 8),) * 3, layout="SBHD"), "layout must be"),
        (lambda: ops.rms_norm(torch.randn(2, 8), torch.ones(7)), r"weight must be \(8,\)"),
        (lambda: ops.rms_norm(torch.randint(0, 3, (2, 8)), torch.ones(8)), "dtype torch.int64"),
        (lambda: ops.apply_rope(torch.randn(1, 2, 4, 7), _cos_sin(4, 8)), "must be even"),
        (lambda: ops.apply_rope(torch.randn(1, 2, 4, 8), _cos_sin(5, 8)), "cos/sin must be"),
        (lambda: ops.apply_rope(torch.randn(1, 2, 4, 8), torch.randn(4, 3, 2, 2)), "BFL freqs"),
        (lambda: ops.layer_norm_modulate(torch.randn(2, 3, 8), torch.randn(3, 1, 8), torch.randn(2, 1, 8)),
         "does not broadcast"),
        (lambda: ops.rope_freqs(torch.arange(4.0), 7), "positive even"),
        (lambda: ops.gated_residual(torch.randn(2, 3), torch.randn(2, 1), torch.randn(2, 4)), "must have x's shape"),
        (lambda: ops.adaln_residual(*_adaln_args(y=torch.randn(2, 3, 4))), "adaln_residual: y .* must have x's shape"),
        (lambda: ops.adaln_residual(*_adaln_args(gate=torch.randn(2, 5, 1, 8))), "adaln_residual: gate .* broadcast"),
        (lambda: ops.adaln_residual(*_adaln_args(shift=torch.randn(3, 1, 8))), "adaln_residual: shift .* does not"),
        (lambda: ops.adaln_residual(*_adaln_args(), eps=-1.0), "adaln_residual: eps must be"),
        (lambda: ops.adaln_residual(*_adaln_args(scale=torch.ones(2, 1, 8, dtype=torch.int32))), "torch.int32"),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_fallback_records_reason_and_strict_mode_raises():
    picky = Backend("picky", "cpu", lambda: None, frozenset({torch.float32}), True, "gloo", "cpu")
    flux_npu.register_backend(picky, replace=True)
    try:
        ops.register_kernel("rms_norm", "picky", "picky.rms",
                            check=lambda b, x, w, eps, od: None if x.shape[-1] <= 64 else f"row {x.shape[-1]} > 64")(
            lambda b, x, w, eps, od: F.rms_norm(x, (x.shape[-1],), w, eps))
        x = torch.randn(2, 128)
        out = ops.rms_norm(x, None, backend="picky")
        assert_close(out, reference.rms_norm(x.double(), None), torch.float32)
        stats = ops.dispatch_stats()
        assert stats["fallback"][("rms_norm", "picky", "picky.rms: row 128 > 64")] == 1
        assert stats["served"][("rms_norm", "picky", "reference")] == 1
        ops.rms_norm(torch.randn(2, 32), None, backend="picky")
        assert ops.dispatch_stats()["served"][("rms_norm", "picky", "picky.rms")] == 1
        ops.set_strict(True)
        with pytest.raises(ops.KernelDeclined, match="row 128 > 64"):
            ops.rms_norm(x, None, backend="picky")
        assert ops.explain("rms_norm", picky, x, None, 1e-6, None) == (None, ["picky.rms: row 128 > 64"])
    finally:
        flux_npu.backends.unregister_backend("picky")


def test_use_backend_context_sets_the_active_backend():
    seen = []
    ctx = Backend("ctxb", "cpu", lambda: None, frozenset({torch.float32}), True, "gloo", "cpu")
    flux_npu.register_backend(ctx, replace=True)
    try:
        ops.register_kernel("gated_residual", "ctxb", "ctx.gr")(lambda b, x, g, y: seen.append(b.name) or x + g * y)
        x = torch.randn(2, 4)
        with ops.use_backend("ctxb"):
            ops.gated_residual(x, x, x)
        ops.gated_residual(x, x, x)
        assert seen == ["ctxb"]
    finally:
        flux_npu.backends.unregister_backend("ctxb")


def test_qk_norm_rope_composes_the_backends_own_kernels_when_it_has_no_fused_one(seed):
    """The composition is a registered kernel (npu's, shared): a backend without a fused
    qk_norm_rope registers it, and its own rms_norm and apply_rope kernels serve the parts."""
    from flux_npu.kernels._common import check_qk_norm_rope, composed_qk_norm_rope

    plain = Backend("plainb", "cpu", lambda: None, frozenset({torch.float32}), True, "gloo", "cpu")
    flux_npu.register_backend(plain, replace=True)
    try:
        ops.register_kernel("rms_norm", "plainb", "p.rms")(lambda b, x, w, eps, od: reference.rms_norm(x, w, eps, od))
        ops.register_kernel("apply_rope", "plainb", "p.rope")(lambda b, x, f, sd: reference.apply_rope(x, f, sd))
        ops.register_kernel("qk_norm_rope", "plainb", "composed(rms_norm, apply_rope)",
                            check=check_qk_norm_rope)(composed_qk_norm_rope)
        q, k = torch.randn(2, 9, 3, 16), torch.randn(2, 9, 3, 16)
        wq, wk = torch.rand(16) + 0.5, torch.rand(16) + 0.5
        cs = _cos_sin(9, 16)
        qo, ko = ops.qk_norm_rope(q, k, wq, wk, cs, 1e-6, 1, backend="plainb")
        rq, rk = reference.qk_norm_rope(q.double(), k.double(), wq.double(), wk.double(),
                                        tuple(t.double() for t in cs), 1e-6, 1)
        assert_close(qo, rq, torch.float32) and assert_close(ko, rk, torch.float32)
        served = ops.dispatch_stats()["served"]
        assert served[("rms_norm", "plainb", "p.rms")] == 2 and served[("apply_rope", "plainb", "p.rope")] == 2
        assert not ops.dispatch_stats()["fallback"]
    finally:
        flux_npu.backends.unregister_backend("plainb")


# -- semantics and validation findings (issue 12 item 7): each of these failed before ----------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ops.rope_freqs(torch.arange(4.0), 8, theta=0.0), "theta must be a finite number > 0"),
        (lambda: ops.rope_freqs(torch.arange(4.0), 8, theta=-5.0), "theta must be a finite number > 0"),
        (lambda: ops.rms_norm(torch.randn(2, 8), None, out_dtype=torch.int32), "out_dtype must be None or a float"),
        (lambda: ops.gated_residual(torch.randn(1, 3, 8), torch.randn(2, 1, 8), torch.randn(1, 3, 8)),
         "without enlarging it"),
        (lambda: ops.apply_rope(torch.randn(1, 2, 4, 8), reference.rope_freqs(torch.arange(4.0)[None].expand(2, 4), 8)
                                [:, None]), "without enlarging it"),
        (lambda: ops.qk_norm_rope(*(torch.randn(1, 2, 4, 8),) * 2, torch.ones(1), None, _cos_sin(4, 8)),
         r"q_weight must be \(8,\)"),
        (lambda: ops.qk_norm_rope(*(torch.randn(1, 2, 4, 8),) * 2, None, torch.ones(8, 1), _cos_sin(4, 8)),
         r"k_weight must be \(8,\)"),
        (lambda: ops.qk_norm_rope(*(torch.randn(1, 2, 4, 8),) * 2, None, None, _cos_sin(1, 8)), "cos/sin must be"),
        (lambda: ops.qk_norm_rope(*(torch.randn(1, 2, 4, 8),) * 2, None, None, torch.randn(4, 2, 2, 2)), "BFL freqs"),
    ],
)
def test_bad_input_found_by_the_fault_sweep_gets_a_clear_error(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_fully_masked_rows_give_zeros_on_kernel_and_reference(seed):
    q, k, v = (torch.randn(2, 2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    keep = torch.rand(2, 1, 5, 5) > 0.4
    keep[..., 0] = True
    keep[0, :, 2] = False  # query row 2 of sample 0 attends to nothing
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    for mask in (keep, additive):
        ref = reference.attention(q, k, v, mask=mask)
        out = ops.attention(q, k, v, mask=mask)
        assert ref[0, :, 2].abs().max() == 0 and out[0, :, 2].abs().max() == 0
        assert_close(out, ref, torch.float64)
        g = torch.randn_like(ref)
        grads_ref = torch.autograd.grad(ref, (q, k, v), g)
        grads = torch.autograd.grad(out, (q, k, v), g)
        assert grads_ref[0][0, :, 2].abs().max() == 0
        for a, b in zip(grads, grads_ref, strict=False):
            assert_close(a, b, torch.float64)  # NaN never passes
    assert ops.dispatch_stats()["served"][("attention", "cpu", "torch.sdpa")] == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_general_bfl_matrices_kernel_matches_reference(dtype, seed):
    """BFL's apply_rope applies any 2x2 matrices; the CPU kernel used to assume rotations."""
    from flux import math as bfl_math

    x = torch.randn(2, 3, 7, 12)
    mats = torch.randn(2, 1, 7, 6, 2, 2)
    expect, _ = bfl_math.apply_rope(x.double(), x.double(), mats.double())
    assert_close(reference.apply_rope(x.double(), mats.double()), expect, torch.float64)
    _check_fwd_bwd(lambda x: ops.apply_rope(x, mats), lambda x: reference.apply_rope(x, mats.double()), [x], dtype)
    assert ops.dispatch_stats()["served"][("apply_rope", "cpu", "torch.complex_mul")] == 1


@pytest.mark.parametrize("form", ["bfl", "cos_sin"])
def test_zero_size_rope_returns_empty(form):
    for x in (torch.randn(0, 2, 4, 8), torch.randn(2, 0, 4, 8), torch.randn(1, 2, 0, 8)):
        freqs = reference.rope_freqs(torch.arange(float(x.shape[2])), 8, form=form)
        f = freqs if form == "cos_sin" else freqs[None, None]
        out = ops.apply_rope(x, f)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert reference.apply_rope(x, f).shape == x.shape  # the fallback of every backend
        qo, ko = ops.qk_norm_rope(x, x, torch.ones(8), torch.ones(8), f)
        assert qo.shape == ko.shape == x.shape
        assert reference.qk_norm_rope(x, x, torch.ones(8), torch.ones(8), f)[0].shape == x.shape


def test_rope_operand_cache_sees_data_reassignment_and_inplace_writes(seed):
    x = torch.randn(1, 2, 6, 8)
    cos, sin = _cos_sin(6, 8)
    assert_close(ops.apply_rope(x, (cos, sin)), reference.apply_rope(x.double(), (cos.double(), sin.double())),
                 torch.float32)
    cos2, sin2 = reference.rope_freqs(torch.arange(6.0) * 7.0, 8, form="cos_sin")
    cos.data, sin.data = cos2.clone(), sin2.clone()  # same objects, new storage
    assert_close(ops.apply_rope(x, (cos, sin)), reference.apply_rope(x.double(), (cos2.double(), sin2.double())),
                 torch.float32)
    cos.mul_(0.5)
    assert_close(ops.apply_rope(x, (cos, sin)), reference.apply_rope(x.double(), (cos2.double() * 0.5, sin2.double())),
                 torch.float32)


# -- planned dispatch (issue 9 item 1) ----------------------------------------------------------


def test_checks_run_once_per_signature_and_counts_stay_exact(monkeypatch):
    """Validation and kernel checks run on the first call of an input signature only; a new shape
    is a new signature (shape-dependent checks stay right); no environment read per call; every
    call is counted."""
    import os

    seen = []
    counting = Backend("countb", "cpu", lambda: None, frozenset({torch.float32}), True, "gloo", "cpu")
    flux_npu.register_backend(counting, replace=True)
    try:
        def check(b, x, w, eps, od):
            seen.append(tuple(x.shape))
            return None if x.shape[-1] <= 64 else f"row {x.shape[-1]} > 64"

        ops.register_kernel("rms_norm", "countb", "count.rms", check=check)(
            lambda b, x, w, eps, od: reference.rms_norm(x, w, eps, od))
        small, big = torch.randn(3, 32), torch.randn(3, 128)
        ops.rms_norm(small, None, backend=counting)  # plans and the default backend resolved before counting
        ops.gated_residual(small, small, small)

        class CountingEnviron(dict):
            reads = 0

            def get(self, *a):
                CountingEnviron.reads += 1
                return super().get(*a)

            def __getitem__(self, k):
                CountingEnviron.reads += 1
                return super().__getitem__(k)

        monkeypatch.setattr(os, "environ", CountingEnviron(os.environ))
        for _ in range(5):
            ops.rms_norm(small, None, backend=counting)
            ops.rms_norm(big, None, backend=counting)
            ops.gated_residual(small, small, small)  # default backend: cached, not re-read from the env
        assert CountingEnviron.reads == 0
        assert seen == [(3, 32), (3, 128)]
        stats = ops.dispatch_stats()
        assert stats["served"][("rms_norm", "countb", "count.rms")] == 6
        assert stats["served"][("rms_norm", "countb", "reference")] == 5
        assert stats["fallback"][("rms_norm", "countb", "count.rms: row 128 > 64")] == 5
        assert stats["served"][("gated_residual", "cpu", "torch.addcmul")] == 6
        ops.set_strict(True)  # strict applies to planned fallbacks too
        with pytest.raises(ops.KernelDeclined, match="row 128 > 64"):
            ops.rms_norm(big, None, backend=counting)
        ops.reset_dispatch_stats()
        assert not ops.dispatch_stats()["served"]
    finally:
        flux_npu.backends.unregister_backend("countb")


def test_bad_input_is_rejected_on_every_call_not_only_the_first():
    x = torch.randn(2, 8)
    ops.rms_norm(x, torch.ones(8))
    for _ in range(2):
        with pytest.raises(ValueError, match=r"weight must be \(8,\)"):
            ops.rms_norm(x, torch.ones(7))
        with pytest.raises(TypeError, match="must be a torch.Tensor"):
            ops.rms_norm([1.0, 2.0], None)


@pytest.mark.parametrize("backend_name", ["cpu", "cuda"])
def test_bool_mask_reaches_the_fused_kernel(backend_name, seed):
    """A boolean mask is served by the backend's SDPA kernel, not handed to the reference (cuda's
    code path runs on CPU tensors here through `with_device_type`)."""
    b = flux_npu.backends.get_backend("cpu") if backend_name == "cpu" else \
        flux_npu.backends.cuda.BACKEND.with_device_type("cpu")
    q, k, v = (torch.randn(2, 5, 2, 8) for _ in range(3))
    keep = torch.rand(2, 1, 5, 5) > 0.3
    keep[..., 0] = True
    out = ops.attention(q, k, v, mask=keep, layout="BSHD", backend=b)
    ref = reference.attention(q.double(), k.double(), v.double(), mask=keep, layout="BSHD")
    assert_close(out, ref, torch.float32)
    assert ops.dispatch_stats()["served"][("attention", backend_name, "torch.sdpa")] == 1
    assert not ops.dispatch_stats()["fallback"]
