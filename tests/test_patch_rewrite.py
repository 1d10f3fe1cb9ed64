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
        assert rows["Block.forward"].reason.startswith("2 LayerNorm+modulate -> ops.layer_norm_modulate, 1 gated")
        assert rows["Plain.forward"].status == "skipped" and "nothing to fuse" in rows["Plain.forward"].reason
        assert rows["UsesSuper.forward"].status == "skipped" and "closure" in rows["UsesSuper.forward"].reason
        ops.reset_dispatch_stats()
        patched = block(*args)
        served = ops.dispatch_stats()["served"]
    assert served[("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul")] == 2
    assert served[("gated_residual", "cpu", "torch.addcmul")] == 1
    torch.testing.assert_close(patched, stock, rtol=1e-5, atol=1e-6)


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
    assert reasons == {"test Block: not a plain LayerNorm + same-dtype modulation": 2}


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
