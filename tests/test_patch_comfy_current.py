# ruff: noqa: F811  (the layout_path fixture, imported from test_patch_codebases, is a parameter name)
"""Current ComfyUI (the layout of ComfyUI master 783545f6, 2026-08-22, in tests/comfy_current_model: our
code in their shapes): norms from `operations` (`operations.LayerNorm` for AdaLN, `operations.RMSNorm`
with eps None for the QK norms, `layers.RMSNorm` None), AdaLN and the in-place gated residuals through
`apply_mod(...)`, attention on plain tensors through `optimized_attention` (chosen at import; a user's
`--use-sage-attention` & co. are theirs), RoPE through comfy-kitchen outside training (the real
`comfy-kitchen` package), training with ComfyUI's trainer checkpointing every block (non-reentrant:
stock's in-place residuals have no backward without it). Patched matches stock forward (inference)
and forward + backward (training), served counts prove the kernels ran, hand-backs are counted with
their reason, fp8-stored weights (ComfyUI's manual_cast, kohya's --fp8_base) run as stock does, and
undo restores every symbol."""

import copy

import pytest
import torch
from flux_helpers import bfl_inputs
from test_patch_codebases import _check_fp32, _comfy_kwargs, _kohya, _kohya_kwargs, _run, layout_path  # noqa: F401

import flux_npu
from flux_npu import ops
from flux_npu.testing import rel_err, tolerance

pytest.importorskip("comfy_kitchen")

SERVED_PER_FORWARD = {  # 2 double + 2 single blocks and the last layer
    ("attention", "cpu", "torch.sdpa"): 4,
    ("apply_rope", "cpu", "torch.complex_mul"): 8,
    ("rms_norm", "cpu", "torch.rms_norm"): 12,
    ("rope_freqs", "cpu", "reference"): 3,
    ("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul"): 2 * 4 + 2 + 1,
    ("gated_residual", "cpu", "torch.addcmul"): 2 * 4 + 2,
}


def _current(layout_path, training, operations="disable_weight_init", dtype=torch.float32):
    layout_path("comfy_current_model", "comfy")
    import comfy.model_management
    import comfy.ops
    from comfy.ldm.flux.model import Flux, FluxParams

    comfy.model_management.in_training = training
    torch.manual_seed(0)
    model = Flux(FluxParams(), operations=getattr(comfy.ops, operations))
    with torch.no_grad():  # QK-norm weights other than torch's ones, so that a lost weight shows
        for m in model.modules():
            if isinstance(m, torch.nn.RMSNorm):
                m.weight.add_(torch.randn_like(m.weight) * 0.2)
    return model.to(dtype)


def _checkpoint_blocks(model):
    """What ComfyUI's LoRA trainer does with gradient checkpointing on (comfy_extras/nodes_train.py
    `patch`): each block's forward, captured as a bound method, is run under non-reentrant
    torch.utils.checkpoint via an instance `forward`. Stock's in-place residuals (`img += ...`) have
    no backward without it."""
    import torch.utils.checkpoint

    for block in (*model.double_blocks, *model.single_blocks):
        org = block.forward

        def fwd(args, kwargs, org=org):
            return org(*args, **kwargs)

        block.forward = lambda *a, _fwd=fwd, **k: torch.utils.checkpoint.checkpoint(_fwd, a, k, use_reentrant=False)
    return model


def _train(model, kwargs, leaves):
    """One training forward + backward of a copy of `model` with its blocks checkpointed as ComfyUI's
    trainer does (the copy made now, so a live patch is what the trainer captures)."""
    m = _checkpoint_blocks(copy.deepcopy(model))
    return _run(m, m.forward_orig, kwargs, leaves)


# with checkpointing every block op runs twice (forward, then its recomputation in backward)
SERVED_PER_TRAINING_STEP = {k: 2 * n - (1 if k[0] == "layer_norm_modulate" else 0) if k[0] != "rope_freqs" else n
                            for k, n in SERVED_PER_FORWARD.items()}


def _patched(run, **patch_kw):
    """run() under flux_npu.patch("cpu", targets=["bfl"], **patch_kw), with the dispatch counts of
    that call alone: (its result, the stats)."""
    with flux_npu.patch("cpu", targets=["bfl"], **patch_kw):
        ops.reset_dispatch_stats()
        out = run()
        return out, ops.dispatch_stats()


def _served(stats):
    return {k: n for k, n in stats["served"].items() if k in SERVED_PER_FORWARD}


def test_inference_every_op_served_on_operations_layernorm_and_in_place_residuals(layout_path):
    """Every AdaLN of ComfyUI Flux sits on an `operations.LayerNorm` (a LayerNorm subclass with its
    own forward): served, not handed back; the in-place `img += apply_mod(...)` residuals too."""
    model = _current(layout_path, training=False)
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _comfy_kwargs(model, inputs, "bool")
    with torch.no_grad():
        stock = model.forward_orig(**kwargs)
        import comfy.ldm.flux.layers as layers
        import comfy.ldm.flux.math as math_

        originals = {n: getattr(math_, n) for n in ("attention", "apply_rope", "apply_rope1", "rope")}
        originals["QKNorm.forward"] = layers.QKNorm.forward
        with flux_npu.patch("cpu", targets=["bfl"]) as handle:
            rows = {r.symbol: r for r in handle.report() if r.target == "comfy.ldm.flux.layers"}
            assert rows["QKNorm.forward"].status == "patched"
            # the by-name imports into layers are rows of their own target module
            assert rows["attention"].status == rows["rope"].status == "patched"
            assert "comfy.ldm.flux.math.attention" in rows["attention"].reason
            assert rows["RMSNorm.forward"].status == "skipped"  # layers.RMSNorm is None now
            assert "RMSNorm is None" in rows["RMSNorm.forward"].reason
            ops.reset_dispatch_stats()
            patched = model.forward_orig(**kwargs)
            stats = ops.dispatch_stats()
    assert rel_err(patched, stock) <= tolerance(torch.float32)
    assert not stats["fallback"], stats["fallback"]
    assert _served(stats) == SERVED_PER_FORWARD
    assert {n: getattr(math_, n) for n in ("attention", "apply_rope", "apply_rope1", "rope")} == {
        n: originals[n] for n in ("attention", "apply_rope", "apply_rope1", "rope")}
    assert layers.QKNorm.forward is originals["QKNorm.forward"] and layers.attention is originals["attention"]


def _directional(model, kwargs, leaves, direction, train):
    """<gradient, direction> of a fixed random projection of forward_orig's output over the leaves and
    parameters (train: one checkpointed forward + backward), or its central finite difference
    (train False: forwards only, float64, step 1e-4). The independent float64 oracle of the
    training tests: stock has no correct backward to compare with (below)."""
    names = [*leaves, *(n for n, _ in model.named_parameters())]
    tensors = dict(leaves, **dict(model.named_parameters()))
    cot = torch.randn(model.forward_orig(**kwargs).shape, generator=torch.Generator().manual_seed(3),
                      dtype=torch.float64)
    if train:
        m = _checkpoint_blocks(copy.deepcopy(model))
        m.zero_grad(set_to_none=True)
        for t in leaves.values():
            t.grad = None
        (m.forward_orig(**kwargs) * cot).sum().backward()
        grads = dict({k: t.grad for k, t in leaves.items()}, **dict(m.named_parameters()))
        return sum((grads[n] if n in leaves else grads[n].grad) .mul(direction[n]).sum() for n in names
                   if (grads[n] if n in leaves else grads[n].grad) is not None)
    total = 0.0
    with torch.no_grad():
        for sign in (1, -1):
            for n in names:
                tensors[n].add_(sign * 1e-4 * direction[n])
            total = total + sign * (model.forward_orig(**kwargs) * cot).sum()
            for n in names:
                tensors[n].sub_(sign * 1e-4 * direction[n])
    return total / 2e-4


def test_training_forward_backward_served_and_eps_none_honoured(layout_path):
    """A training step as ComfyUI's LoRA trainer runs it (blocks checkpointed, non-reentrant). Stock
    has no correct backward: without checkpointing its in-place residuals raise, with it the saved
    LayerNorm inputs are overwritten during recomputation and the gradient is silently off. The
    patched step (out-of-place fused residuals) matches stock's forward and the float64 finite
    difference of the same loss."""
    model = _current(layout_path, training=True)
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _comfy_kwargs(model, inputs, "additive")
    leaves = {"img": inputs["img"], "txt": inputs["txt"]}
    with pytest.raises(RuntimeError, match="inplace"):  # stock without the trainer's checkpointing
        _run(model, model.forward_orig, kwargs, leaves)
    stock = _train(model, kwargs, leaves)
    assert model.double_blocks[0].img_attn.norm.query_norm.eps is None
    patched, stats = _patched(lambda: _train(model, kwargs, leaves))
    assert rel_err(patched["out"], stock["out"]) <= tolerance(torch.float32)
    assert not stats["fallback"], stats["fallback"]
    assert _served(stats) == SERVED_PER_TRAINING_STEP

    m64 = copy.deepcopy(model).double()
    k64 = {k: (v.detach().double().requires_grad_(k in leaves) if isinstance(v, torch.Tensor)
               and v.is_floating_point() and k not in ("img_ids", "txt_ids") else v) for k, v in kwargs.items()}
    l64 = {k: k64[k] for k in leaves}
    gen = torch.Generator().manual_seed(5)
    direction = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64)
                 for n, t in dict(l64, **dict(m64.named_parameters())).items()}
    fd = _directional(m64, k64, l64, direction, train=False)
    stock_dd = _directional(m64, k64, l64, direction, train=True)
    with flux_npu.patch("cpu", targets=["bfl"]):
        patched_dd = _directional(m64, k64, l64, direction, train=True)
    # 2e-5: the model's own float32 parts (RoPE tables, timestep embedding) bound the difference
    assert abs(patched_dd - fd) <= 2e-5 * abs(fd), (patched_dd, fd)
    assert abs(stock_dd - fd) > 1e-3 * abs(fd), (stock_dd, fd)  # ComfyUI's own gradient is off


def test_qk_norm_eps_none_is_torch_default_not_bfl_epsilon(layout_path):
    """With eps None the norm uses finfo(dtype).eps: a query of tiny magnitude shows the difference."""
    model = _current(layout_path, training=True)
    qk = model.double_blocks[0].img_attn.norm
    q = torch.randn(1, 2, 3, 16) * 1e-4
    stock = qk(q, q, q)[0]
    with flux_npu.patch("cpu", targets=["bfl"]):
        patched = qk(q, q, q)[0]
    bfl_eps = ops.reference.rms_norm(q.double(), qk.query_norm.weight.double(), 1e-6).float()
    assert rel_err(patched, stock) <= tolerance(torch.float32)
    assert rel_err(bfl_eps, stock) > 1e-2  # the BFL epsilon would have been visibly wrong here


def test_user_attention_flag_is_handed_back_and_counted(layout_path):
    """`--use-sage-attention` (or flash, xformers, comfy-kitchen int8, or a node rebinding it):
    ComfyUI's `optimized_attention` is then not its default SDPA; the user's attention runs, each
    call handed back and counted, and RoPE inside it goes through comfy-kitchen, where our backend
    serves it."""
    model = _current(layout_path, training=False)
    import comfy.ldm.flux.math as math_
    from comfy.ldm.modules import attention as attn_mod

    calls = []

    @attn_mod.wrap_attn
    def attention_sage(q, k, v, heads, **kw):  # a stand-in for the attention the flag picks
        calls.append(type(q))
        return attn_mod.attention_basic(q, k, v, heads, **kw)

    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _comfy_kwargs(model, inputs, "bool")
    with torch.no_grad():
        stock = model.forward_orig(**kwargs)
        math_.optimized_attention = attention_sage  # as if chosen at import from the command line
        try:
            calls.clear()
            chosen = model.forward_orig(**kwargs)
            calls.clear()
            with flux_npu.patch("cpu", targets=["bfl"]) as handle:
                ops.reset_dispatch_stats()
                patched = model.forward_orig(**kwargs)
                stats = ops.dispatch_stats()
                counts = {(c["target"], c["symbol"]): c for c in handle.row_counts()}
                table = handle.report_table()
        finally:
            math_.optimized_attention = attn_mod.optimized_attention
    assert rel_err(chosen, stock) <= tolerance(torch.float32)
    assert rel_err(patched, chosen) <= tolerance(torch.float32)
    att = counts[("comfy.ldm.flux.math", "attention")]
    assert (att["calls"], att["served"], att["handed_back"]) == (4, 0, 4)
    assert "attention_sage" in att["top_reason"]
    line = next(ln for ln in table.splitlines() if ln.startswith("comfy.ldm.flux.math") and " attention " in ln)
    assert "handed-back" in line and "0/4 served" in line and " patched " not in line
    assert calls == [torch.Tensor] * 4  # the user's attention ran
    assert ("attention", "cpu", "torch.sdpa") not in stats["served"]
    assert stats["served"][("apply_rope", "cpu", "torch.complex_mul")] == 8  # via comfy-kitchen
    assert _ck_row(handle)["served"] == 4


def test_containers_and_preferred_attention_forms_are_handled():
    """Not in ComfyUI's Flux as of 2026-08-22 (only its MiniMax model passes q/k/v as
    AttentionTensorContainers; no `preferred_attention` there): the forms third-party code quotes for
    later versions. q/k/v in containers are taken and served; a preferred_attention whose `function`
    is set keeps the call, handed back with the containers untouched."""
    import types

    from flux_npu.patches.bfl_math import build_attention
    from flux_npu.patches.routes import RowStats, run_counted

    class Box:  # ComfyUI's AttentionTensorContainer: single owner, peek() / take()
        def __init__(self, t):
            self.tensor = t

        def peek(self):
            return self.tensor

        def take(self):
            t, self.tensor = self.tensor, None
            return t

    seen = []

    def original(q, k, v, pe, mask=None, transformer_options={}, preferred_attention=None):  # noqa: B006
        seen.append(type(q))
        q, k, v = (x.take() if isinstance(x, Box) else x for x in (q, k, v))
        if pe is not None:
            q, k = ops.reference.apply_rope(q, pe), ops.reference.apply_rope(k, pe)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    patched = build_attention(original, flux_npu.get_backend("cpu"))
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float64) for _ in range(3))
    pe = ops.rope_freqs(torch.arange(7.0)[None], 8, 10_000, form="bfl", backend="cpu")[:, None]
    ref = original(q, k, v, pe)
    seen.clear()
    ops.reset_dispatch_stats()
    out = patched(Box(q), Box(k), Box(v), pe, transformer_options={}, preferred_attention=None)
    assert rel_err(out, ref) <= tolerance(torch.float32) and not seen
    assert ops.dispatch_stats()["served"][("attention", "cpu", "torch.sdpa")] == 1
    stats = RowStats()
    boxes = [Box(q), Box(k), Box(v)]
    out = run_counted(stats, patched, (*boxes, pe), {"preferred_attention": types.SimpleNamespace(function=print)})
    assert torch.equal(out, ref) and seen == [Box]
    assert (stats.calls, stats.handed_back) == (1, 1) and "preferred_attention" in stats.top_reason()


@pytest.mark.parametrize("dims, served", [([(0, 3, 0), (3, 7, 0)], 2), ([(0, 3, 0)], 0), ([(0, 4, 0), (3, 7, 0)], 0)])
def test_modulation_dims_served_per_range_where_they_tile_the_tokens(layout_path, dims, served):
    """`modulation_dims` (ComfyUI's per-range modulation rows) that tile the tokens in order: our ops per
    range; a range left out (its tokens stay unmodulated in apply_mod) or overlapping ones: apply_mod
    as written, handed back and counted. Stock and patched agree either way."""
    model = _current(layout_path, training=False)
    block = model.single_blocks[0]
    x = torch.randn(2, 7, 64)
    vec = torch.randn(2, 64)
    pe = model.pe_embedder(torch.zeros(2, 7, 3))
    with torch.no_grad():
        stock = block(x.clone(), vec, pe, modulation_dims=dims)
        patched, stats = _patched(lambda: block(x.clone(), vec, pe, modulation_dims=dims))
    assert rel_err(patched, stock) <= tolerance(torch.float32)
    assert stats["served"].get(("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul"), 0) == served
    assert stats["served"].get(("gated_residual", "cpu", "torch.addcmul"), 0) == served
    per_op = {op: n for (op, b, r), n in stats["fallback"].items() if "modulation_dims" in r}
    assert per_op == ({} if served else {"layer_norm_modulate": 1, "gated_residual": 1})


def test_flux2_reference_images_at_timestep_zero_served(layout_path):
    """FLUX.2 (global modulation) with reference-image tokens at timestep zero (`timestep_zero_index`,
    what FluxKVCache's index_timestep_zero sets): image tokens modulated by two rows through
    modulation_dims, in every block and the last layer; forward and backward (trainer checkpointing)
    match stock's forward and the float64 finite difference."""
    layout_path("comfy_current_model", "comfy")
    import comfy.model_management
    from comfy.ldm.flux.model import Flux, FluxParams

    comfy.model_management.in_training = False
    torch.manual_seed(0)
    model = Flux(FluxParams(global_modulation=True))
    gen = torch.Generator().manual_seed(9)
    n_img, n_txt = 25, 6
    kwargs = {"img": torch.randn(1, n_img, 16, generator=gen), "txt": torch.randn(1, n_txt, 40, generator=gen),
              "img_ids": torch.randint(0, 6, (1, n_img, 3), generator=gen).float(),
              "txt_ids": torch.zeros(1, n_txt, 3), "timesteps": torch.tensor([0.6, 0.0]),
              "guidance": torch.tensor([3.5, 3.5]), "y": torch.randn(1, 24, generator=gen),
              "timestep_zero_index": [(15, 25)], "transformer_options": {}}
    with torch.no_grad():
        stock = model.forward_orig(**kwargs)
        patched, stats = _patched(lambda: model.forward_orig(**kwargs))
    assert rel_err(patched, stock) <= tolerance(torch.float32)
    assert not stats["fallback"], stats["fallback"]
    # img: 2 ranges (rows 0, 1) x 2 norms per double block; txt: 2 norms, one row; single blocks: 2 ranges
    # (the first takes the text in); last layer: 2 ranges
    assert stats["served"][("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul")] == 2 * (4 + 2) + 2 * 2 + 2
    assert stats["served"][("gated_residual", "cpu", "torch.addcmul")] == 2 * (4 + 2) + 2 * 2

    comfy.model_management.in_training = True
    m64 = model.double()
    k64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and not k.endswith("_ids") else v)
           for k, v in kwargs.items()}
    l64 = {k: k64[k].requires_grad_(True) for k in ("img", "txt")}
    gen = torch.Generator().manual_seed(5)
    direction = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64)
                 for n, t in dict(l64, **dict(m64.named_parameters())).items()}
    fd = _directional(m64, k64, l64, direction, train=False)
    with flux_npu.patch("cpu", targets=["bfl"]):
        patched_dd = _directional(m64, k64, l64, direction, train=True)
    assert abs(patched_dd - fd) <= 2e-5 * abs(fd), (patched_dd, fd)


def test_kv_cache_reference_tokens_served(layout_path):
    """ComfyUI's FluxKVCache (reference-image keys and values cached and appended by an attn1_patch,
    queries without them): attention gets pe of k's length and a shorter q, which ComfyUI's RoPE
    (`_apply_rope1`, comfy-kitchen's trim_rope_freqs) rotates with the first positions. Served by our
    attention, and through comfy-kitchen when ComfyUI's attention runs, matching stock."""
    model = _current(layout_path, training=False)
    gen = torch.Generator().manual_seed(7)
    n_txt, n_img, n_ref = 6, 9, 4
    txt, img, vec = (torch.randn(*shape, generator=gen) for shape in ((2, n_txt, 64), (2, n_img, 64), (2, 64)))
    ids = torch.randint(0, 8, (2, n_txt + n_img + n_ref, 3), generator=gen).float()
    pe = model.pe_embedder(ids)  # positions of txt, img and the cached reference tokens
    cache = [torch.randn(2, 4, n_ref, 16, generator=gen) for _ in range(2)]

    def kv_cache(q, k, v, pe=None, attn_mask=None, extra_options=None):
        return {"q": q, "k": torch.cat((k, cache[0]), dim=2), "v": torch.cat((v, cache[1]), dim=2)}

    def run(opts):
        d_img, d_txt = model.double_blocks[0](img.clone(), txt.clone(), vec, pe, transformer_options=opts)
        single = model.single_blocks[0](torch.cat((txt, img), 1), vec, pe, transformer_options=opts)
        return torch.cat((d_img, d_txt, single), 1)

    ours = {"patches": {"attn1_patch": [kv_cache]}}
    theirs = dict(ours, optimized_attention_override=lambda func, *a, **k: func(*a, **k))
    with torch.no_grad():
        stock = run(ours)
        with flux_npu.patch("cpu", targets=["bfl"]) as handle:
            ops.reset_dispatch_stats()
            patched = run(ours)
            stats = ops.dispatch_stats()
            ops.reset_dispatch_stats()
            via_ck = run(theirs)
            ck_stats, ck = ops.dispatch_stats(), _ck_row(handle)
    assert rel_err(patched, stock) <= tolerance(torch.float32)
    assert rel_err(via_ck, stock) <= tolerance(torch.float32)
    assert not stats["fallback"], stats["fallback"]
    assert stats["served"][("attention", "cpu", "torch.sdpa")] == 2
    assert stats["served"][("apply_rope", "cpu", "torch.complex_mul")] == 4
    assert (ck["calls"], ck["served"]) == (2, 2)  # ComfyUI's own RoPE calls, through comfy-kitchen to us
    assert ck_stats["served"][("apply_rope", "cpu", "torch.complex_mul")] == 4


def test_longer_pe_is_trimmed_only_where_the_original_trims():
    """A BFL attention (no `_apply_rope1` trimming longer frequencies) keeps its own error for a pe
    longer than q: handed back, counted, not computed on a guess."""
    from flux_npu.patches.bfl_math import build_attention

    def original(q, k, v, pe):
        q, k = ops.reference.apply_rope(q, pe), ops.reference.apply_rope(k, pe)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    patched = build_attention(original, flux_npu.get_backend("cpu"))
    q = torch.randn(1, 2, 5, 8)
    k = v = torch.randn(1, 2, 7, 8)
    pe = ops.rope_freqs(torch.arange(7.0)[None], 8, 10_000, form="bfl", backend="cpu")[:, None]
    with pytest.raises(Exception) as stock_err:
        original(q, k, v, pe)
    ops.reset_dispatch_stats()
    with pytest.raises(type(stock_err.value)):
        patched(q, k, v, pe)
    assert [n for (op, b, r), n in ops.dispatch_stats()["fallback"].items() if "positional encoding" in r] == [1]


def test_exclude_attention_keeps_rope_served(layout_path):
    model = _current(layout_path, training=True)
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _comfy_kwargs(model, inputs, "bool")
    leaves = {"img": inputs["img"], "txt": inputs["txt"]}
    with torch.no_grad():
        stock = model.forward_orig(**kwargs)
    with flux_npu.patch("cpu", targets=["bfl"]):
        every = _train(model, kwargs, leaves)  # gradients checked against float64 above
    patched, stats = _patched(lambda: _train(model, kwargs, leaves), exclude=["attention"])
    assert rel_err(patched["out"], stock) <= tolerance(torch.float32)
    _check_fp32(patched, every)
    assert stats["served"][("apply_rope", "cpu", "torch.complex_mul")] == 2 * 8
    assert ("attention", "cpu", "torch.sdpa") not in stats["served"]


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_comfy_fp8_checkpoint_weights_cast_like_manual_cast(layout_path, fp8):
    """ComfyUI's fp8 checkpoints: weights stored in fp8, cast to the input's dtype on the fly."""
    model = _current(layout_path, training=False, operations="manual_cast")
    for m in model.modules():
        if hasattr(m, "comfy_cast_weights") and m.weight is not None:
            m.weight.data = m.weight.data.to(fp8)
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _comfy_kwargs(model, inputs, "bool")
    with torch.no_grad():
        stock = model.forward_orig(**kwargs)
        patched, stats = _patched(lambda: model.forward_orig(**kwargs))
    assert rel_err(patched, stock) <= tolerance(torch.float32)
    assert not stats["fallback"], stats["fallback"]
    assert stats["served"][("rms_norm", "cpu", "torch.rms_norm")] == 12


def test_comfy_weight_patches_hand_back(layout_path):
    """operations.RMSNorm with an on-the-fly weight patch (a LoRA applied by ComfyUI): the norm's own
    forward applies it, so the QK norm is handed back, counted, and the result matches stock."""
    model = _current(layout_path, training=False)
    norm = model.double_blocks[0].img_attn.norm
    norm.query_norm.weight_function = [lambda w: w * 2]  # ComfyUI sets a list per instance
    q = torch.randn(1, 2, 3, 16)
    stock = norm(q, q, q)[0]
    with flux_npu.patch("cpu", targets=["bfl"]):
        ops.reset_dispatch_stats()
        patched = norm(q, q, q)[0]
        fb = ops.dispatch_stats()["fallback"]
    assert torch.equal(patched, stock)
    assert [n for (op, b, r), n in fb.items() if op == "rms_norm" and "weight_function" in r] == [1]


def test_kohya_fp8_base_scales_served_as_kohya_casts_them(layout_path):
    """kohya --fp8_base stores the DiT in fp8; its RMSNorm computes with `self.scale.float()`."""
    fm, model = _kohya(layout_path)
    ref = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, fm.RMSNorm):
            m.scale.data = m.scale.data.to(torch.float8_e4m3fn)
    for (n, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        p_ref.data = p.data.float() if "scale" in n else p_ref.data
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _kohya_kwargs(inputs)
    leaves = {"img": inputs["img"], "txt": inputs["txt"]}
    stock = _run(model, model, kwargs, leaves)
    patched, stats = _patched(lambda: _run(model, model, kwargs, leaves))
    for k in ("out", "d_img", "d_txt"):
        assert rel_err(patched[k], stock[k]) <= tolerance(torch.float32), k
    assert not stats["fallback"], stats["fallback"]
    assert stats["served"][("rms_norm", "cpu", "torch.rms_norm")] == 12


def _toy_block(self, h, y, gate, dims=None):
    h += apply_mod(y, gate, None, dims)  # noqa: F821  (resolved in the rewritten function's globals)
    return h


def test_in_place_gated_apply_mod_form_served_and_handed_back_in_place():
    """`h += apply_mod(y, gate, None, dims)`: fused where dims is None; else the stock in-place add."""
    from flux_npu.patches.rewrite import rewrite_function

    def apply_mod(tensor, m_mult, m_add=None, modulation_dims=None):
        if modulation_dims is None:
            return tensor * m_mult
        out = tensor.clone()
        out[:, :2] *= m_mult
        return out

    globals()["apply_mod"] = apply_mod
    try:
        fn = rewrite_function(_toy_block, flux_npu.get_backend("cpu"), frozenset(flux_npu.patches.OP_NAMES), "toy")
        h, y, gate = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 1, 8)
        ops.reset_dispatch_stats()
        fused = fn(None, h.clone(), y, gate)
        assert rel_err(fused, (h.double() + gate.double() * y.double()).float()) <= tolerance(torch.float32)
        assert ops.dispatch_stats()["served"][("gated_residual", "cpu", "torch.addcmul")] == 1
        h2 = h.clone()
        out = fn(None, h2, y, gate, dims=[(0, 2, 0)])
        assert out is h2  # handed back: the stock in-place add, on the caller's tensor
        assert torch.equal(out, _toy_block(None, h.clone(), y, gate, [(0, 2, 0)]))
    finally:
        del globals()["apply_mod"]


def test_report_rows_stay_one_line():
    handle = flux_npu.patches.PatchHandle(flux_npu.get_backend("cpu"), [])
    handle.add_row("some.module", "f", "skipped", "cannot build replacement: ValueError: two\nlines")
    assert handle.report()[0].reason == "cannot build replacement: ValueError: two lines"
    rows = [ln for ln in handle.report_table().splitlines() if "two" in ln or "lines" in ln]
    assert len(rows) == 1 and rows[0].startswith("some.module") and rows[0].rstrip().endswith("two lines")


def _ck_row(handle):
    return next(c for c in handle.row_counts() if c["target"] == "comfy_kitchen")


def _override_kwargs(model, inputs):
    """ComfyUI sampler kwargs with a node's `optimized_attention_override` (which runs ComfyUI's own
    attention here): our attention hands every call back, so ComfyUI applies RoPE itself."""
    kwargs = _comfy_kwargs(model, inputs, "bool")
    kwargs["transformer_options"] = dict(kwargs["transformer_options"],
                                         optimized_attention_override=lambda func, *a, **k: func(*a, **k))
    return kwargs


def test_comfy_kitchen_backend_registered_first_serves_comfyui_route_and_undo_restores(layout_path):
    """The real comfy-kitchen registry gets a flux_npu_cpu backend at the front of its priority list;
    ComfyUI's own comfy-kitchen calls (its RoPE, when the attention is handed back) are served by our
    ops through it, ComfyUI's RoPE functions stay as written, and undo disables the backend and
    restores the priority list. AdaLN is not a comfy-kitchen call in ComfyUI's Flux: all 11 are
    served by the rewritten forwards."""
    import comfy_kitchen

    model = _current(layout_path, training=False)
    import comfy.ldm.flux.math as math_

    apply_rope = math_.apply_rope
    before = list(comfy_kitchen.registry._priority)
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _override_kwargs(model, inputs)
    with torch.no_grad():
        stock = model.forward_orig(**kwargs)
        with flux_npu.patch("cpu", targets=["bfl"]) as handle:
            assert comfy_kitchen.registry._priority == ["flux_npu_cpu", *before]
            rows = {(r.target, r.symbol): r for r in handle.report()}
            assert rows[("comfy.ldm.flux.math", "apply_rope")].status == "skipped"
            assert "comfy-kitchen" in rows[("comfy.ldm.flux.math", "apply_rope")].reason
            assert math_.apply_rope is apply_rope
            ops.reset_dispatch_stats()
            patched = model.forward_orig(**kwargs)
            stats = ops.dispatch_stats()
            ck = _ck_row(handle)
    assert rel_err(patched, stock) <= tolerance(torch.float32)
    assert (ck["status"], ck["calls"], ck["served"]) == ("patched", 4, 4)  # 4 apply_rope (q and k each)
    assert stats["served"][("apply_rope", "cpu", "torch.complex_mul")] == 8
    assert stats["served"][("layer_norm_modulate", "cpu", "torch.layer_norm+addcmul")] == 11
    assert comfy_kitchen.registry._priority == before
    assert not comfy_kitchen.registry.is_available("flux_npu_cpu")


@pytest.mark.parametrize("where", ["last", None])
def test_comfy_kitchen_priority_is_the_users(layout_path, where):
    """comfy_kitchen="last": comfy-kitchen's own backends keep the calls they take; None: nothing is
    registered and ComfyUI's RoPE functions are replaced as in the older layout."""
    import comfy_kitchen

    model = _current(layout_path, training=False)
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _override_kwargs(model, inputs)
    with torch.no_grad():
        stock = model.forward_orig(**kwargs)
        with flux_npu.patch("cpu", targets=["bfl"], comfy_kitchen=where) as handle:
            rows = {(r.target, r.symbol): r for r in handle.report()}
            ops.reset_dispatch_stats()
            patched = model.forward_orig(**kwargs)
            served = ops.dispatch_stats()["served"]
            ck = _ck_row(handle)
    assert rel_err(patched, stock) <= tolerance(torch.float32)
    if where == "last":
        assert comfy_kitchen.registry._priority[-1] != "flux_npu_cpu"  # undone
        assert ck["calls"] == 0  # eager, ahead of us, took ComfyUI's RoPE calls
        assert ("apply_rope", "cpu", "torch.complex_mul") not in served
    else:
        assert ck["status"] == "skipped"
        assert rows[("comfy.ldm.flux.math", "apply_rope")].status == "patched"
        assert served[("apply_rope", "cpu", "torch.complex_mul")] == 8


def test_report_collect_shows_live_rows_after_a_run(layout_path):
    """flux_npu.report.collect(patches=True) from a script: the live handle's rows with their counts."""
    from flux_npu import report

    model = _current(layout_path, training=False)
    inputs = bfl_inputs(model, batch=1, side=4, text_len=3)
    with torch.no_grad(), flux_npu.patch("cpu", targets=["bfl"]):
        model.forward_orig(**inputs)
        data = report.collect(patches=True)
        text = report.render(data)
    rows = {(r["target"], r["symbol"]): r for r in data["patch_runtime"]["rows"]}
    att = rows[("comfy.ldm.flux.math", "attention")]
    assert (att["calls"], att["served"], att["handed_back"]) == (4, 4, 0)
    assert "served / handed back" in text
    import comfy_kitchen

    assert comfy_kitchen.registry.is_available("flux_npu_cpu") is False  # the live handle was undone...
    with flux_npu.patch("cpu", targets=["bfl"]):
        report.collect(patches=True)  # ...and info's dry run inside a live handle leaves its backend on
        assert comfy_kitchen.registry.is_available("flux_npu_cpu")


def test_training_bfloat16_no_worse_than_stock(layout_path):
    """bf16 training step, patched and stock, each against the patched float32 step of the same weights."""
    from flux_helpers import assert_bf16_no_worse

    model = _current(layout_path, training=True)
    inputs = bfl_inputs(model, batch=2, side=5, text_len=6)
    kwargs = _comfy_kwargs(model, inputs, "bool")
    leaves = {"img": inputs["img"], "txt": inputs["txt"]}
    with flux_npu.patch("cpu", targets=["bfl"]):
        ref32 = _train(model, kwargs, leaves)  # stock's gradients are off (above): the checked float32 step
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    k16 = {k: (v.detach().to(torch.bfloat16).requires_grad_(v.requires_grad)
               if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in ("img_ids", "txt_ids") else v)
           for k, v in kwargs.items()}
    l16 = {"img": k16["img"], "txt": k16["txt"]}
    stock = _train(m16, k16, l16)
    patched, stats = _patched(lambda: _train(m16, k16, l16))
    assert not stats["fallback"], stats["fallback"]
    assert _served(stats) == SERVED_PER_TRAINING_STEP
    # the project's bf16 rule, against the float32 step whose gradients match float64 (stock's bf16
    # gradients carry its checkpointing error too, so this bound is no tighter than stock's)
    assert_bf16_no_worse(patched, stock, ref32, keys=["out", "d_img", "d_txt"])
