"""The Triton kernels of the cuda backend, beyond the per-op numerics of tests/ops (which run every op's
catalogue samples, the Triton kernels' case tables among them, through this backend): persistent grids
and launch counts, out_dtype promotion, non-contiguous frequencies and general matrices, fp32 rows that
are constant or far off zero, opcheck of the custom ops, compile without graph breaks, the eager and
compiled entry points, poisoning, the checks' limits.

Tensors live on the `device` fixture: CUDA when a GPU is present (Triton compiled for real), else
CPU through Triton's interpreter (conftest sets TRITON_INTERPRET=1). References are computed in
float64 on the CPU. Every buffer a launcher allocates is NaN-poisoned first (`_triton.POISON`), so an
element a kernel fails to write makes rel_err infinite.
"""

import zlib

import pytest
import torch

from flux_npu.ops import reference
from flux_npu.testing import assert_close, tolerance

triton = pytest.importorskip("triton")

from flux_npu.kernels.cuda import _checks, _triton  # noqa: E402
from flux_npu.kernels.cuda import adaln_residual as AR  # noqa: E402
from flux_npu.kernels.cuda import apply_rope as ROPE  # noqa: E402
from flux_npu.kernels.cuda import layer_norm_modulate as LN  # noqa: E402
from flux_npu.kernels.cuda import qk_norm_rope as QK  # noqa: E402
from flux_npu.kernels.cuda import rms_norm as RMS  # noqa: E402

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_triton, "POISON", True)


@pytest.fixture
def launches(monkeypatch):
    """Records (kernel name, grid) of every Triton launch the custom ops make."""
    calls = []
    real = _triton.launch

    def recording(kernel):
        launcher = real(kernel)

        class Grid:
            def __getitem__(self, grid):
                calls.append((kernel.fn.__name__, tuple(grid)))
                return launcher[grid]

        return Grid()

    monkeypatch.setattr(_triton, "launch", recording)
    return calls


def _seed(*key):
    """A fixed seed per test case (crc32 of its parameters: stable across processes)."""
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def _leaf(t):
    return t.detach().requires_grad_()


def _ref_leaves(*ts):
    """float64 CPU copies of the inputs, as autograd leaves (the reference's inputs)."""
    return [None if t is None else t.detach().cpu().double().requires_grad_() for t in ts]


def _check_grads(pairs, dtype):
    for name, got, want in pairs:
        assert got is not None, f"{name}: no gradient"
        assert_close(got, want, dtype, what=f"grad {name}")


def _qkv_view(B, S, H, D, dtype, device, which=1):
    """A (B, S, H, D) non-contiguous view on `device`: chunk `which` of a fused qkv projection."""
    proj = torch.randn(B, S, 3 * H * D, dtype=dtype).to(device)
    return proj.chunk(3, dim=-1)[which].unflatten(-1, (H, D))


# -- RMSNorm -----------------------------------------------------------------------------------

# rms_norm's shapes (a strided qkv view, hidden and 4096-wide rows, an odd row, one row, 5 dims, a
# transposed input; with and without weight; three dtypes) are the catalogue's extra samples, run
# through ops.rms_norm on this backend by tests/ops/test_rms_norm.py (asserting this kernel served)


def test_rms_norm_out_dtype_promotes(device):
    """BFL's RMSNorm returns promote(x, scale): bf16 x with a float32 scale gives float32."""
    _seed("rms-out")
    x = _leaf(torch.randn(3, 11, 64, dtype=torch.bfloat16).to(device))
    w = _leaf(torch.randn(64).to(device))
    y = RMS.rms_norm(x, w, 1e-6, torch.float32)
    assert y.dtype == torch.float32
    g = torch.randn(y.shape).to(device)
    y.backward(g)
    xr, wr = _ref_leaves(x, w)
    yr = reference.rms_norm(xr, wr, 1e-6)
    yr.backward(g.cpu().double())
    assert_close(y, yr, torch.float32, scale=10, what="rms_norm out float32 (bf16 input)")
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert_close(x.grad, xr.grad, torch.bfloat16)
    assert_close(w.grad, wr.grad, torch.bfloat16)  # dw sums bf16-rounded-input terms


def _blocks_beyond_persistent(device, per_sm, groups=1) -> int:
    """A row-block count larger than the persistent grid on `device` (`per_sm` per SM over `groups`,
    or the interpreter's few programs), so each program loops over several blocks."""
    return _triton.persistent_programs(torch.device(device), 10**9, per_sm, groups) + 5


@pytest.mark.parametrize(
    "dtype, x_view, kernel",
    [
        (torch.float32, False, "_rms_norm_bwd"),
        (torch.bfloat16, True, "_rms_norm_words_bwd"),  # 16-bit rows read as 32-bit words
        (torch.float16, True, "_rms_norm_words_bwd"),
        (torch.bfloat16, False, "_rms_norm_bwd"),  # an odd storage offset: rows not 4-byte aligned
    ],
)
def test_rms_norm_weight_grad_on_a_persistent_grid(device, launches, dtype, x_view, kernel):
    """More row blocks than the persistent grid: the backward runs as many programs per SM as fit
    (a few under the interpreter), each looping over blocks (prefetching the next) and writing one
    partial dw row, and still matches; with the kernel the launcher picks for the dtype and
    alignment (short 16-bit rows starting 4-byte aligned: read and written as int32 words)."""
    _seed("rms-persistent", dtype, x_view)
    per_sm = RMS.bwd_programs_per_sm(64)
    n = _blocks_beyond_persistent(device, per_sm)
    if x_view:  # a strided (B, S, H, D) view, rows 64 apart from a fused projection
        x = _leaf(_qkv_view(n, 32, 2, 64, dtype, device))
    else:  # 64 rows of 64 per block, or (bfloat16) starting one element into its storage
        base = torch.randn(n * 32 * 2 * 64 + (dtype != torch.float32)).to(dtype=dtype, device=device)
        x = _leaf(base[(dtype != torch.float32):].view(n, 32, 2, 64))
    w = _leaf(torch.randn(64).to(device))
    y = RMS.rms_norm(x, w, 1e-6)
    g = torch.randn(y.shape).to(dtype=dtype, device=device)
    y.backward(g)
    xr, wr = _ref_leaves(x, w)
    reference.rms_norm(xr, wr, 1e-6).backward(g.cpu().double())
    _check_grads([("x", x.grad, xr.grad), ("weight", w.grad, wr.grad)], dtype)
    (bwd,) = [grid for name, grid in launches if name.startswith("_rms_norm") and name.endswith("_bwd")]
    assert [name for name, _ in launches if name.endswith("_bwd")] == [kernel], launches
    (fwd,) = [grid for name, grid in launches if name == "_rms_norm_fwd"]
    assert bwd[0] == _triton.persistent_programs(x.device, 2 * fwd[0], per_sm) < 2 * fwd[0], (bwd, fwd)


# -- RoPE --------------------------------------------------------------------------------------

def _cos_sin(S, D, device, dtype=torch.float32):
    pos = torch.randperm(4 * S)[:S].float()  # arbitrary positions, not just 0..S-1
    return tuple(t.to(device=device, dtype=dtype) for t in reference.rope_freqs(pos, D, theta=10000.0, form="cos_sin"))


def _bfl(B, S, D, device, batch_dim=True):
    pos = torch.rand(B if batch_dim else 1, S) * 64
    pe = reference.rope_freqs(pos, D, form="bfl").float()  # (B, S, D/2, 2, 2)
    if not batch_dim:
        return pe[0].to(device)  # (S, D/2, 2, 2): broadcast over batch and heads
    return pe.unsqueeze(1).to(device)  # (B, 1, S, D/2, 2, 2) as BFL's EmbedND


def _double(freqs):
    return freqs.cpu().double() if isinstance(freqs, torch.Tensor) else tuple(t.cpu().double() for t in freqs)


# apply_rope's Triton cases (three dtypes) are the catalogue's extra samples (catalogue/apply_rope.py
# ROPE_CASES), run through ops.apply_rope on this backend by tests/ops/test_apply_rope.py (asserting
# this kernel served)


def test_apply_rope_general_matrices(device):
    """The BFL form reads all four matrix entries: a non-rotation matrix must match too."""
    _seed("rope-general")
    x = _leaf(torch.randn(2, 3, 5, 10).to(device))
    m = torch.randn(2, 1, 5, 5, 2, 2)
    y = ROPE.apply_rope(x, m.to(device))
    g = torch.randn(y.shape).to(device)
    y.backward(g)
    (xr,) = _ref_leaves(x)
    yr = reference.apply_rope(xr, m.double())
    yr.backward(g.cpu().double())
    assert_close(y, yr, torch.float32)
    assert_close(x.grad, xr.grad, torch.float32, what="grad x")


def test_apply_rope_noncontiguous_frequencies(device):
    """cos contiguous with sin a transposed view, and BFL matrices whose (D/2, 2, 2) rows are not
    contiguous: the launcher must not read either with the wrong strides."""
    _seed("rope-strides")
    S, D = 9, 12
    cos, sin = _cos_sin(S, D, device)
    sin_t = sin.t().contiguous().t()  # same values, strides (1, S)
    assert sin_t.stride() != cos.stride()
    m = torch.randn(1, 1, S, 2, 2, D // 2).to(device).permute(0, 1, 2, 5, 3, 4)  # (1, 1, S, D/2, 2, 2) view
    assert not m.is_contiguous()
    for freqs, ref_freqs, seq, x in [
        ((cos, sin_t), (cos.cpu().double(), sin.cpu().double()), 1, torch.randn(2, S, 3, D)),
        (m, m.cpu().double(), 2, torch.randn(2, 3, S, D)),
    ]:
        x = _leaf(x.to(device))
        y = ROPE.apply_rope(x, freqs, seq)
        g = torch.randn(y.shape).to(device)
        y.backward(g)
        (xr,) = _ref_leaves(x)
        yr = reference.apply_rope(xr, ref_freqs, seq)
        yr.backward(g.cpu().double())
        assert_close(y, yr, torch.float32)
        assert_close(x.grad, xr.grad, torch.float32, what="grad x")


# -- QK-norm + RoPE ----------------------------------------------------------------------------

# qk_norm_rope at the first five rope cases, with and without weights, three dtypes, one launch each
# way: the catalogue's extra samples, run by tests/ops/test_qk_norm_rope.py (launches recorded there)


def test_qk_norm_rope_mixed_inputs_take_two_launches(device, launches):
    """k without a weight while q has one (never in Flux): still exact, one launch per tensor."""
    _seed("qk-mixed")
    q = _leaf(torch.randn(1, 2, 7, 32).to(device))
    k = _leaf(torch.randn(1, 2, 7, 32).to(device))
    qw = _leaf(torch.randn(32).to(device))
    freqs = _bfl(1, 7, 32, device)
    yq, yk = QK.qk_norm_rope(q, k, qw, None, freqs, 1e-6, 2)
    (yq.sum() + (yk * 2).sum()).backward()
    qr, kr, qwr = _ref_leaves(q, k, qw)
    rq, rk = reference.qk_norm_rope(qr, kr, qwr, None, _double(freqs), 1e-6, 2)
    (rq.sum() + (rk * 2).sum()).backward()
    assert_close(yq, rq, torch.float32, what="q")
    assert_close(yk, rk, torch.float32, what="k")
    _check_grads([("q", q.grad, qr.grad), ("k", k.grad, kr.grad), ("q_weight", qw.grad, qwr.grad)], torch.float32)
    assert [name for name, _ in launches] == ["_rope_fwd", "_rope_fwd", "_rope_bwd", "_rope_bwd"]


@pytest.mark.parametrize(
    "form, dtype, layout, D, kernel",
    [
        ("cos_sin", torch.bfloat16, "qkv", 64, "_rope_words_bwd"),  # Flux's: q and k thirds of a fused projection
        ("bfl", torch.float16, "dense", 48, "_rope_words_bwd"),  # BFL matrices; rows shorter than the tile
        ("cos_sin", torch.bfloat16, "odd", 64, "_rope_bwd"),  # rows start 2 bytes into a word
        ("bfl", torch.bfloat16, "split", 64, "_rope_bwd"),  # a row block spans two runs of n2
        ("cos_sin", torch.float32, "dense", 64, "_rope_bwd"),
    ],
)
def test_qk_norm_rope_weight_grads_on_a_persistent_grid(device, launches, form, dtype, layout, D, kernel):
    """qk_norm_rope with both weights, more row blocks than the persistent grid: each program loops
    over several blocks (prefetching the next) and the gradients of q, k and both weights match the
    float64 reference, with the kernel the launcher picks: 16-bit rows starting 4-byte aligned whose
    row blocks lie in one run of the innermost leading dim take _rope_words_bwd (words, frequencies
    re-laid by `word_freqs`), any other _rope_bwd."""
    _seed("qk-persistent", form, dtype, layout, D)
    bm = _triton.block_sizes(D, 10**6, ROPE.BWD_TILE)[0]
    n = _blocks_beyond_persistent(device, ROPE.BWD_PROGRAMS_PER_SM[form == "cos_sin", True])
    off = bm // 2 if layout == "split" else 0  # n2, the innermost leading dim, a multiple of bm or not
    if form == "cos_sin":  # diffusers' (B, S, H, D), sequence dim 1: n2 = H
        S, shape, seq = n, (1, n, bm + off, D), 1
        freqs = _cos_sin(S, D, device)
    else:  # BFL's (B, H, S, D), sequence dim 2: n2 = S
        S = bm * -(-n // 2) + off
        shape, seq = (1, 2, S, D), 2
        freqs = _bfl(1, S, D, device)
    if layout == "qkv":
        q, k = (_leaf(_qkv_view(*shape, dtype, device, which)) for which in (0, 1))
    elif layout == "odd":
        q, k = (_leaf(torch.randn(torch.Size(shape).numel() + 1).to(dtype=dtype,
                                   device=device)[1:].view(shape)) for _ in range(2))
    else:
        q, k = (_leaf(torch.randn(shape).to(dtype=dtype, device=device)) for _ in range(2))
    qw, kw = (_leaf(torch.randn(D).to(device)) for _ in range(2))
    yq, yk = QK.qk_norm_rope(q, k, qw, kw, freqs, 1e-6, seq)
    gq, gk = (torch.randn(shape).to(dtype=dtype, device=device) for _ in range(2))
    torch.autograd.backward((yq, yk), (gq, gk))
    qr, kr, qwr, kwr = _ref_leaves(q, k, qw, kw)
    rq, rk = reference.qk_norm_rope(qr, kr, qwr, kwr, _double(freqs), 1e-6, seq)
    torch.autograd.backward((rq, rk), (gq.cpu().double(), gk.cpu().double()))
    _check_grads([("q", q.grad, qr.grad), ("k", k.grad, kr.grad), ("q_weight", qw.grad, qwr.grad),
                  ("k_weight", kw.grad, kwr.grad)], dtype)
    assert [name for name, _ in launches] == ["_rope_fwd", kernel], launches
    (bwd,) = [grid for name, grid in launches if name == kernel]
    blocks = torch.Size(shape).numel() // D // bm
    assert bwd[0] < blocks, (bwd, blocks)  # persistent: each program loops over blocks


# -- AdaLN modulation --------------------------------------------------------------------------

# layer_norm_modulate's shapes (strided embedding thirds at 200 and 3072 wide, D-only, full-shape and
# 4-D modulation, more row blocks than persistent programs; three dtypes) are the catalogue's extra
# samples, run through ops.layer_norm_modulate on this backend by tests/ops/test_layer_norm_modulate.py
# (asserting this kernel served)


def _ln_run(x, shift, scale, sh_leaf, sc_leaf, dtype, device):
    y = LN.layer_norm_modulate(x, shift, scale, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    g = torch.randn(y.shape, dtype=dtype).to(device)
    y.backward(g)
    xr, sr, cr = _ref_leaves(x, shift, scale)
    yr = reference.layer_norm_modulate(xr, sr, cr, 1e-6)
    yr.backward(g.cpu().double())
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


@pytest.mark.parametrize("rows", ["constant", "offset-1e4"])
@pytest.mark.parametrize("D", [64, 3072])
def test_layer_norm_modulate_fp32_constant_and_offset_rows(rows, D, device):
    """Rows of equal values (variance 0) and rows with a large common offset: the float32 kernel
    must stay at float32 accuracy against float64 (an uncorrected mean left ~1e-4 in every xhat of
    a constant row: relative error 4.3e-5 on an H100)."""
    _seed("ln-const", rows, D)
    if rows == "constant":
        x = torch.rand(2, 9, 1).mul(8).sub(4).expand(2, 9, D).contiguous()  # a different value per row
        x[1, 4] = 1e4  # and one large constant row
    else:
        x = 1e4 + torch.randn(2, 9, D) * 0.1
    x = _leaf(x.to(device))
    sh_leaf, sc_leaf = _leaf(torch.randn(2, 1, D).to(device)), _leaf(torch.randn(2, 1, D).to(device))
    _ln_run(x, sh_leaf, sc_leaf, sh_leaf, sc_leaf, torch.float32, device)
    if rows == "constant":  # LayerNorm of a constant row is exactly 0: y is exactly the shift
        with torch.no_grad():
            y = LN.layer_norm_modulate(x, sh_leaf, sc_leaf, 1e-6)
        assert torch.equal(y, sh_leaf.detach().expand_as(y))


def test_layer_norm_modulate_grads_on_a_persistent_grid(device, launches):
    _seed("ln-persistent")
    per_sm = LN.BWD_PROGRAMS_PER_SM
    x = _leaf(torch.randn(2, 64 * _blocks_beyond_persistent(device, per_sm, 2) - 7, 48).to(device))  # 64-row blocks
    sh, sc = _leaf(torch.randn(2, 1, 48).to(device)), _leaf(torch.randn(2, 1, 48).to(device))
    _ln_run(x, sh, sc, sh, sc, torch.float32, device)
    (fwd,) = [grid for name, grid in launches if name == "_ln_mod_fwd"]
    (bwd,) = [grid for name, grid in launches if name == "_ln_mod_bwd"]
    programs = _triton.persistent_programs(x.device, fwd[1], per_sm, groups=2)  # per group: the SMs' share
    assert fwd[0] == bwd[0] == 2 and bwd[1] == programs < fwd[1], (fwd, bwd)


# -- custom ops: opcheck and torch.compile -----------------------------------------------------

def _op_cases(device):
    """(op, args) for every custom op, small inputs requiring grad where the op is differentiable
    (tests/test_custom_ops.py also reads this table: every flux_npu op needs a case here)."""
    _seed("opcheck")

    def r(*shape, grad=False):
        t = torch.randn(*shape).to(device)
        return t.requires_grad_() if grad else t

    x4 = r(1, 2, 5, 24, grad=True)
    cos, sin = _cos_sin(5, 24, device)
    bfl = _bfl(1, 5, 24, device)
    x3, sh, sc = r(2, 5, 40, grad=True), r(2, 40, grad=True), r(2, 40, grad=True)
    q4, k4 = r(1, 2, 5, 24), r(1, 2, 5, 24)
    dq, dk = r(1, 2, 5, 24), r(1, 2, 5, 24)
    return {
        "rms_norm": (RMS.rms_norm_op, (x4, r(24, grad=True), 1e-6, torch.float32)),
        "rms_norm/no-w/bf16-out": (RMS.rms_norm_op, (x4, None, 1e-6, torch.bfloat16)),
        "rms_norm_bwd": (RMS.rms_norm_bwd_op, (r(1, 2, 5, 24), r(24), r(1, 2, 5, 24), 1e-6)),
        "apply_rope/cos_sin": (ROPE.apply_rope_op, (x4, cos, sin, 2)),
        "apply_rope/bfl": (ROPE.apply_rope_op, (x4, bfl, None, 2)),
        "apply_rope_bwd": (ROPE.apply_rope_bwd_op, (r(1, 2, 5, 24), bfl, None, 2)),
        "qk_norm_rope": (
            QK.qk_norm_rope_op, (x4, r(1, 2, 5, 24, grad=True), r(24, grad=True), r(24, grad=True), cos, sin, 1e-6, 2),
        ),
        "qk_norm_rope_bwd": (QK.qk_norm_rope_bwd_op, (q4, k4, r(24), None, bfl, None, dq, dk, 1e-6, 2)),
        "layer_norm_modulate": (LN.layer_norm_modulate_op, (x3, sh, sc, 1e-6)),
        "layer_norm_modulate_bwd": (
            LN.layer_norm_modulate_bwd_op, (r(2, 5, 40), r(2, 40), r(2, 40), r(2, 5, 40), 1e-6),
        ),
        "adaln_residual": (AR.adaln_residual_op, (x3, sh, r(2, 5, 40, grad=True), sh, sc, 1e-6)),
        "adaln_residual_bwd": (
            AR.adaln_residual_bwd_op,
            (r(2, 5, 40), r(2, 5, 40), r(2, 40), r(2, 40), r(2, 40), r(2, 5, 40), r(2, 5, 40), 1e-6),
        ),
    }


OPCHECK_CASES = list(_op_cases("cpu"))


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case, device):
    """torch.library.opcheck on every custom op: schema, autograd registration, fake (meta)
    implementation and AOT dispatch (what torch.compile relies on)."""
    op, args = _op_cases(device)[case]
    assert op._qualname.startswith("flux_npu::triton_")
    results = torch.library.opcheck(op, args)
    assert set(results.values()) == {"SUCCESS"}, results


def test_compiled_ops_no_graph_break(device):
    """The four ops inside one torch.compile(fullgraph=True) region, forward and backward, give
    the eager results (a graph break would raise under fullgraph)."""
    _seed("compile")
    q = torch.randn(1, 6, 2, 32).to(device).requires_grad_()
    k = torch.randn(1, 6, 2, 32).to(device).requires_grad_()
    w = torch.randn(32).to(device).requires_grad_()
    x = torch.randn(1, 6, 64).to(device).requires_grad_()
    emb = torch.randn(1, 128).to(device).requires_grad_()
    cos, sin = _cos_sin(6, 32, device)

    def block(q, k, w, x, emb):
        shift, scale = emb.chunk(2, dim=1)
        yq, yk = QK.qk_norm_rope(q, k, w, w, (cos, sin), 1e-6, 1)
        r = ROPE.apply_rope(RMS.rms_norm(q, w, 1e-6), (cos, sin), 1)
        h = LN.layer_norm_modulate(x, shift[:, None], scale[:, None], 1e-6)
        return yq.sum() + (yk * 2).sum() + (r * 3).sum() + (h * h).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = (q, k, w, x, emb)
    eager = torch.autograd.grad(block(*leaves), leaves)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for name, a, b in zip(["q", "k", "w", "x", "emb"], got, eager, strict=False):
        assert_close(a, b.double(), torch.float32, what=f"compiled grad {name}")


def test_eager_calls_take_the_autograd_function_and_compiled_calls_the_custom_op(device):
    """Eager: the autograd.Function whose forward launches (cheaper on the host than a custom-op
    call), both through the module function and through the dispatching op; under torch.compile:
    the custom op (checked in test_compiled_ops_no_graph_break's graph)."""
    from flux_npu import ops
    from flux_npu.backends import cuda

    x = torch.randn(2, 3, 16).to(device).requires_grad_()
    y = RMS.rms_norm(x, None, 1e-6)
    assert type(y.grad_fn).__name__ == "RMSNormFunctionBackward", type(y.grad_fn).__name__
    b = cuda.BACKEND if device.type == "cuda" else cuda.BACKEND.with_device_type("cpu")
    y = ops.rms_norm(x, None, 1e-6, backend=b)
    assert type(y.grad_fn).__name__ == "RMSNormFunctionBackward", type(y.grad_fn).__name__
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    torch.compile(lambda t: RMS.rms_norm(t, None, 1e-6), backend=backend, fullgraph=True)(x)
    assert "flux_npu.triton_rms_norm.default" in seen, seen


# -- harness -----------------------------------------------------------------------------------

def test_poisoned_buffers_are_nan_and_caught():
    """The harness itself: poisoned buffers are NaN, and a NaN output fails assert_close."""
    buf = _triton.empty((3, 4), torch.bfloat16, "cpu")
    assert torch.isnan(buf).all()
    ref = torch.ones(3, 4)
    buf[:, :3] = 1.0  # one column "forgotten"
    with pytest.raises(AssertionError):
        assert_close(buf, ref, torch.bfloat16)
    assert tolerance(torch.bfloat16) == 1e-2


def test_check_limits_mirror_the_kernels():
    """The triton-free checks decline exactly what the launchers cannot take."""
    assert _checks.MAX_ROW == _triton.MAX_ROW
    assert _triton.block_sizes(3072, 10**6)[1] == 4096 and _triton.block_sizes(128, 10**6) == (32, 128)
