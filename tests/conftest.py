"""Shared test setup.

- `tests/bfl_model` goes on sys.path so the BFL-layout test model imports as `flux.*`, the module
  names the BFL patches look for.
- Every test starts with no live patch handle and fresh dispatch statistics.
"""

import os
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "bfl_model"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _clean_patches():
    from flux_npu import ops
    from flux_npu.patches import live_handles

    ops.reset_dispatch_stats()
    yield
    for h in live_handles():
        h.undo()


@pytest.fixture
def seed():
    torch.manual_seed(1234)
    return 1234
