"""Across ops on the cpu backend: clear errors for bad input, fallback and strict mode, the active
backend, composed kernels, semantics findings (masked rows, empty RoPE, the RoPE operand cache),
planned dispatch. Each op's numerics on every backend live in tests/ops/test_<op>.py."""

import pytest
import torch
import torch.nn.functional as F

import flux_npu
from flux_npu import ops
from flux_npu.backends import Backend
from flux_npu.ops import reference
from flux_npu.testing import assert_close


def _cos_sin(S, D, theta=10000.0):
    return reference.rope_freqs(torch.arange(S, dtype=torch.float32) * 1.5, D, theta, form="cos_sin")


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


