"""Test helper beside the emulator: watch a block of torch code for float64 tensors."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class Float64Watch(TorchDispatchMode):
    """Records every aten op that produced a float64 tensor while active (forward and, if
    backward() runs inside, backward). `ops` lists their names."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.ops.append(str(func))
                break
        return out
