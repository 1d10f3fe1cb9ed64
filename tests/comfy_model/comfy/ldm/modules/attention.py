"""ComfyUI's attention entry point, in the shape comfy.ldm.modules.attention has it: heads-first
inputs with `skip_reshape=True`, a mask broadcast ComfyUI's way (2-D (L, S), 3-D (B, L, S)) and
`transformer_options`, whose `optimized_attention_override` lets a user swap the attention.
`optimized_attention` is an alias of the implementation ComfyUI picked at import (SDPA,
`attention_pytorch`, when no attention flag is given), as in ComfyUI."""

import torch.nn.functional as F


def attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                      transformer_options={}):
    override = transformer_options.get("optimized_attention_override")
    if override is not None:
        return override(attention_pytorch, q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                        transformer_options={k_: v_ for k_, v_ in transformer_options.items()
                                             if k_ != "optimized_attention_override"})
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


optimized_attention = attention_pytorch
