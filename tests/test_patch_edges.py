"""Patch engine edges (issue 12 item 8, issue 11 items 4-8): patch() while the target module is
still importing, undo() interleaved with unittest.mock.patch, instance-level handles not kept alive
by the registry, a target library that fails to import with a non-ImportError, lazy
`import flux_npu.auto`, per-op switches, diffusers attention backends honoured, and the shared
`apply_rotary_emb` left alone for non-Flux (cos, sin)."""

import gc
import os
import subprocess
import sys
import textwrap
import weakref
from unittest import mock

import pytest
import torch
from flux_helpers import bfl_inputs, bfl_model, bfl_run, diffusers_model_and_inputs, diffusers_run, errors

import flux_npu
from flux_npu import ops
from flux_npu.patches import engine
from flux_npu.testing import assert_close, tolerance


def _write_pkg(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def _forget(prefix):
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


BFL_MATH_AFTER_PATCH = """
    import flux_npu
    import torch.nn.functional as F

    HANDLE = flux_npu.patch("cpu", targets=["bfl"])  # runs while this module is still importing

    def attention(q, k, v, pe):
        q, k = apply_rope(q, k, pe)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    def rope(pos, dim, theta):
        raise NotImplementedError

    def apply_rope(xq, xk, freqs_cis):
        return xq, xk
"""


def test_patch_while_the_target_module_is_importing_is_deferred_not_lost(tmp_path, monkeypatch):
    _write_pkg(tmp_path, {"halfpkg/__init__.py": "", "halfpkg/flux/__init__.py": "",
                          "halfpkg/flux/math.py": BFL_MATH_AFTER_PATCH})
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import halfpkg.flux.math as m

        handle = m.HANDLE
        rows = [r for r in handle.report() if r.target == "halfpkg.flux.math"]
        assert not [r for r in rows if "drifted" in r.reason], rows
        assert {r.symbol for r in rows if r.status == "patched"} >= {"attention", "rope", "apply_rope"}, rows
        assert any(r.status == "settled" and "still importing" in r.reason for r in rows)  # not left "deferred"
        assert getattr(m.attention, "__wrapped_original__", None) is not None
        q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
        pe = torch.eye(2).expand(1, 1, 5, 4, 2, 2)  # identity rotation
        ops.reset_dispatch_stats()
        m.attention(q, k, v, pe)
        assert ops.dispatch_stats()["served"][("attention", "cpu", "torch.sdpa")] == 1
        handle.undo()
        assert getattr(m.attention, "__wrapped_original__", None) is None
    finally:
        for h in engine.live_handles():
            h.undo()
        _forget("halfpkg")


def test_undo_interleaved_with_mock_patch_keeps_their_change_and_runs_the_original_after():
    import flux.math

    original = flux.math.attention
    handle = flux_npu.patch("cpu", targets=["bfl"])
    ours = flux.math.attention
    assert ours is not original

    def fake(q, k, v, pe):
        return "mocked"

    patcher = mock.patch.object(flux.math, "attention", fake)
    patcher.start()
    with pytest.warns(RuntimeWarning, match="replaced by someone else"):
        handle.undo()  # not LIFO: the mock is still active
    assert flux.math.attention is fake  # their change is not discarded
    assert any(r.symbol == "attention" and "left as is on undo" in r.reason for r in handle.report())
    patcher.stop()  # the mock puts back what it found: our (now dead) replacement
    assert flux.math.attention is ours
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    pe = flux.math.rope(torch.arange(6.0)[None], 8, 10000).unsqueeze(1)
    ops.reset_dispatch_stats()
    out = flux.math.attention(q, k, v, pe)
    assert not ops.dispatch_stats()["served"], "a replacement of an undone handle still routed to our ops"
    assert torch.equal(out, original(q, k, v, pe))
    flux.math.attention = original


def test_instance_level_handle_does_not_keep_the_model_alive():
    model = bfl_model()
    handle = flux_npu.patch("cpu", targets=["bfl"], model=model)
    assert any(r.status == "patched" for r in handle.report())
    ref = weakref.ref(model)
    del model, handle
    gc.collect()
    assert ref() is None, "the module-level registry kept a model patched with model= alive"


def test_a_target_library_that_raises_on_import_is_a_skipped_row(tmp_path, monkeypatch):
    _write_pkg(tmp_path, {"brokenlib/__init__.py": "raise RuntimeError('built for another torch')\n",
                          "brokenlib/models.py": "X = 1\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    ps = engine.register_patch_set(engine.PatchSet(
        target="test-broken", matches=engine.exact("brokenlib.models"), import_names=("brokenlib.models",),
        specs=[engine.Spec("X", lambda orig, b: 2, "test")]))
    try:
        with flux_npu.patch("cpu", targets=["test-broken", "bfl"]) as handle:
            row = [r for r in handle.report() if r.target == "brokenlib.models"][0]
            assert row.status == "skipped" and "RuntimeError: built for another torch" in row.reason
    finally:
        engine._SETS["test-broken"].remove(ps)
        del engine._SETS["test-broken"]
        _forget("brokenlib")


def test_import_flux_npu_auto_is_lazy(tmp_path):
    code = ("import sys, flux_npu.auto\n"
            "print('EAGER', [m for m in ('diffusers', 'transformers') if m in sys.modules])\n"
            "rows = {r.target: r.status for r in flux_npu.auto.HANDLE.report()}\n"
            "print('PENDING', rows['diffusers.models.transformers.transformer_flux'])\n"
            "from diffusers.models.transformers import transformer_flux as tf\n"
            "print('HOOKED', hasattr(tf.FluxAttnProcessor.__call__, '__wrapped_original__'))\n")
    env = dict(os.environ, FLUX_NPU_BACKEND="cpu")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "EAGER []" in res.stdout and "PENDING pending" in res.stdout and "HOOKED True" in res.stdout, res.stdout


def test_unknown_op_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown op name.*'atention'.*known ops: attention"):
        flux_npu.patch("cpu", exclude=["atention"])


def test_exclude_attention_keeps_stock_attention_and_fuses_the_rest():
    model, inputs = diffusers_model_and_inputs("tiny")
    stock = diffusers_run(model, inputs)
    with flux_npu.patch("cpu", targets=["diffusers"], exclude=["attention"]) as handle:
        assert "ops: " in handle.report_table()
        ops.reset_dispatch_stats()
        engine.reset_routes()
        patched = diffusers_run(model, inputs)
        served = ops.dispatch_stats()["served"]
        assert not [k for k in served if k[0] == "attention"], served
        assert served[("rms_norm", "cpu", "torch.rms_norm")] == 8
        assert served[("qk_norm_rope", "cpu", "torch.rms_norm+complex_mul")] == 2
        assert engine.routes()[("diffusers attention", "diffusers dispatch_attention_fn (native)")] == 4
    errs = errors(patched, stock)
    assert all(e <= tolerance(torch.float32) for e in errs.values()), errs
    model2 = bfl_model()
    with flux_npu.patch("cpu", targets=["bfl"], ops=["rms_norm"]) as handle:
        rows = {r.symbol: r for r in handle.report() if r.target == "flux.math"}
        assert rows["attention"].status == "skipped" and "excluded by patch(ops=" in rows["attention"].reason
        ops.reset_dispatch_stats()
        bfl_run(model2, bfl_inputs(model2))
        assert set(k[0] for k in ops.dispatch_stats()["served"]) == {"rms_norm"}


def test_a_chosen_diffusers_attention_backend_is_honoured_with_our_norms_and_rope():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    model, inputs = diffusers_model_and_inputs("tiny")
    try:
        model.set_attention_backend("_native_math")
        stock = diffusers_run(model, inputs)
        with flux_npu.patch("cpu", targets=["diffusers"]):
            ops.reset_dispatch_stats()
            engine.reset_routes()
            patched = diffusers_run(model, inputs)
            served = ops.dispatch_stats()["served"]
        assert not [k for k in served if k[0] == "attention"], "the user's backend was replaced by ours"
        assert served[("rms_norm", "cpu", "torch.rms_norm")] == 8
        assert served[("apply_rope", "cpu", "torch.complex_mul")] == 4
        assert engine.routes() == {("diffusers attention", "diffusers dispatch_attention_fn (_native_math)"): 4}
        errs = errors(patched, stock)
        assert all(e <= tolerance(torch.float32) for e in errs.values()), errs
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def test_apply_rotary_emb_keeps_the_original_for_non_flux_cos_sin():
    from diffusers.models import embeddings

    original = embeddings.apply_rotary_emb
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 7, 8, generator=g)
    cos, sin = torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)  # not pair-repeated
    pair_cos, pair_sin = cos[:, ::2].repeat_interleave(2, -1), sin[:, ::2].repeat_interleave(2, -1)
    with flux_npu.patch("cpu", targets=["diffusers"]):
        ops.reset_dispatch_stats()
        other = embeddings.apply_rotary_emb(x, (cos, sin))
        assert not ops.dispatch_stats()["served"]
        flux_form = embeddings.apply_rotary_emb(x, (pair_cos, pair_sin))
        flux_again = embeddings.apply_rotary_emb(x, (pair_cos, pair_sin))  # cached verdict
        assert ops.dispatch_stats()["served"][("apply_rope", "cpu", "torch.complex_mul")] == 2
        pair_cos[0, 1] += 1.0  # an in-place change breaks the pair form: checked again, not cached
        changed = embeddings.apply_rotary_emb(x, (pair_cos, pair_sin))
        assert ops.dispatch_stats()["served"][("apply_rope", "cpu", "torch.complex_mul")] == 2
    assert torch.equal(other, original(x, (cos, sin)))
    assert torch.equal(changed, original(x, (pair_cos, pair_sin)))
    pair_cos[0, 1] -= 1.0
    assert_close(flux_form, original(x, (pair_cos, pair_sin)), torch.float32)
    assert torch.equal(flux_form, flux_again)
