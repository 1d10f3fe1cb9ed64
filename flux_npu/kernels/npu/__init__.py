"""Ascend NPU kernels (torch_npu fused ops). Importing this package registers them.

torch_npu itself is imported only inside the kernels and their checks (through
`flux_npu.backends.npu.torch_npu_or_reason`), so this package imports on any machine and its
checks answer "torch_npu not importable: ..." where it is absent."""

import contextlib

from .. import import_op_files

# infer_attention before attention: the first kernel that accepts an input serves it (FIA for no-grad calls)
import_op_files(__name__, first=("infer_attention",))


def prepare() -> None:
    """Fill the runtime caches the checks read (torch_npu import, SoC capabilities, the
    `rotary_mode` probe) outside any torch.compile trace: the op table calls it when the backend
    is loaded and when `patch()` binds the backend."""
    from ...backends import npu as _npu
    from ._support import op_has_param

    mod, _why = _npu.torch_npu_or_reason()
    if mod is None:
        return
    # a probe failure surfaces as a check's reason when dispatching, not here
    with contextlib.suppress(Exception):
        _npu.soc_capabilities()
    op_has_param("npu_rotary_mul", "rotary_mode")
