"""A fork of the x-flux IP processor that normalises the image-prompt keys with a BFL RMSNorm and
the queries once more with torch.nn.RMSNorm (both per head) before its inline attention."""

import torch
from torch import nn

from .layers import RMSNorm, _block_body, heads


class IPDoubleStreamBlockProcessor(nn.Module):
    def __init__(self, context_dim, hidden_dim, head_dim):
        super().__init__()
        self.ip_k_proj = nn.Linear(context_dim, hidden_dim)
        self.ip_v_proj = nn.Linear(context_dim, hidden_dim)
        self.ip_key_norm = RMSNorm(head_dim)
        self.ip_query_norm = nn.RMSNorm(head_dim, eps=1e-6)

    def __call__(self, attn, img, txt, vec, pe, image_proj, ip_scale=1.0, **attention_kwargs):
        img, txt, img_q = _block_body(attn, img, txt, vec, pe)
        ip_key = self.ip_key_norm(heads(self.ip_k_proj(image_proj), attn.num_heads, 1))
        ip_query = self.ip_query_norm(img_q)
        ip_value = heads(self.ip_v_proj(image_proj), attn.num_heads, 1)
        ip_out = torch.nn.functional.scaled_dot_product_attention(ip_query, ip_key, ip_value)
        return img + ip_scale * ip_out.transpose(1, 2).flatten(2), txt
