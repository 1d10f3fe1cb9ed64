"""The op catalogue: one file per op, each the op's one home (PyTorch's OpInfo idea).

Each file holds the op's plain-torch reference, its validation, its plan key, sample inputs at the
named Flux shapes (`flux_npu.shapes`), the stock code the patches replace (what the benchmarks time
against), the bytes it moves, which arguments have gradients and whether patch(ops=...) switches
it, gathered in its `INFO` record. Dispatch (`flux_npu.ops`), parity, the benchmarks, `flux-npu
info`, the patches' op names and the tests read `CATALOGUE`; nothing else lists ops.

Adding an op: a file here (and its line below), a kernel file per backend that accelerates it
(`flux_npu/kernels/<backend>/<op>.py`), its public function in `flux_npu/ops/__init__.py`, the patch
that calls it, and its test file `tests/ops/test_<op>.py`.
"""

from __future__ import annotations

from . import (
    adaln_residual,
    apply_rope,
    attention,
    gated_residual,
    layer_norm_modulate,
    qk_norm_rope,
    rms_norm,
    rope_freqs,
)
from ._info import OpInfo

# dispatch order of `flux-npu info` and the op table
CATALOGUE: dict[str, OpInfo] = {m.INFO.name: m.INFO for m in (
    attention, rope_freqs, apply_rope, rms_norm, layer_norm_modulate, gated_residual, qk_norm_rope, adaln_residual,
)}
OPS = tuple(CATALOGUE)
# the ops patch(ops=/exclude=) and FLUX_NPU_OPS name; composite ops follow their parts
SWITCHABLE = tuple(n for n, i in CATALOGUE.items() if i.switchable)
# benchmark variant -> (op, builder)
BENCH = {variant: (info, build) for info in CATALOGUE.values() for variant, build in info.bench.items()}


def info(op: str) -> OpInfo:
    if op not in CATALOGUE:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    return CATALOGUE[op]


__all__ = ["BENCH", "CATALOGUE", "OPS", "SWITCHABLE", "OpInfo", "info"]
