"""Plain-torch references: what "correct" means for every op.

Each reference is written for clarity, not speed, computes in float32 (float64 for float64 inputs,
so a float64 call is the high-precision oracle of the tests) and returns the input's dtype unless
stated. They are the fallback when a backend declines an input,
the oracle of the tests and the baseline of the benchmarks. No backend kernel is imported here.
Each lives in its op's catalogue file (`flux_npu/ops/catalogue/<op>.py`); this module names them all.

Conventions shared with Flux code:
- attention tensors are (B, H, S, D) ("BHSD"); diffusers' dispatcher hands (B, S, H, D) ("BSHD").
- RoPE rotates *adjacent* pairs (x[2i], x[2i+1]) by angle pos * theta^(-2i/dim).
  BFL form: `freqs` are rotation matrices (..., S, D/2, 2, 2) = [[cos, -sin], [sin, cos]].
  diffusers form: `freqs` is a (cos, sin) pair, each (S, D), every value repeated for its pair.
"""

from __future__ import annotations

from .catalogue.adaln_residual import adaln_residual
from .catalogue.apply_rope import Freqs, apply_rope
from .catalogue.attention import LAYOUTS, attention
from .catalogue.gated_residual import gated_residual
from .catalogue.layer_norm_modulate import layer_norm_modulate
from .catalogue.qk_norm_rope import qk_norm_rope
from .catalogue.rms_norm import rms_norm
from .catalogue.rope_freqs import rope_freqs

__all__ = [
    "LAYOUTS",
    "Freqs",
    "adaln_residual",
    "apply_rope",
    "attention",
    "gated_residual",
    "layer_norm_modulate",
    "qk_norm_rope",
    "rms_norm",
    "rope_freqs",
]
