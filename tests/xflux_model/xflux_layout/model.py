"""A tiny stack of x-flux double and single blocks with IP-adapter processors, as x-flux runs them."""

import torch
from torch import nn

from .modules import ip_normed
from .modules.layers import (
    DoubleStreamBlock,
    EmbedND,
    IPDoubleStreamBlockProcessor,
    IPSingleStreamBlockProcessor,
    SingleStreamBlock,
)


class TinyIPFlux(nn.Module):
    def __init__(self, hidden=32, num_heads=2, context_dim=24, depth=2, single_depth=1, normed_ip=False, ip=True):
        """ip=False keeps the blocks' plain processors (x-flux without an IP adapter)."""
        super().__init__()
        head_dim = hidden // num_heads
        self.pe_embedder = EmbedND(head_dim, 10000, [4, 6, 6])
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden, num_heads) for _ in range(depth))
        for block in self.double_blocks if ip else ():
            if normed_ip:
                block.set_processor(ip_normed.IPDoubleStreamBlockProcessor(context_dim, hidden, head_dim))
            else:
                block.set_processor(IPDoubleStreamBlockProcessor(context_dim, hidden))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden, num_heads) for _ in range(single_depth))
        for block in self.single_blocks if ip else ():
            block.set_processor(IPSingleStreamBlockProcessor(context_dim, hidden))

    def forward(self, img, txt, vec, ids, image_proj=None, ip_scale=1.0):
        pe = self.pe_embedder(ids)
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, image_proj=image_proj, ip_scale=ip_scale)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec=vec, pe=pe, image_proj=image_proj, ip_scale=ip_scale)
        return x
