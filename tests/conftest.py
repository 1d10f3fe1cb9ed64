"""Shared test setup.

- `tests/bfl_model` goes on sys.path so the BFL-layout test model imports as `flux.*`, the module
  names the BFL patches look for.
- Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter: TRITON_INTERPRET=1
  must be set before triton is first imported, so it is set here.
- Every test starts with no live patch handle and fresh dispatch statistics.
- `npu_emulated`: the npu backend's code path on CPU tensors through the torch_npu *contract
  emulator* in tests/npu_emulator (a stand-in for tests, never a hardware result).
"""

import os
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "bfl_model"))
sys.path.insert(0, HERE)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _clean_patches():
    from flux_npu import ops
    from flux_npu.patches import live_handles

    ops.reset_dispatch_stats()
    ops.set_strict(False)
    yield
    for h in live_handles():
        h.undo()
    ops.set_strict(False)


@pytest.fixture
def seed():
    torch.manual_seed(1234)
    return 1234


@pytest.fixture
def npu_emulated():
    """Yields the npu Backend bound to CPU tensors with the torch_npu contract emulator installed
    (EMULATOR, not hardware); uninstalls it afterwards."""
    from npu_emulator.install import emulated_npu_backend

    with emulated_npu_backend() as backend:
        yield backend
