"""The Triton kernels of the cuda backend, forward and backward, against the float64 references.

Without a GPU they run on CPU tensors through Triton's interpreter (conftest sets
TRITON_INTERPRET=1). Every buffer a launcher allocates is NaN-poisoned first (`_utils.POISON`), so
an element a kernel fails to write makes rel_err infinite. Inputs are fresh seeded random tensors
per case; shapes include odd sizes, non-powers of two and strided (B, S, H, D) views of the kind
Flux takes of its projections.
"""

import zlib

import pytest
import torch

from flux_npu.ops import reference
from flux_npu.testing import assert_close, tolerance

triton = pytest.importorskip("triton")

from flux_npu.kernels import triton as T  # noqa: E402
from flux_npu.kernels.triton import _utils  # noqa: E402

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_utils, "POISON", True)


def _seed(*key):
    """A fixed seed per test case (crc32 of its parameters: stable across processes)."""
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def _leaf(t):
    return t.detach().requires_grad_()


def _ref_leaves(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def _check_grads(pairs, dtype):
    for name, got, want in pairs:
        assert got is not None, f"{name}: no gradient"
        assert_close(got, want, dtype, what=f"grad {name}")


def _qkv_view(B, S, H, D, dtype, which=1):
    """A (B, S, H, D) non-contiguous view: chunk `which` of a fused qkv projection, unflattened."""
    proj = torch.randn(B, S, 3 * H * D, dtype=dtype)
    return proj.chunk(3, dim=-1)[which].unflatten(-1, (H, D))


# -- RMSNorm -----------------------------------------------------------------------------------

RMS_CASES = [
    ("qkv-view", (2, 37, 3, 128)),  # strided chunk of a fused projection, odd sequence length
    ("contig", (3, 5, 3072)),  # hidden-size rows, odd batch
    ("odd-row", (7, 100)),  # row not a power of two
    ("tiny", (1, 1, 1, 64)),
    ("5d", (2, 3, 2, 5, 24)),  # more than 4 dims are merged
    ("row-4096", (2, 3, 4096)),  # the longest row Flux normalises (T5 / wide variants)
    ("transposed", (5, 72)),  # last dim not unit-stride: copied, then read as rows
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_weight", [True, False], ids=["w", "no-w"])
@pytest.mark.parametrize("case,shape", RMS_CASES, ids=[c[0] for c in RMS_CASES])
def test_rms_norm(case, shape, with_weight, dtype):
    _seed("rms", case, with_weight, dtype)
    if case == "qkv-view":
        x = _qkv_view(*shape, dtype)
    elif case == "transposed":
        x = torch.randn(shape[::-1], dtype=dtype).t()
    else:
        x = torch.randn(shape, dtype=dtype)
    x = _leaf(x)
    w = _leaf(torch.randn(shape[-1], dtype=dtype)) if with_weight else None
    y = T.rms_norm(x, w, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    g = torch.randn_like(y)
    y.backward(g)
    xr, wr = _ref_leaves(x, w)
    yr = reference.rms_norm(xr, wr, 1e-6)
    yr.backward(g.double())
    assert_close(y, yr, dtype, what="rms_norm")
    _check_grads([("x", x.grad, xr.grad)] + ([("weight", w.grad, wr.grad)] if with_weight else []), dtype)


def test_rms_norm_out_dtype_promotes():
    """BFL's RMSNorm returns promote(x, scale): bf16 x with a float32 scale gives float32."""
    _seed("rms-out")
    x = _leaf(torch.randn(3, 11, 64, dtype=torch.bfloat16))
    w = _leaf(torch.randn(64))
    y = T.rms_norm(x, w, 1e-6, torch.float32)
    assert y.dtype == torch.float32
    g = torch.randn_like(y)
    y.backward(g)
    xr, wr = _ref_leaves(x, w)
    yr = reference.rms_norm(xr, wr, 1e-6)
    yr.backward(g.double())
    assert_close(y, yr, torch.float32, scale=10, what="rms_norm out float32 (bf16 input)")
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert_close(x.grad, xr.grad, torch.bfloat16)
    assert_close(w.grad, wr.grad, torch.bfloat16)  # dw sums bf16-rounded-input terms


# -- RoPE --------------------------------------------------------------------------------------

def _cos_sin(S, D, dtype=torch.float32):
    pos = torch.randperm(4 * S)[:S].float()  # arbitrary positions, not just 0..S-1
    return tuple(t.to(dtype) for t in reference.rope_freqs(pos, D, theta=10000.0, form="cos_sin"))


def _bfl(B, S, D, batch_dim=True):
    pos = torch.rand(B if batch_dim else 1, S) * 64
    pe = reference.rope_freqs(pos, D, form="bfl")  # (B, S, D/2, 2, 2)
    if not batch_dim:
        return pe[0]  # (S, D/2, 2, 2): broadcast over batch and heads
    return pe.unsqueeze(1)  # (B, 1, S, D/2, 2, 2) as BFL's EmbedND


ROPE_CASES = [
    # name, form, x layout, (B, S, H, D)
    ("diffusers-BSHD-view", "cos_sin", 1, (2, 37, 3, 24)),
    ("diffusers-BHSD", "cos_sin", 2, (1, 19, 2, 128)),
    ("bfl-BHSD", "bfl", 2, (2, 13, 3, 56)),
    ("bfl-broadcast", "bfl-nobatch", 2, (3, 9, 2, 16)),
    ("odd-pairs", "cos_sin", 1, (1, 7, 1, 6)),
]


def _rope_inputs(form, seq_dim, dims, dtype):
    B, S, H, D = dims
    if seq_dim == 1:
        x = _qkv_view(B, S, H, D, dtype, which=0)
    else:
        x = torch.randn(B, H, S, D, dtype=dtype)
    if form == "cos_sin":
        freqs = _cos_sin(S, D)
    else:
        freqs = _bfl(B, S, D, batch_dim=(form == "bfl"))
    return _leaf(x), freqs


def _double(freqs):
    return freqs.double() if isinstance(freqs, torch.Tensor) else tuple(t.double() for t in freqs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,form,seq_dim,dims", ROPE_CASES, ids=[c[0] for c in ROPE_CASES])
def test_apply_rope(case, form, seq_dim, dims, dtype):
    _seed("rope", case, dtype)
    x, freqs = _rope_inputs(form, seq_dim, dims, dtype)
    y = T.apply_rope(x, freqs, seq_dim)
    assert y.dtype == dtype and y.shape == x.shape
    g = torch.randn_like(y)
    y.backward(g)
    (xr,) = _ref_leaves(x)
    yr = reference.apply_rope(xr, _double(freqs), seq_dim)
    yr.backward(g.double())
    assert_close(y, yr, dtype, what="apply_rope")
    _check_grads([("x", x.grad, xr.grad)], dtype)


def test_apply_rope_general_matrices():
    """The BFL form reads all four matrix entries: a non-rotation matrix must match too."""
    _seed("rope-general")
    x = _leaf(torch.randn(2, 3, 5, 10))
    m = torch.randn(2, 1, 5, 5, 2, 2)
    y = T.apply_rope(x, m)
    g = torch.randn_like(y)
    y.backward(g)
    (xr,) = _ref_leaves(x)
    yr = reference.apply_rope(xr, m.double())
    yr.backward(g.double())
    assert_close(y, yr, torch.float32)
    assert_close(x.grad, xr.grad, torch.float32, what="grad x")


# -- QK-norm + RoPE ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_weight", [True, False], ids=["w", "no-w"])
@pytest.mark.parametrize("case,form,seq_dim,dims", ROPE_CASES[:4], ids=[c[0] for c in ROPE_CASES[:4]])
def test_qk_norm_rope(case, form, seq_dim, dims, with_weight, dtype):
    _seed("qk", case, with_weight, dtype)
    q, freqs = _rope_inputs(form, seq_dim, dims, dtype)
    k = _leaf(torch.randn(q.shape, dtype=dtype) * 3)
    D = q.shape[-1]
    qw = _leaf(torch.randn(D, dtype=dtype)) if with_weight else None
    kw = _leaf(torch.rand(D, dtype=dtype) + 0.5) if with_weight else None
    yq, yk = T.qk_norm_rope(q, k, qw, kw, freqs, 1e-6, seq_dim)
    gq, gk = torch.randn_like(yq), torch.randn_like(yk)
    (yq * gq).sum().add((yk * gk).sum()).backward()
    qr, kr, qwr, kwr = _ref_leaves(q, k, qw, kw)
    rq, rk = reference.qk_norm_rope(qr, kr, qwr, kwr, _double(freqs), 1e-6, seq_dim)
    (rq * gq.double()).sum().add((rk * gk.double()).sum()).backward()
    assert_close(yq, rq, dtype, what="q")
    assert_close(yk, rk, dtype, what="k")
    grads = [("q", q.grad, qr.grad), ("k", k.grad, kr.grad)]
    if with_weight:
        grads += [("q_weight", qw.grad, qwr.grad), ("k_weight", kw.grad, kwr.grad)]
    _check_grads(grads, dtype)


# -- AdaLN modulation --------------------------------------------------------------------------

LN_CASES = [
    # name, x shape, shift/scale shape, strided (chunks of one projection)
    ("B1D-chunks", (2, 37, 200), (2, 1, 200), True),
    ("flux-hidden", (3, 5, 3072), (3, 1, 3072), True),
    ("D-only", (5, 64), (64,), False),
    ("full", (2, 7, 48), (2, 7, 48), False),
    ("4d", (2, 3, 4, 40), (2, 1, 1, 40), False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,xs,ss,strided", LN_CASES, ids=[c[0] for c in LN_CASES])
def test_layer_norm_modulate(case, xs, ss, strided, dtype):
    _seed("ln", case, dtype)
    x = _leaf(torch.randn(xs, dtype=dtype) * 2 + 0.5)
    if strided:  # as AdaLayerNormZero: emb.chunk(...)[i][:, None], strided views of one projection
        emb = torch.randn(ss[0], 3 * ss[-1], dtype=dtype)
        sh_leaf, sc_leaf = _leaf(emb.chunk(3, dim=1)[0]), _leaf(emb.chunk(3, dim=1)[2])
        shift, scale = sh_leaf[:, None], sc_leaf[:, None]
    else:
        sh_leaf, sc_leaf = _leaf(torch.randn(ss, dtype=dtype)), _leaf(torch.randn(ss, dtype=dtype))
        shift, scale = sh_leaf, sc_leaf
    y = T.layer_norm_modulate(x, shift, scale, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    g = torch.randn_like(y)
    y.backward(g)
    xr, sr, cr = _ref_leaves(x, shift, scale)
    yr = reference.layer_norm_modulate(xr, sr, cr, 1e-6)
    yr.backward(g.double())
    assert_close(y, yr, dtype, what="layer_norm_modulate")
    assert sh_leaf.grad.dtype == dtype and sc_leaf.grad.dtype == dtype
    _check_grads(
        [
            ("x", x.grad, xr.grad),
            ("shift", sh_leaf.grad, sr.grad.reshape(sh_leaf.shape)),
            ("scale", sc_leaf.grad, cr.grad.reshape(sc_leaf.shape)),
        ],
        dtype,
    )


# -- poisoning works ---------------------------------------------------------------------------

def test_poisoned_buffers_are_nan_and_caught():
    """The harness itself: poisoned buffers are NaN, and a NaN output fails assert_close."""
    buf = _utils.empty((3, 4), torch.bfloat16, "cpu")
    assert torch.isnan(buf).all()
    ref = torch.ones(3, 4)
    buf[:, :3] = 1.0  # one column "forgotten"
    with pytest.raises(AssertionError):
        assert_close(buf, ref, torch.bfloat16)
    assert tolerance(torch.bfloat16) == 1e-2


def test_apply_rope_cos_sin_with_different_strides():
    """cos contiguous, sin a transposed view: the launcher must not read sin with cos's strides."""
    _seed("rope-strides")
    S, D = 9, 12
    cos, sin = _cos_sin(S, D)
    sin_t = sin.t().contiguous().t()  # same values, strides (1, S)
    assert sin_t.stride() != cos.stride()
    x = _leaf(torch.randn(2, S, 3, D))
    y = T.apply_rope(x, (cos, sin_t), 1)
    g = torch.randn_like(y)
    y.backward(g)
    (xr,) = _ref_leaves(x)
    yr = reference.apply_rope(xr, (cos.double(), sin.double()), 1)
    yr.backward(g.double())
    assert_close(y, yr, torch.float32)
    assert_close(x.grad, xr.grad, torch.float32, what="grad x")
