"""Patches for diffusers' FluxTransformer2DModel.

- `FluxAttnProcessor.__call__`: the attention processor of every Flux attention module, rewritten
  on our ops: QK RMSNorms (`norm_q`, `norm_k`, `norm_added_q`, `norm_added_k`) -> ops.rms_norm,
  RoPE -> ops.apply_rope, attention -> ops.attention in diffusers' (B, S, H, D) layout (so the npu
  backend can hand it to the fused op without a transpose). In single-stream blocks, where the QK
  norm feeds RoPE directly, both go through ops.qk_norm_rope (one fused Triton pass on cuda).
  When the user chose a diffusers attention backend (set_attention_backend, the
  attention_backend context, DIFFUSERS_ATTN_BACKEND) or context parallelism, the QK norms and
  RoPE stay on our ops and the attention itself is diffusers' dispatch_attention_fn with their
  backend (counted in patches.routes()); patch(exclude=["attention"]) does the same.
- `FluxTransformerBlock.forward` / `FluxSingleTransformerBlock.forward`: the feed-forward-side
  LayerNorm + (1 + scale_mlp) + shift_mlp (norm2, norm2_context) -> ops.layer_norm_modulate and
  the gated residuals (attention, feed-forward, single-block output) -> ops.gated_residual, by
  rewriting only those expressions in the installed forward's source (rewrite.py).
- `FluxPosEmbed.forward`: RoPE frequencies -> ops.rope_freqs (float32 on devices without float64;
  batched 3-D ids go to the original). The same builder serves FLUX.2's Flux2PosEmbed.
- `AdaLayerNormZero / AdaLayerNormZeroSingle / AdaLayerNormContinuous.forward`: the AdaLN
  LayerNorm + modulation -> ops.layer_norm_modulate (only the no-affine LayerNorm form Flux uses;
  other configurations keep the stock forward).
- `embeddings.apply_rotary_emb` (and its by-name imports in ~10 other diffusers models): only
  the Flux form -> ops.apply_rope, i.e. real (cos, sin) of shape (S, D) that repeat each value
  for both elements of a pair (checked on the data once per tensor pair and version, cached);
  every other caller gets the original. Reaches processors rewritten from source (FLUX.2,
  IP-adapter).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from .. import ops
from .registry import register_patch_set
from .rewrite import build_block_forward
from .routes import (
    backend_name,
    calls_plainly,
    handback,
    key_padding_mask,
    note_route,
    plain_rms_norm,
    rms_module,
    torch_compiling,
    user_attention_backend,
)
from .spec import OP_NAMES, PatchSet, Spec, exact

FLUX_MODULE = "diffusers.models.transformers.transformer_flux"
NORM_MODULE = "diffusers.models.normalization"
EMB_MODULE = "diffusers.models.embeddings"


def _fusable(attn, q) -> bool:
    """Both QK norms are plain torch RMSNorms over the head dim (called plainly, so no offload or
    casting hook is skipped) with weights on q's device and one epsilon."""
    nq, nk = attn.norm_q, attn.norm_k
    return (
        plain_rms_norm(nq, q)
        and plain_rms_norm(nk, q)
        and nq.weight is not None
        and nk.weight is not None
        and nq.eps is not None
        and nq.eps == nk.eps
    )


def build_processor_call(original, backend, enabled=frozenset(OP_NAMES)):
    get_qkv = original.__globals__["_get_qkv_projections"]
    dispatch_attention_fn = original.__globals__["dispatch_attention_fn"]
    use_attention = "attention" in enabled
    use_rms = "rms_norm" in enabled
    use_rope = "apply_rope" in enabled
    apply_rotary_emb = original.__globals__["apply_rotary_emb"]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v, eq, ek, ev = get_qkv(attn, hidden_states, encoder_hidden_states)
        q = q.unflatten(-1, (-1, attn.head_dim))
        k = k.unflatten(-1, (-1, attn.head_dim))
        v = v.unflatten(-1, (-1, attn.head_dim))
        single = attn.added_kv_proj_dim is None and image_rotary_emb is not None
        if use_rms and use_rope and single and _fusable(attn, q):
            # single-stream block: QK-norm feeds RoPE directly, one fused op where the backend has it
            q, k = ops.qk_norm_rope(q, k, attn.norm_q.weight, attn.norm_k.weight, image_rotary_emb,
                                    attn.norm_q.eps, sequence_dim=1, backend=backend)
            image_rotary_emb = None
        else:
            q = rms_module(attn.norm_q, q, backend, "diffusers FluxAttnProcessor", use_rms)
            k = rms_module(attn.norm_k, k, backend, "diffusers FluxAttnProcessor", use_rms)
        if attn.added_kv_proj_dim is not None:
            eq, ek = eq.unflatten(-1, (-1, attn.head_dim)), ek.unflatten(-1, (-1, attn.head_dim))
            eq = rms_module(attn.norm_added_q, eq, backend, "diffusers FluxAttnProcessor", use_rms)
            ek = rms_module(attn.norm_added_k, ek, backend, "diffusers FluxAttnProcessor", use_rms)
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            if use_rope:
                q = ops.apply_rope(q, image_rotary_emb, sequence_dim=1, backend=backend)
                k = ops.apply_rope(k, image_rotary_emb, sequence_dim=1, backend=backend)
            else:
                q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
                k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        chosen = user_attention_backend(self)
        parallel = getattr(self, "_parallel_config", None)
        if use_attention and chosen is None and parallel is None:
            out = ops.attention(q, k, v, mask=key_padding_mask(attention_mask), layout="BSHD", backend=backend)
            note_route("diffusers attention", "ops.attention")
        else:
            # the user's diffusers attention backend (or context parallelism, or attention excluded by
            # patch(exclude=...)): their attention, our QK norms and RoPE around it
            out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask, backend=self._attention_backend,
                                        parallel_config=parallel)
            note_route("diffusers attention", f"diffusers dispatch_attention_fn ({backend_name(chosen)})")
        out = out.flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            enc, img = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
            img = attn.to_out[1](attn.to_out[0](img.contiguous()))
            enc = attn.to_add_out(enc.contiguous())
            return img, enc
        return out

    __call__.__wrapped_original__ = original
    return __call__



class _Processor:
    """A per-instance processor object running the rewritten processor body."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, fn, original_processor):
        self._fn = fn
        self.original_processor = original_processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return self._fn(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def _processor_instances(module, model, backend, handle, spec, original):
    fn = spec.build(original, backend)
    cls = module.FluxAttnProcessor
    count = skipped = 0
    for sub in model.modules():
        proc = getattr(sub, "processor", None)
        if proc is None:
            continue
        if type(proc) is cls:
            if handle.set_attr(sub, "processor", _Processor(fn, proc)) is None:
                count += 1
        else:
            skipped += 1
    status = "patched" if count else "skipped"
    note = f"{spec.what} on {count} attention module(s)"
    if skipped:
        note += f"; {skipped} with another processor class left as is"
    none = "no FluxAttnProcessor in the model" + (f" ({skipped} other processors)" if skipped else "")
    handle.add_row(module.__name__, spec.symbol, status, note if count else none)


def rope_cos_sin_forward(where: str, axes_from_ids: bool):
    """A builder for a diffusers RoPE position embedding forward (FluxPosEmbed, Flux2PosEmbed):
    per-axis ops.rope_freqs in the (cos, sin) form, concatenated over the head dim. FLUX.1 loops over
    `ids.shape[-1]` axes, FLUX.2 over `len(self.axes_dim)` (`axes_from_ids` picks which, as the
    stock forwards do). Batched (3-D) ids go back to the original: ops.rope_freqs takes 1-D positions."""

    def build(original, backend):
        def forward(self, ids):
            if ids.dim() != 2:
                handback("rope_freqs", backend, f"{where}: batched (3-D) position ids")
                return original(self, ids)
            pos = ids.float()
            n_axes = ids.shape[-1] if axes_from_ids else len(self.axes_dim)
            cos_out, sin_out = [], []
            for i in range(n_axes):
                cos, sin = ops.rope_freqs(pos[:, i], self.axes_dim[i], self.theta, form="cos_sin", backend=backend)
                cos_out.append(cos)
                sin_out.append(sin)
            return torch.cat(cos_out, dim=-1).to(ids.device), torch.cat(sin_out, dim=-1).to(ids.device)

        return forward

    return build


def pos_embed_spec(symbol: str, where: str, axes_from_ids: bool) -> Spec:
    return Spec(symbol, rope_cos_sin_forward(where, axes_from_ids), "RoPE frequencies -> ops.rope_freqs",
                params=("self", "ids"), ops=("rope_freqs",))


def register_diffusers_set(module: str, specs, *, import_module: bool = True) -> None:
    """Register the specs for one diffusers module (imported by patch() unless `import_module` is
    False, for a second set on a module another set already imports)."""
    register_patch_set(
        PatchSet(target="diffusers", matches=exact(module), import_names=(module,) if import_module else (),
                 specs=list(specs))
    )


def _plain_layer_norm(norm) -> bool:
    # with hooks or an instance forward the original runs, calling the norm through its __call__
    return type(norm) is torch.nn.LayerNorm and norm.weight is None and norm.bias is None and calls_plainly(norm)


def build_ada_zero_forward(original, backend):
    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        if self.emb is not None or not _plain_layer_norm(self.norm):
            handback("layer_norm_modulate", backend,
                     "diffusers AdaLayerNormZero: class/timestep embedding or affine norm")
            return original(self, x, timestep, class_labels, hidden_dtype, emb)
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        x = ops.layer_norm_modulate(x, shift_msa[:, None], scale_msa[:, None], self.norm.eps, backend=backend)
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp

    return forward


def build_ada_single_forward(original, backend):
    def forward(self, x, emb=None):
        if not _plain_layer_norm(self.norm):
            handback("layer_norm_modulate", backend, "diffusers AdaLayerNormZeroSingle: affine or non-LayerNorm norm")
            return original(self, x, emb)
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
        x = ops.layer_norm_modulate(x, shift_msa[:, None], scale_msa[:, None], self.norm.eps, backend=backend)
        return x, gate_msa

    return forward


def build_ada_continuous_forward(original, backend):
    def forward(self, x, conditioning_embedding):
        if not _plain_layer_norm(self.norm):
            handback("layer_norm_modulate", backend, "diffusers AdaLayerNormContinuous: affine or non-LayerNorm norm")
            return original(self, x, conditioning_embedding)
        emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
        scale, shift = torch.chunk(emb, 2, dim=1)
        return ops.layer_norm_modulate(x, shift[:, None, :], scale[:, None, :], self.norm.eps, backend=backend)

    return forward


_PAIR_CACHE: OrderedDict[tuple, tuple] = OrderedDict()  # (id cos, id sin) -> (weakrefs, versions, verdict)
_PAIR_CACHE_SIZE = 16


def _version(t):
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter: never cached
        return None


def is_flux_pair_form(cos, sin) -> bool:
    """Whether (cos, sin) repeat each value for the two elements of a pair (Flux's
    `repeat_interleave_real=True` form), the only form ops.apply_rope computes. Checked on the data
    once per (cos, sin) objects and versions (one device sync), then answered from a small cache."""
    key = (id(cos), id(sin))
    vc, vs = _version(cos), _version(sin)
    hit = _PAIR_CACHE.get(key)
    if hit is not None and vc is not None and vs is not None:
        (rc, rs), versions, verdict = hit
        if rc() is cos and rs() is sin and versions == (vc, vs):
            return verdict
    verdict = bool(
        torch.equal(cos[..., 0::2], cos[..., 1::2]) and torch.equal(sin[..., 0::2], sin[..., 1::2])
    )
    if vc is not None and vs is not None:
        try:
            _PAIR_CACHE[key] = ((weakref.ref(cos), weakref.ref(sin)), (vc, vs), verdict)
        except TypeError:
            return verdict
        while len(_PAIR_CACHE) > _PAIR_CACHE_SIZE:
            _PAIR_CACHE.popitem(last=False)
    return verdict


def build_apply_rotary_emb(original, backend):
    def apply_rotary_emb(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        if (
            use_real
            and use_real_unbind_dim == -1
            and sequence_dim in (1, 2)
            and isinstance(freqs_cis, (tuple, list))
            and len(freqs_cis) == 2
            and x.dim() == 4
            and freqs_cis[0].dim() == 2
            and tuple(freqs_cis[0].shape) == (x.shape[sequence_dim], x.shape[-1])
            and tuple(freqs_cis[1].shape) == tuple(freqs_cis[0].shape)
            and freqs_cis[0].device == x.device
            # the data check reads values: not while torch.compile traces (stock code there)
            and not torch_compiling()
            and is_flux_pair_form(freqs_cis[0], freqs_cis[1])
        ):
            return ops.apply_rope(x, tuple(freqs_cis), sequence_dim=sequence_dim, backend=backend)
        return original(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)

    apply_rotary_emb.__wrapped_original__ = original
    return apply_rotary_emb


PROCESSOR_PARAMS = ("self", "attn", "hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")

register_diffusers_set(FLUX_MODULE, [
    Spec(
        "FluxAttnProcessor.__call__",
        build_processor_call,
        "attention -> ops.attention (BSHD), QK RMSNorms -> ops.rms_norm, RoPE -> ops.apply_rope; with a "
        "diffusers attention backend chosen (set_attention_backend, attention_backend(), "
        "DIFFUSERS_ATTN_BACKEND) or context parallelism: that backend's attention via "
        "dispatch_attention_fn, QK norms and RoPE still on our ops",
        params=PROCESSOR_PARAMS,
        instance=_processor_instances,
        ops=("attention", "rms_norm", "apply_rope"),
    ),
    Spec("FluxTransformerBlock.forward", build_block_forward("diffusers FluxTransformerBlock"),
         "AdaLN (feed-forward side) + gated residuals", ops=("layer_norm_modulate", "gated_residual"),
         params=("self", "hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb")),
    Spec("FluxSingleTransformerBlock.forward", build_block_forward("diffusers FluxSingleTransformerBlock"),
         "gated residual", ops=("gated_residual",),
         params=("self", "hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb")),
    pos_embed_spec("FluxPosEmbed.forward", "diffusers FluxPosEmbed", axes_from_ids=True),
])

register_diffusers_set(NORM_MODULE, [
    Spec("AdaLayerNormZero.forward", build_ada_zero_forward, "AdaLN LayerNorm+modulate -> ops.layer_norm_modulate",
         params=("self", "x", "timestep", "class_labels", "hidden_dtype", "emb"), ops=("layer_norm_modulate",)),
    Spec("AdaLayerNormZeroSingle.forward", build_ada_single_forward,
         "AdaLN LayerNorm+modulate -> ops.layer_norm_modulate", params=("self", "x", "emb"),
         ops=("layer_norm_modulate",)),
    Spec("AdaLayerNormContinuous.forward", build_ada_continuous_forward,
         "AdaLN (norm_out) LayerNorm+modulate -> ops.layer_norm_modulate",
         params=("self", "x", "conditioning_embedding"), ops=("layer_norm_modulate",)),
])

register_diffusers_set(EMB_MODULE, [
    Spec("apply_rotary_emb", build_apply_rotary_emb,
         "RoPE (Flux cos/sin form) -> ops.apply_rope; other forms keep the original",
         params=("x", "freqs_cis", "use_real", "use_real_unbind_dim", "sequence_dim"), rebind=True,
         ops=("apply_rope",)),
])
