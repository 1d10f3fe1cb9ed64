"""x-flux's block processors, patched vs stock, forward and backward: the image-prompt attention
that x-flux's IP processors write inline as `F.scaled_dot_product_attention` (and, in a fork, its
own QK RMSNorms) is routed to ops.attention / ops.rms_norm, and every processor's AdaLN and gated
residuals to ops.layer_norm_modulate / ops.gated_residual, by rewriting the processor's __call__.
The layout in tests/xflux_model is our own code in x-flux's module layout (under the name
`xflux_layout`, found by its structure). Counts prove which kernels served; hand-backs are counted
with their reason; the emulated npu path calls the fused torch_npu ops."""

import os
import sys
import types

import pytest
import torch
from flux_helpers import assert_bf16_no_worse

import flux_npu
from flux_npu import ops
from flux_npu.patches import engine
from flux_npu.testing import rel_err, tolerance

HERE = os.path.dirname(__file__)
TOP = "xflux_layout"
DEPTH, SINGLE, N_TXT, N_IMG, N_IP, BATCH = 2, 1, 4, 9, 3, 2  # double and single blocks, all with IP processors
IP_ROUTE = ("x-flux IPDoubleStreamBlockProcessor IP attention", "ops.attention")
IP_SINGLE_ROUTE = ("x-flux IPSingleStreamBlockProcessor IP attention", "ops.attention")
BLOCKS = DEPTH + SINGLE
ADALN = 4 * DEPTH + SINGLE  # LayerNorm+modulate calls per forward: 4 per double block, 1 per single block
GATED = 4 * DEPTH + SINGLE  # gated residuals per forward, likewise


def _forget():
    for name in [n for n in sys.modules if n == TOP or n.startswith(TOP + ".")]:
        del sys.modules[name]


@pytest.fixture
def layout():
    """The x-flux layout on sys.path for one test; every handle undone and its modules forgotten after."""
    path = os.path.join(HERE, "xflux_model")
    sys.path.insert(0, path)
    import xflux_layout.model
    import xflux_layout.modules.layers

    yield xflux_layout
    for h in engine.live_handles():
        h.undo()
    sys.path.remove(path)
    _forget()


def _model(layout, dtype=torch.float32, normed_ip=False, ip=True):
    torch.manual_seed(0)
    return layout.model.TinyIPFlux(normed_ip=normed_ip, ip=ip).to(dtype)


def _inputs(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    side = int(N_IMG ** 0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    ids = torch.cat((torch.zeros(N_TXT, 3), img_ids.reshape(N_IMG, 3)))[None].repeat(BATCH, 1, 1)
    return {
        "img": torch.randn(BATCH, N_IMG, 32, generator=g).to(dtype).requires_grad_(True),
        "txt": torch.randn(BATCH, N_TXT, 32, generator=g).to(dtype).requires_grad_(True),
        "vec": torch.randn(BATCH, 32, generator=g).to(dtype),
        "ids": ids,
        "image_proj": torch.randn(BATCH, N_IP, 24, generator=g).to(dtype).requires_grad_(True),
        "ip_scale": 0.7,
    }


def _cast(inputs, dtype):
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "ids":
            nv = v.detach().to(dtype)
            out[k] = nv.requires_grad_(True) if v.requires_grad else nv
        else:
            out[k] = v
    return out


def _run(model, inputs):
    """Forward, then backward of a fixed random cotangent: output, input grads and parameter grads (float32)."""
    model.zero_grad(set_to_none=True)
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    for t in leaves.values():
        t.grad = None
    out = model(**inputs)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(11)).to(out.dtype)
    out.backward(cot)
    res = {"out": out.detach().float()}
    res.update({"d_" + k: t.grad.float() for k, t in leaves.items()})
    res.update({"d_" + n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    return res


# The gradient of a bias added to un-normalised keys is zero in exact arithmetic (softmax does not
# change when one score is added to all keys of a query): both sides hold rounding noise only, so
# relative error means nothing there; it is checked to be noise-sized instead.
ZERO_GRADS = ("ip_adapter_double_stream_k_proj.bias",)


def _check_fp32(patched, stock):
    assert set(patched) == set(stock)
    zero = [k for k in stock if k.endswith(ZERO_GRADS)]
    noise = {k: (patched[k].abs().max().item(), stock[k].abs().max().item()) for k in zero}
    assert all(max(v) < 1e-5 for v in noise.values()), noise
    errs = {k: rel_err(patched[k], stock[k]) for k in stock if k not in zero}
    bad = {k: e for k, e in errs.items() if not e <= tolerance(torch.float32)}
    assert not bad, f"float32 patched vs stock beyond {tolerance(torch.float32)}: {bad}"


def _served(stats, op, backend="cpu"):
    return sum(n for (o, b, _), n in stats["served"].items() if o == op and b == backend)


def _ip_grads_matter(res):
    """The IP projections got non-zero gradients: the IP branch is part of what was compared."""
    grads = [v for k, v in res.items() if "ip_" in k and k.endswith("weight")]
    assert grads and all(g.abs().sum() > 0 for g in grads)


def test_ip_attention_served_float32_and_reported(layout):
    model = _model(layout)
    inputs = _inputs()
    stock = _run(model, inputs)
    _ip_grads_matter(stock)
    layers = layout.modules.layers
    original = layers.IPDoubleStreamBlockProcessor.__dict__["__call__"]
    original_single = layers.IPSingleStreamBlockProcessor.__dict__["__call__"]
    engine.reset_routes()
    with flux_npu.patch(backend="cpu", targets=["bfl"]) as handle:
        rows = [r for r in handle.report() if r.symbol == "IPDoubleStreamBlockProcessor.__call__"]
        assert sorted((r.target, r.status) for r in rows) == [
            ("xflux_layout.modules.ip_normed", "patched"), ("xflux_layout.modules.layers", "patched")
        ], rows
        assert all("1 IP attention call(s)" in r.reason and "ops.attention" in r.reason for r in rows), rows
        single = [(r.target, r.status) for r in handle.report() if r.symbol == "IPSingleStreamBlockProcessor.__call__"]
        assert single == [("xflux_layout.modules.layers", "patched")], single
        assert layers.IPDoubleStreamBlockProcessor.__dict__["__call__"] is not original
        ops.reset_dispatch_stats()
        patched = _run(model, inputs)
        stats = ops.dispatch_stats()
        routes = engine.routes()
    _check_fp32(patched, stock)
    assert not stats["fallback"], stats["fallback"]
    # one IP attention per block went to ops.attention
    assert (routes.get(IP_ROUTE), routes.get(IP_SINGLE_ROUTE)) == (DEPTH, SINGLE), routes
    # every attention of the forward is ours: the block's own one (BFL attention patch) and the IP one
    assert _served(stats, "attention") == 2 * BLOCKS, stats["served"]
    assert _served(stats, "rms_norm") == 4 * DEPTH + 2 * SINGLE, stats["served"]  # the blocks' QKNorms (bfl.py)
    # the processors' AdaLN (both x-flux spellings) and gated residuals
    assert _served(stats, "layer_norm_modulate") == ADALN, stats["served"]
    assert _served(stats, "gated_residual") == GATED, stats["served"]
    # undo puts the very same functions back
    assert layers.IPDoubleStreamBlockProcessor.__dict__["__call__"] is original
    assert layers.IPSingleStreamBlockProcessor.__dict__["__call__"] is original_single
    assert _run(model, inputs)["out"].equal(stock["out"])


def test_ip_branch_bfloat16(layout):
    ref32 = _run(_model(layout), _inputs())
    model = _model(layout, torch.bfloat16)
    inputs = _cast(_inputs(), torch.bfloat16)
    stock = _run(model, inputs)
    engine.reset_routes()
    with flux_npu.patch(backend="cpu", targets=["bfl"]):
        ops.reset_dispatch_stats()
        patched = _run(model, inputs)
        stats = ops.dispatch_stats()
        assert (engine.routes().get(IP_ROUTE), engine.routes().get(IP_SINGLE_ROUTE)) == (DEPTH, SINGLE)
    assert not stats["fallback"], stats["fallback"]
    assert _served(stats, "attention") == 2 * BLOCKS
    assert (_served(stats, "layer_norm_modulate"), _served(stats, "gated_residual")) == (ADALN, GATED)
    assert_bf16_no_worse(patched, stock, ref32, keys=[k for k in ref32 if not k.endswith(ZERO_GRADS)])
    assert rel_err(patched["out"], ref32["out"]) <= tolerance(torch.bfloat16, 2.0)


def test_fork_with_ip_qk_rmsnorms_served(layout):
    """A fork normalising the IP keys with a BFL RMSNorm and the queries with torch.nn.RMSNorm."""
    model = _model(layout, normed_ip=True)
    inputs = _inputs(seed=3)
    stock = _run(model, inputs)
    _ip_grads_matter(stock)
    with flux_npu.patch(backend="cpu", targets=["bfl"]) as handle:
        row = next(r for r in handle.report() if r.target == "xflux_layout.modules.ip_normed"
                   and r.symbol == "IPDoubleStreamBlockProcessor.__call__")
        assert row.status == "patched" and "2 IP QK norm(s) -> ops.rms_norm" in row.reason, row
        ops.reset_dispatch_stats()
        patched = _run(model, inputs)
        stats = ops.dispatch_stats()
    _check_fp32(patched, stock)
    assert not stats["fallback"], stats["fallback"]
    assert _served(stats, "attention") == 2 * BLOCKS
    assert _served(stats, "rms_norm") == 6 * DEPTH + 2 * SINGLE  # block QK norms + the fork's IP key and query norms


def test_rebound_sdpa_is_handed_back_and_counted(layout, monkeypatch):
    """A processor module whose `F` is not torch's functional (a user's own SDPA) keeps its call."""
    model = _model(layout)
    inputs = _inputs(seed=5)
    stock = _run(model, inputs)
    seen = []

    def own_sdpa(*args, **kwargs):
        seen.append(1)
        return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(layout.modules.layers, "F", types.SimpleNamespace(scaled_dot_product_attention=own_sdpa,
                                                                           silu=torch.nn.functional.silu))
    with flux_npu.patch(backend="cpu", targets=["bfl"]):
        ops.reset_dispatch_stats()
        patched = _run(model, inputs)
        stats = ops.dispatch_stats()
    _check_fp32(patched, stock)
    assert len(seen) == BLOCKS  # the user's function ran, once per block
    why = sorted((op, reason, n) for (op, b, reason), n in stats["fallback"].items())
    tail = " IP attention: the called function is not torch's scaled_dot_product_attention"
    assert why == [("attention", "x-flux IPDoubleStreamBlockProcessor" + tail, DEPTH),
                   ("attention", "x-flux IPSingleStreamBlockProcessor" + tail, SINGLE)], why
    assert _served(stats, "attention") == BLOCKS  # only the blocks' own attention


def test_excluding_attention_keeps_the_ip_call_stock(layout):
    model = _model(layout)
    inputs = _inputs()
    stock = _run(model, inputs)
    with flux_npu.patch(backend="cpu", targets=["bfl"], exclude=["attention"]) as handle:
        row = next(r for r in handle.report()
                   if r.target == "xflux_layout.modules.layers" and r.symbol == "IPDoubleStreamBlockProcessor.__call__")
        assert row.status == "patched" and "IP attention" not in row.reason, row
        ops.reset_dispatch_stats()
        patched = _run(model, inputs)
        stats = ops.dispatch_stats()
    _check_fp32(patched, stock)
    assert _served(stats, "attention") == 0 and not stats["fallback"], stats
    assert _served(stats, "layer_norm_modulate") == ADALN


def test_plain_processors_adaln_served_and_excluded_op_kept(layout):
    """x-flux without an IP adapter: the blocks' own processors; gated_residual excluded stays plain."""
    model = _model(layout, ip=False)
    inputs = _inputs(seed=9)
    del inputs["image_proj"]
    stock = _run(model, inputs)
    layers = layout.modules.layers
    originals = [layers.DoubleStreamBlockProcessor.__dict__["__call__"],
                 layers.SingleStreamBlockProcessor.__dict__["__call__"]]
    with flux_npu.patch(backend="cpu", targets=["bfl"]):
        ops.reset_dispatch_stats()
        patched = _run(model, inputs)
        stats = ops.dispatch_stats()
    _check_fp32(patched, stock)
    assert not stats["fallback"], stats["fallback"]
    assert (_served(stats, "layer_norm_modulate"), _served(stats, "gated_residual")) == (ADALN, GATED)
    assert _served(stats, "attention") == BLOCKS
    assert [layers.DoubleStreamBlockProcessor.__dict__["__call__"],
            layers.SingleStreamBlockProcessor.__dict__["__call__"]] == originals
    with flux_npu.patch(backend="cpu", targets=["bfl"], exclude=["gated_residual"]):
        ops.reset_dispatch_stats()
        patched = _run(model, inputs)
        stats = ops.dispatch_stats()
    _check_fp32(patched, stock)
    assert (_served(stats, "layer_norm_modulate"), _served(stats, "gated_residual")) == (ADALN, 0)
    assert not stats["fallback"], stats["fallback"]


def test_instance_level_patch_serves_and_restores_the_processors(layout):
    model = _model(layout)
    inputs = _inputs(seed=7)
    stock = _run(model, inputs)
    classes = [type(b.processor) for b in model.double_blocks]
    engine.reset_routes()
    with flux_npu.patch(backend="cpu", targets=["bfl"], model=model) as handle:
        row = next(r for r in handle.report() if r.symbol == "IPDoubleStreamBlockProcessor.__call__"
                   and r.target == "xflux_layout.modules.layers")
        assert row.status == "patched" and f"on {DEPTH} instance(s)" in row.reason, row
        patched = _run(model, inputs)
        assert (engine.routes().get(IP_ROUTE), engine.routes().get(IP_SINGLE_ROUTE)) == (DEPTH, SINGLE)
    _check_fp32(patched, stock)
    assert [type(b.processor) for b in model.double_blocks] == classes


def test_emulated_npu_calls_fused_attention_for_the_ip_branch(layout, npu_emulated):
    from npu_emulator import record

    model = _model(layout)
    inputs = _inputs()
    stock = _run(model, inputs)
    record.clear()
    with flux_npu.patch(backend=npu_emulated, targets=["bfl"]):
        ops.reset_dispatch_stats()
        patched = _run(model, inputs)
        stats = ops.dispatch_stats()
    _check_fp32(patched, stock)
    assert not stats["fallback"], stats["fallback"]
    fa = record.calls("npu_fusion_attention")
    lengths = [(c["tensors"]["query"]["shape"][2], c["tensors"]["key"]["shape"][2]) for c in fa]
    assert lengths.count((N_IMG, N_IP)) == DEPTH, lengths  # the double blocks' IP attention
    assert lengths.count((N_TXT + N_IMG, N_IP)) == SINGLE, lengths  # the single blocks' IP attention
    assert all(c["args"]["input_layout"] == "BNSD" for c in fa), fa
    assert record.calls("npu_rms_norm")
    name = npu_emulated.name
    assert _served(stats, "attention", name) == 2 * BLOCKS, stats["served"]
    assert (_served(stats, "layer_norm_modulate", name), _served(stats, "gated_residual", name)) == (ADALN, GATED)


def _toy_processor(self, attn, x, shift, scale, gate, y):
    h = (1 + scale) * attn.norm(x) + shift
    return h + gate * y, attn.q_norm(x)


def test_expressions_the_ops_cannot_take_are_computed_as_written_and_counted():
    """An affine LayerNorm, a QK norm that is no RMSNorm and a gate of another dtype: each helper
    computes the original expression and counts a hand-back with its reason."""
    from flux_npu.patches.xflux_ip import rewrite_processor_call

    g = torch.Generator().manual_seed(13)
    attn = types.SimpleNamespace(norm=torch.nn.LayerNorm(8), q_norm=torch.nn.LayerNorm(8))
    with torch.no_grad():
        attn.norm.weight.normal_(generator=g)
    x, shift, scale, y = (torch.randn(2, 3, 8, generator=g) for _ in range(4))
    gate = torch.randn(2, 1, 8, generator=g, dtype=torch.float64)
    backend = flux_npu.get_backend("cpu")
    fn = rewrite_processor_call(_toy_processor, backend, frozenset(engine.OP_NAMES), "toy")
    assert "1 IP QK norm(s)" in fn.__flux_npu_what__ and "1 LayerNorm+modulate" in fn.__flux_npu_what__
    ops.reset_dispatch_stats()
    out, qn = fn(None, attn, x, shift, scale, gate, y)
    stats = ops.dispatch_stats()
    ref, ref_qn = _toy_processor(None, attn, x, shift, scale, gate, y)
    assert torch.equal(out, ref) and torch.equal(qn, ref_qn)
    assert not stats["served"], stats["served"]
    assert sorted(op for (op, _, _), n in stats["fallback"].items() if n == 1) == [
        "gated_residual", "layer_norm_modulate", "rms_norm"], stats["fallback"]


def test_patch_module_reaches_the_processors_of_a_package_under_another_name(layout):
    model = _model(layout)
    inputs = _inputs(seed=15)
    stock = _run(model, inputs)
    engine.reset_routes()
    with flux_npu.patch_module(layout, backend="cpu") as handle:
        rows = {r.symbol: r.status for r in handle.report() if r.target == "xflux_layout.modules.layers"}
        assert rows["IPDoubleStreamBlockProcessor.__call__"] == rows["DoubleStreamBlockProcessor.__call__"] == "patched"
        patched = _run(model, inputs)
        assert (engine.routes().get(IP_ROUTE), engine.routes().get(IP_SINGLE_ROUTE)) == (DEPTH, SINGLE)
    _check_fp32(patched, stock)


def test_imported_after_patch_is_hooked_by_structure():
    """`import flux_npu.auto` style: patch() first, x-flux imported later under any name."""
    path = os.path.join(HERE, "xflux_model")
    handle = flux_npu.patch(backend="cpu", targets=["bfl"], lazy=True)
    sys.path.insert(0, path)
    try:
        import xflux_layout.model

        rows = {(r.symbol, r.status) for r in handle.report() if r.target == "xflux_layout.modules.layers"}
        assert ("IPDoubleStreamBlockProcessor.__call__", "patched") in rows, rows
        assert ("DoubleStreamBlockProcessor.__call__", "patched") in rows, rows
        engine.reset_routes()
        _run(_model(xflux_layout), _inputs())
        assert (engine.routes().get(IP_ROUTE), engine.routes().get(IP_SINGLE_ROUTE)) == (DEPTH, SINGLE)
    finally:
        handle.undo()
        sys.path.remove(path)
        _forget()


def test_lora_processors_adaln_served_with_report_rows(layout):
    """x-flux's LoRA processors (`DoubleStreamBlockLoraProcessor.forward`, what its training script
    and set_lora install): AdaLN and gated residuals fused like the plain processors', LoRA terms
    kept as written, report rows with served counts, forward and backward as stock."""
    model = _model(layout, ip=False)
    layers = layout.modules.layers
    for block in model.double_blocks:
        block.set_processor(layers.DoubleStreamBlockLoraProcessor(32, rank=4, lora_weight=0.8))
    for block in model.single_blocks:
        block.set_processor(layers.SingleStreamBlockLoraProcessor(32, rank=4, lora_weight=0.8))
    for p in model.parameters():  # LoRA "up" starts at zero in training; random here so the deltas count
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    inputs = _inputs(seed=5)
    del inputs["image_proj"]
    stock = _run(model, inputs)
    originals = [layers.DoubleStreamBlockLoraProcessor.forward, layers.SingleStreamBlockLoraProcessor.forward]
    with flux_npu.patch(backend="cpu", targets=["bfl"]) as handle:
        ops.reset_dispatch_stats()
        patched = _run(model, inputs)
        stats = ops.dispatch_stats()
        rows = {c["symbol"]: c for c in handle.row_counts() if "Lora" in c["symbol"]}
    _check_fp32(patched, stock)
    assert not stats["fallback"], stats["fallback"]
    assert (_served(stats, "layer_norm_modulate"), _served(stats, "gated_residual")) == (ADALN, GATED)
    assert {s: (r["status"], r["calls"], r["served"]) for s, r in rows.items()} == {
        "DoubleStreamBlockLoraProcessor.forward": ("patched", DEPTH, DEPTH),
        "SingleStreamBlockLoraProcessor.forward": ("patched", SINGLE, SINGLE)}
    assert [layers.DoubleStreamBlockLoraProcessor.forward, layers.SingleStreamBlockLoraProcessor.forward] == originals
    assert any(n.endswith("proj_lora1.up.weight") for n in patched)  # the LoRA weights got gradients too
