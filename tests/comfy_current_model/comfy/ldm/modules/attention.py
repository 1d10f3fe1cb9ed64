"""comfy.ldm.modules.attention layout (ComfyUI 2026-08): every attention implementation is wrapped
(`wrap_attn`) so that a `transformer_options["optimized_attention_override"]` (a node's attention)
runs instead, called with the wrapped function first; q/k/v may arrive as single-owner
AttentionTensorContainers (`peek()` reads, `take()` consumes), which the wrapper unpacks unless the
function has a `container_function`. `optimized_attention` is chosen ONCE, at import, from the
command line: SDPA (`attention_pytorch`) by default, sage / flash / xformers / comfy-kitchen int8
when the user asks for them (`--use-sage-attention`, ...); modules import it by name."""

import functools

import torch
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


def wrap_attn(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        boxed = len(args) >= 3 and isinstance(args[0], AttentionTensorContainer)
        if kwargs.get("_inside_attn_wrapper"):
            return func(*_unbox(args, boxed), **kwargs)
        kwargs = dict(kwargs, _inside_attn_wrapper=True)
        override = (kwargs.get("transformer_options") or {}).get("optimized_attention_override")
        if override is not None:
            return override(func, *_unbox(args, boxed), **kwargs)
        if boxed and wrapper.container_function is not None:
            return wrapper.container_function(*args, **kwargs)
        return func(*_unbox(args, boxed), **kwargs)

    wrapper.container_function = None
    return wrapper


def _unbox(args, boxed):
    return (*(a.take() for a in args[:3]), *args[3:]) if boxed else args


def _heads_first(q, k, v, heads, skip_reshape):
    if skip_reshape:
        return q, k, v
    return tuple(t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))


def _mask_4d(mask):
    if mask is not None and mask.ndim == 2:  # (L, S): one mask for every batch row and head
        mask = mask.unsqueeze(0)
    if mask is not None and mask.ndim == 3:  # (B, L, S): one per batch row
        mask = mask.unsqueeze(1)
    return mask


@wrap_attn
def attention_basic(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                    **kwargs):
    q, k, v = _heads_first(q, k, v, heads, skip_reshape)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = _mask_4d(mask)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.finfo(scores.dtype).max) if mask.dtype == torch.bool \
            else scores + mask
    out = (scores.softmax(-1).to(v.dtype) @ v)
    return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


@wrap_attn
def attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                      **kwargs):
    q, k, v = _heads_first(q, k, v, heads, skip_reshape)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_mask_4d(mask))
    return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


optimized_attention = attention_pytorch  # ComfyUI's default where torch has SDPA (no attention flag given)
optimized_attention_masked = optimized_attention
