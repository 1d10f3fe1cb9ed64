"""One table of named Flux shapes and dtype names.

Parity (`flux-npu parity`), the op benchmarks (`flux-npu bench ops`), `flux-npu info`'s routing
rows, the model presets (`flux_npu.models.PRESETS`: heads and head dim) and the op catalogue's
sample inputs all read this table, so a name means one thing everywhere:

- tiny:      the `tiny` model preset's widths (2 heads x 16, hidden 32), 16 image + 8 text tokens.
- width:     Flux's real widths (head dim 128, hidden 3072) with 2 heads and short sequences (24
             tokens, 5 at hidden width), so the shipped parity golden stays small.
- quick:     Flux width, 24 heads, 256 image + 32 text tokens: a benchmark smoke run that fits a CPU.
- flux-mini: Flux width, 24 heads, 512 px (1024 image tokens) + 512 T5 tokens (FluxKits' Flux-mini;
             `flux-npu bench model` uses 512 text tokens for it too).
- flux-dev:  Flux width, 24 heads, 1024 px (4096 image tokens) + 512 T5 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FluxShape:
    name: str
    heads: int
    head_dim: int
    img: int  # image tokens
    txt: int  # text tokens
    hidden: int  # width of the hidden-state ops (layer_norm_modulate, gated_residual, adaln_residual)
    axes: tuple[int, int, int]  # RoPE axes dims (sum = head_dim)
    blocks: bool  # parity builds whole blocks at this shape
    batch: int = 1
    hidden_tokens: int | None = None  # tokens of the hidden-width ops (default: seq)
    doc: str = ""

    @property
    def seq(self) -> int:
        return self.img + self.txt

    @property
    def hidden_seq(self) -> int:
        return self.hidden_tokens or self.seq

    @property
    def block_dim(self) -> int:
        return self.heads * self.head_dim


_FLUX_AXES = (16, 56, 56)

SHAPES: dict[str, FluxShape] = {
    "tiny": FluxShape("tiny", heads=2, head_dim=16, img=16, txt=8, hidden=32, axes=(4, 6, 6), blocks=True,
                      doc="tiny preset widths (2x16), 16+8 tokens, with blocks"),
    "width": FluxShape("width", heads=2, head_dim=128, img=16, txt=8, hidden=3072, axes=_FLUX_AXES, blocks=False,
                       hidden_tokens=5, doc="Flux widths (head dim 128, hidden 3072), 2 heads, 16+8 tokens "
                       "(5 at hidden width), ops only"),
    "quick": FluxShape("quick", heads=24, head_dim=128, img=256, txt=32, hidden=3072, axes=_FLUX_AXES, blocks=False,
                       doc="Flux width, 24 heads, 256+32 tokens: a benchmark smoke run, ops only"),
    "flux-mini": FluxShape("flux-mini", heads=24, head_dim=128, img=1024, txt=512, hidden=3072, axes=_FLUX_AXES,
                           blocks=True, doc="Flux width, 24 heads, 512 px (1024+512 tokens), with blocks"),
    "flux-dev": FluxShape("flux-dev", heads=24, head_dim=128, img=4096, txt=512, hidden=3072, axes=_FLUX_AXES,
                          blocks=True, doc="Flux width, 24 heads, 1024 px (4096+512 tokens), with blocks"),
}

# dtype names of every command line and file (parity goldens, benchmark JSON)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def shape(name: str) -> FluxShape:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; shapes: {', '.join(SHAPES)}")
    return SHAPES[name]
