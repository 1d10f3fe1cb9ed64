"""The source rewrite of block forwards (patches/rewrite.py): which expressions it takes, that the
helpers compute exactly the original expression when the fused op does not apply (and count the
hand-back), that everything else runs as written (line numbers included), and that forwards it
cannot rewrite are skipped rows, not errors."""

import sys
import textwrap
import traceback

import pytest
import torch

import flux_npu
from flux_npu import ops
from flux_npu.patches import engine
from flux_npu.patches.rewrite import NothingToFuse, rewrite_function

SOURCE = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim, affine=False):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)
        self.lin = nn.Linear(dim, dim)

    def forward(self, x, shift, scale, gate, fail=False):
        h = self.norm(x)
        h = h * (1 + scale) + shift
        y = self.lin(h)
        if fail:
            raise RuntimeError("raised on purpose")  # line 17 of this file
        x = x + gate * y
        return (1 + scale) * self.norm(x) + shift


class Plain(nn.Module):
    def forward(self, x):
        return x * 2


class UsesSuper(nn.Linear):
    def forward(self, x):
        return super().forward(x) + x
'''


@pytest.fixture
def blocks(tmp_path, monkeypatch):
    (tmp_path / "rewrite_target.py").write_text(textwrap.dedent(SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import rewrite_target

    ps = engine.register_patch_set(engine.PatchSet(
        target="test-rewrite", matches=engine.exact("rewrite_target"),
        specs=[engine.Spec(f"{c}.forward", lambda o, b, e, c=c: rewrite_function(o, b, e, f"test {c}"), "rewrite",
                           ops=("layer_norm_modulate", "gated_residual")) for c in ("Block", "Plain", "UsesSuper")]))
    yield rewrite_target
    for h in engine.live_handles():
        h.undo()
    engine._SETS["test-rewrite"].remove(ps)
    del engine._SETS["test-rewrite"]
    del sys.modules["rewrite_target"]


def _args(dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 5, dim, generator=g), torch.randn(2, 1, dim, generator=g),
            torch.randn(2, 1, dim, generator=g), torch.randn(2, 1, dim, generator=g))


def test_rewritten_block_serves_both_forms_and_matches(blocks):
    torch.manual_seed(0)
    block = blocks.Block(12)
    args = _args()
    stock = block(*args)
    with flux_npu.patch("cpu", targets=["test-rewrite"]) as handle:
        rows = {r.symbol: r for r in handle.report()}
        assert rows["Block.forward"].status == "patched"
        # the gated residual followed by the norm of its result is one fused op; the first norm is alone
        assert rows["Block.forward"].reason.startswith(
            "1 gated residual + LayerNorm+modulate -> ops.adaln_residual, 1 LayerNorm+modulate -> "
            "ops.layer_norm_modulate"), rows["Block.forward"].reason
        assert rows["Plain.forward"].status == "skipped" and "nothing to fuse" in rows["Plain.forward"].reason
        assert rows["UsesSuper.forward"].status == "skipped" and "closure" in rows["UsesSuper.forward"].reason
        ops.reset_dispatch_stats()
        patched = block(*args)
        served = ops.dispatch_stats()["served"]
    assert served[("adaln_residual", "cpu", "composed(gated_residual, layer_norm_modulate)")] == 1
    # the cpu backend's adaln_residual is its two kernels composed: one direct norm + one inside it
    assert served[("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul")] == 2
    assert served[("gated_residual", "cpu", "torch.addcmul")] == 1
    torch.testing.assert_close(patched, stock, rtol=1e-5, atol=1e-6)


def test_fused_residual_hands_each_half_back_on_its_own(blocks):
    """A gate of one value per token (2, 5, 1), which the fused ops do not take: the gated residual
    hands back (original expression), the norm of its result still takes ops.layer_norm_modulate;
    no adaln_residual call."""
    torch.manual_seed(0)
    block = blocks.Block(12)
    x, shift, scale, _ = _args()
    gate = torch.randn(2, 5, 1)
    stock = block(x, shift, scale, gate)
    with flux_npu.patch("cpu", targets=["test-rewrite"]):
        ops.reset_dispatch_stats()
        patched = block(x, shift, scale, gate)
        stats = ops.dispatch_stats()
    assert not [k for k in stats["served"] if k[0] == "adaln_residual"]
    assert stats["served"][("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul")] == 2
    assert stats["fallback"][("gated_residual", "cpu", "test Block: shapes or dtypes of x + gate * y differ")] == 1
    torch.testing.assert_close(patched, stock, rtol=1e-5, atol=1e-6)


def test_rewrite_shapes_of_the_fusion():
    """Both Flux spellings become one `h, n = _adares(...)`; a norm whose shift reads h, or that runs
    only on one branch, is not fused."""
    def diffusers_like(self, h, a, gate, sh, sc):
        a = gate * a
        h = h + a
        n = self.norm2(h)
        n = n * (1 + sc) + sh
        return h, n

    def bfl_like(self, img, a, gate1, gate2, sh, sc):
        img = img + gate1 * self.proj(a)
        img = img + gate2 * self.mlp((1 + sc) * self.norm2(img) + sh)
        return img

    def shift_reads_h(self, h, a, gate, sc):
        h = h + gate * a
        return (1 + sc) * self.norm2(h) + h

    def norm_only_sometimes(self, h, a, gate, sh, sc, cond):
        h = h + gate * a
        return ((1 + sc) * self.norm2(h) + sh) if cond else h

    b, on = flux_npu.get_backend("cpu"), frozenset(engine.OP_NAMES)
    assert rewrite_function(diffusers_like, b, on, "t").__flux_npu_what__.startswith(
        "1 gated residual + LayerNorm+modulate -> ops.adaln_residual (")
    assert rewrite_function(bfl_like, b, on, "t").__flux_npu_what__.startswith(
        "1 gated residual + LayerNorm+modulate -> ops.adaln_residual, 1 gated residual(s)")
    what = rewrite_function(shift_reads_h, b, on, "t").__flux_npu_what__
    assert "adaln_residual" not in what and "1 gated residual(s)" in what and "1 LayerNorm+modulate" in what
    what = rewrite_function(norm_only_sometimes, b, on, "t").__flux_npu_what__  # the norm may not run
    assert "adaln_residual" not in what and "1 gated residual(s)" in what and "1 LayerNorm+modulate" in what
    # with either half excluded nothing is fused
    assert "adaln_residual" not in rewrite_function(bfl_like, b, on - {"gated_residual"}, "t").__flux_npu_what__


DOUBLE_BLOCK_DTYPES = [torch.float32, torch.bfloat16]


def _assert_near_float64(patched, stock, dtype):
    """patched and stock runs in `dtype`, as relative errors against the float64 stock run: float32
    within its tolerance; bf16, where a whole Flux stack drifts by a few 1e-2 on its own, about as
    close as stock bf16 (the output within 1.5x, every gradient within 3x, or within the bf16 bound)."""
    from flux_npu.testing import tolerance

    if dtype == torch.float32:
        bad = {k: e for k, e in patched.items() if not e <= tolerance(dtype, 10)}
    else:
        bad = {k: (e, stock[k]) for k, e in patched.items()
               if not e <= max((1.5 if k == "out" else 3) * stock[k], tolerance(dtype, 1 if k == "out" else 3))}
    assert not bad, bad


@pytest.mark.parametrize("dtype", DOUBLE_BLOCK_DTYPES, ids=str)
def test_diffusers_double_blocks_use_the_fused_op(dtype):
    """Patched diffusers Flux (cpu backend) against the stock model in float64, forward and every
    gradient; each double block's hidden and encoder streams take ops.adaln_residual."""
    from flux_helpers import cast_inputs, diffusers_model_and_inputs, diffusers_run, errors

    model, inputs = diffusers_model_and_inputs(res=64, text_len=5, seed=7)
    ref = diffusers_run(model.double(), cast_inputs(inputs, torch.float64))
    model.to(dtype)
    stock = diffusers_run(model, cast_inputs(inputs, dtype))
    with flux_npu.patch("cpu", targets=["diffusers"]):
        ops.reset_dispatch_stats()
        run = diffusers_run(model, cast_inputs(inputs, dtype))
        served = ops.dispatch_stats()["served"]
    n_double = len(model.transformer_blocks)
    assert served[("adaln_residual", "cpu", "composed(gated_residual, layer_norm_modulate)")] == 2 * n_double
    _assert_near_float64(errors(run, ref), errors(stock, ref), dtype)


@pytest.mark.parametrize("dtype", DOUBLE_BLOCK_DTYPES, ids=str)
def test_bfl_double_blocks_use_the_fused_op(dtype):
    """The same for the BFL layout (tests/bfl_model): DoubleStreamBlock's img and txt streams."""
    from flux_helpers import bfl_inputs, bfl_model, bfl_run, cast_bfl_inputs, errors

    model = bfl_model(seed=3)
    inputs = bfl_inputs(model, seed=3)
    ref = bfl_run(model.double(), cast_bfl_inputs(inputs, torch.float64))
    model.to(dtype)
    stock = bfl_run(model, cast_bfl_inputs(inputs, dtype))
    with flux_npu.patch("cpu", targets=["bfl"]):
        ops.reset_dispatch_stats()
        run = bfl_run(model, cast_bfl_inputs(inputs, dtype))
        served = ops.dispatch_stats()["served"]
    assert served[("adaln_residual", "cpu", "composed(gated_residual, layer_norm_modulate)")] == 2 * len(
        model.double_blocks)
    _assert_near_float64(errors(run, ref), errors(stock, ref), dtype)


def test_affine_norm_hands_back_with_the_exact_original_expression(blocks):
    torch.manual_seed(0)
    block = blocks.Block(12, affine=True)
    args = _args()
    stock = block(*args)
    # gated residuals excluded so that only the hand-back path runs: bit-equal to stock
    with flux_npu.patch("cpu", targets=["test-rewrite"], exclude=["gated_residual"]):
        ops.reset_dispatch_stats()
        patched = block(*args)
        stats = ops.dispatch_stats()
    assert torch.equal(patched, stock)  # the same expression, evaluated the same way
    reasons = {r: n for (op, b, r), n in stats["fallback"].items() if op == "layer_norm_modulate"}
    assert reasons == {
        "test Block: not a plain LayerNorm (without hooks or an instance forward) + same-dtype modulation": 2}


def test_excluded_ops_keep_plain_arithmetic_and_errors_keep_their_line(blocks):
    torch.manual_seed(0)
    block = blocks.Block(12)
    args = _args()
    with flux_npu.patch("cpu", targets=["test-rewrite"], exclude=["gated_residual"]):
        ops.reset_dispatch_stats()
        block(*args)
        served = ops.dispatch_stats()["served"]
        assert not [k for k in served if k[0] == "gated_residual"] and served[
            ("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul")] == 2
        with pytest.raises(RuntimeError, match="raised on purpose") as info:
            block(*args, fail=True)
    frame = traceback.extract_tb(info.value.__traceback__)[-1]
    assert frame.filename == blocks.__file__ and frame.lineno == 17


def test_nothing_to_fuse_is_an_exception_the_engine_reports():
    def forward(self, x):
        return x

    with pytest.raises(NothingToFuse, match="no expression we fuse"):
        rewrite_function(forward, flux_npu.get_backend("cpu"), frozenset(engine.OP_NAMES), "t")
