"""The patch engine: exact undo (identity), idempotence, the import hook, names imported by value,
drifted targets, patch_module for a BFL layout under another name, and `import flux_npu.auto`."""

import importlib
import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch

import flux_npu
from flux_npu import ops
from flux_npu.patches import live_handles
from flux_npu.testing import assert_close

HERE = os.path.dirname(__file__)


def _diffusers_symbols():
    from diffusers.models import embeddings, normalization
    from diffusers.models.transformers import transformer_chroma as chroma
    from diffusers.models.transformers import transformer_flux as tf
    from diffusers.models.transformers import transformer_flux2 as tf2
    from diffusers.models.transformers import transformer_flux3 as tf3
    from transformers.models.t5 import modeling_t5

    return {
        "processor": (tf.FluxAttnProcessor, "__call__"),
        "posembed": (tf.FluxPosEmbed, "forward"),
        "ada0": (normalization.AdaLayerNormZero, "forward"),
        "ada1": (normalization.AdaLayerNormZeroSingle, "forward"),
        "adac": (normalization.AdaLayerNormContinuous, "forward"),
        "rotary": (embeddings, "apply_rotary_emb"),
        "rotary_in_flux": (tf, "apply_rotary_emb"),  # imported by name
        "t5": (modeling_t5.T5LayerNorm, "forward"),
        "block": (tf.FluxTransformerBlock, "forward"),  # AdaLN / gated residuals rewritten in source
        "single_block": (tf.FluxSingleTransformerBlock, "forward"),
        "ip": (tf.FluxIPAdapterAttnProcessor, "__call__"),
        "flux2_proc": (tf2.Flux2AttnProcessor, "__call__"),
        "flux2_block": (tf2.Flux2TransformerBlock, "forward"),
        "flux3_proc": (tf3.Flux3AttnProcessor, "__call__"),
        "chroma_norm": (chroma.ChromaAdaLayerNormZeroPruned, "forward"),
    }


def _bfl_symbols():
    import flux.math
    from flux.modules import layers

    return {
        "attention": (flux.math, "attention"),
        "rope": (flux.math, "rope"),
        "apply_rope": (flux.math, "apply_rope"),
        "layers.attention": (layers, "attention"),  # `from flux.math import attention`
        "layers.rope": (layers, "rope"),
        "rms": (layers.RMSNorm, "forward"),
        "qk": (layers.QKNorm, "forward"),
        "embed": (layers.EmbedND, "forward"),
        "double": (layers.DoubleStreamBlock, "forward"),
        "single": (layers.SingleStreamBlock, "forward"),
        "last": (layers.LastLayer, "forward"),
    }


def _snapshot(symbols):
    return {k: owner.__dict__[attr] for k, (owner, attr) in symbols.items()}


def test_undo_restores_every_original_by_identity():
    import flux.model  # noqa: F401  (load the BFL layout before patching)

    symbols = {**_diffusers_symbols(), **_bfl_symbols()}
    before = _snapshot(symbols)
    handle = flux_npu.patch("cpu")
    during = _snapshot(symbols)
    changed = [k for k in symbols if during[k] is not before[k]]
    assert sorted(changed) == sorted(symbols), f"not patched: {set(symbols) - set(changed)}"
    statuses = {(r.target, r.symbol): r.status for r in handle.report()}
    assert statuses[("diffusers.models.embeddings", "apply_rotary_emb")] == "patched"
    assert statuses[("flux.math", "attention")] == "patched"
    handle.undo()
    after = _snapshot(symbols)
    assert all(after[k] is before[k] for k in symbols), [k for k in symbols if after[k] is not before[k]]
    handle.undo()  # twice is harmless
    assert not live_handles()


def test_report_rows_and_table():
    with flux_npu.patch("cpu", targets=["diffusers"]) as handle:
        rows = handle.report()
        assert rows and all(r.status in ("patched", "skipped", "not-found") for r in rows)
        assert all(r.target and r.symbol and r.reason for r in rows)
        text = handle.report_table()
        assert "FluxAttnProcessor.__call__" in text and "backend cpu" in text
        assert handle.active
    assert not handle.active


def test_patching_twice_is_harmless():
    from diffusers.models.transformers import transformer_flux as tf

    original = tf.FluxPosEmbed.__dict__["forward"]
    first = flux_npu.patch("cpu", targets=["diffusers"])
    replaced = tf.FluxPosEmbed.__dict__["forward"]
    second = flux_npu.patch("cpu", targets=["diffusers"])
    assert tf.FluxPosEmbed.__dict__["forward"] is replaced  # not wrapped twice
    assert all(r.status != "patched" for r in second.report())
    assert any("already patched by another live flux_npu handle" in r.reason for r in second.report())
    second.undo()
    assert tf.FluxPosEmbed.__dict__["forward"] is replaced  # the first handle's patch survives
    first.undo()
    assert tf.FluxPosEmbed.__dict__["forward"] is original


def _forget_bfl():
    for name in [n for n in sys.modules if n == "flux" or n.startswith("flux.")]:
        del sys.modules[name]


def test_import_hook_patches_modules_imported_later():
    _forget_bfl()
    handle = flux_npu.patch("cpu", targets=["bfl"])
    assert any(r.status == "pending" and "the import hook patches one" in r.reason for r in handle.report())
    import flux.math
    import flux.model
    from flux.modules import layers

    assert getattr(flux.math.attention, "__wrapped_original__", None) is not None
    assert layers.attention is flux.math.attention  # the by-name import got the replacement
    assert layers.rope is flux.math.rope
    patched = {(r.target, r.symbol) for r in handle.report() if r.status == "patched"}
    assert ("flux.math", "attention") in patched and ("flux.modules.layers", "EmbedND.forward") in patched
    original = flux.math.attention.__wrapped_original__
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    pe = flux.math.rope(torch.arange(6.0)[None], 8, 10000).unsqueeze(1)
    out = flux.math.attention(q, k, v, pe)
    handle.undo()
    assert flux.math.attention is original and layers.attention is original
    assert_close(out, original(q, k, v, pe), torch.float32)
    _forget_bfl()
    import flux.model


def test_drifted_target_is_skipped_with_a_reason():
    mod = types.ModuleType("legacy.flux.math")

    def attention(q, k, v):  # an old signature without `pe`
        return q

    def apply_rope(xq, xk, freqs_cis):  # BFL's maths (defined here, so the structural probe runs it)
        from flux_npu.ops import reference

        return reference.apply_rope(xq, freqs_cis), reference.apply_rope(xk, freqs_cis)

    mod.attention, mod.apply_rope = attention, apply_rope  # and no `rope` at all
    sys.modules["legacy.flux.math"] = mod
    try:
        with flux_npu.patch("cpu", targets=["bfl"]) as handle:
            rows = {r.symbol: r for r in handle.report() if r.target == "legacy.flux.math"}
            assert rows["attention"].status == "skipped" and "signature drifted" in rows["attention"].reason
            assert rows["rope"].status == "not-found"
            assert rows["apply_rope"].status == "patched"
            assert mod.attention is attention
    finally:
        del sys.modules["legacy.flux.math"]


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown patch target.*known targets: .*diffusers"):
        flux_npu.patch("cpu", targets=["comfy"])


def test_patch_module_for_a_bfl_layout_under_another_name():
    path = os.path.join(HERE, "bfl_model", "flux", "math.py")
    spec = importlib.util.spec_from_file_location("vendored_fluxmath", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    original = mod.attention
    q, k, v = (torch.randn(2, 3, 7, 12) for _ in range(3))
    pe = mod.rope(torch.arange(7.0).expand(2, 7), 12, 10000).unsqueeze(1)
    with flux_npu.patch_module(mod, backend="cpu") as handle:
        assert {r.symbol for r in handle.report() if r.status == "patched"} == {"attention", "rope", "apply_rope"}
        assert mod.attention is not original
        ops.reset_dispatch_stats()
        out = mod.attention(q, k, v, pe)
        assert ops.dispatch_stats()["served"][("attention", "cpu", "torch.sdpa")] == 1
    assert mod.attention is original
    assert_close(out, original(q, k, v, pe), torch.float32)


def test_transfer_to_npu_is_opt_in_and_reported():
    with flux_npu.patch("cpu", targets=["diffusers"], transfer_to_npu=True) as handle:
        row = [r for r in handle.report() if r.target == "torch_npu.contrib.transfer_to_npu"][0]
        assert row.status == "skipped" and "only for the npu backend" in row.reason
    with flux_npu.patch("cpu", targets=["diffusers"]) as handle:
        assert not [r for r in handle.report() if "transfer_to_npu" in r.target]


def test_import_flux_npu_auto_patches_a_script(tmp_path):
    script = tmp_path / "train_like.py"
    script.write_text(
        "import flux_npu.auto\n"
        "from flux_npu import models, ops\n"
        "m = models.build_diffusers_flux('tiny')\n"
        "x = models.make_inputs(models.preset_config('tiny'), resolution=64, text_len=4)\n"
        "m(**x.as_kwargs())\n"
        "s = ops.dispatch_stats()['served']\n"
        "print('ATTN', s[('attention', 'cpu', 'torch.sdpa')], 'ROWS', len(flux_npu.auto.HANDLE.report()))\n"
    )
    env = dict(os.environ, FLUX_NPU_BACKEND="cpu", FLUX_NPU_REPORT="1")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ATTN 4" in res.stdout
    assert "FluxAttnProcessor.__call__" in res.stderr  # FLUX_NPU_REPORT printed the report
