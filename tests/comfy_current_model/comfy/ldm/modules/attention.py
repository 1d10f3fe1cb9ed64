# ruff: noqa: B006  (ComfyUI's own `transformer_options={}` defaults, kept as its layout has them)
"""comfy.ldm.modules.attention layout (late 2025): q/k/v may come wrapped in a single-owner
AttentionTensorContainer (`peek()` reads, `take()` consumes), a module's ComfyAttention names a
preferred attention `function` (None: the default), and `transformer_options`'
`optimized_attention_override` lets a user swap the attention."""

import torch.nn.functional as F


class AttentionTensorContainer:
    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def peek(self):
        if self.tensor is None:
            raise RuntimeError("attention tensor container already consumed")
        return self.tensor

    def take(self):
        t = self.peek()
        self.tensor = None
        return t


class ComfyAttention:
    def __init__(self, function=None):
        self.function = function


def _default_attention(q, k, v, heads, mask=None, skip_reshape=False, **_):
    if not skip_reshape:
        raise NotImplementedError("the Flux path always passes heads-first tensors")
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                        skip_output_reshape=False, transformer_options={}, preferred_attention=None):
    if isinstance(q, AttentionTensorContainer):
        q, k, v = q.take(), k.take(), v.take()
    override = transformer_options.get("optimized_attention_override")
    if override is not None:
        return override(_default_attention, q, k, v, heads, mask=mask, skip_reshape=skip_reshape)
    if preferred_attention is not None and preferred_attention.function is not None:
        return preferred_attention.function(q, k, v, heads, mask=mask, skip_reshape=skip_reshape)
    return _default_attention(q, k, v, heads, mask=mask, skip_reshape=skip_reshape)
