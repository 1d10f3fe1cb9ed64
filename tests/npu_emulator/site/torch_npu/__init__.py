"""EMULATED torch_npu: the flux_npu test suite's contract emulator, NOT the real package.

Runs the documented contracts of a few torch_npu ops on CPU tensors (see tests/npu_emulator).
Like the real package, importing it attaches `torch.npu`."""

import torch

from . import npu
from ._ops import npu_fused_infer_attention_score, npu_fusion_attention, npu_rms_norm, npu_rotary_mul  # noqa: F401

EMULATED = True
__version__ = "2.13.0+contract.emulator"

torch.npu = npu
