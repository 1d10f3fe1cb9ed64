"""Patch for transformers' T5 text encoder: T5LayerNorm (an RMSNorm) -> ops.rms_norm.

The output dtype follows the original: the weight's dtype when it is float16/bfloat16, else
float32 (the original multiplies a float32 normalised tensor by the weight)."""

from __future__ import annotations

import torch

from .. import ops
from .registry import register_patch_set
from .spec import PatchSet, Spec, exact

T5_MODULE = "transformers.models.t5.modeling_t5"


def build_t5_forward(original, backend):
    def forward(self, hidden_states):
        w = self.weight
        out = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.promote_types(torch.float32, w.dtype)
        return ops.rms_norm(hidden_states, w, self.variance_epsilon, out_dtype=out, backend=backend)

    return forward


register_patch_set(
    PatchSet(
        target="transformers",
        matches=exact(T5_MODULE),
        import_names=(T5_MODULE,),
        specs=[Spec("T5LayerNorm.forward", build_t5_forward, "T5 RMSNorm -> ops.rms_norm",
                    params=("self", "hidden_states"), ops=("rms_norm",))],
    )
)
