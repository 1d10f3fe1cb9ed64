"""Shared test setup.

- `tests/bfl_model` goes on sys.path so the BFL-layout test model imports as `flux.*`, the module
  names the BFL patches look for.
- Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter: TRITON_INTERPRET=1
  must be set before triton is first imported, so it is set here.
- Every test starts with no live patch handle and fresh dispatch statistics.
- `npu_emulated`: the npu backend's code path on CPU tensors through the torch_npu *contract
  emulator* in tests/npu_emulator (a stand-in for tests, never a hardware result).

Tests follow the device they find:
- `device`: `cuda` when a GPU is present (Triton kernels compile for real), else `cpu` (Triton runs
  under its interpreter). Tests of the cuda backend's kernels build their tensors on it.
- `npu_backend`: the real npu backend on npu tensors when torch_npu and a device are present, else
  the contract emulator on CPU tensors (`npu_emulated`); `npu_device` is the matching device.
- Tests that do not name a backend run on `cpu`: FLUX_NPU_BACKEND defaults to cpu here, so a GPU
  host does not silently change what they test. Tests of another backend pin it (`backend=`,
  `use_backend`, or the fixtures above).
- `requires(pkg, ...)`: skip with the reason when an optional dependency does not import.
"""

import os
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "bfl_model"))
sys.path.insert(0, HERE)

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FLUX_NPU_BACKEND", "cpu")


def _real_npu() -> bool:
    """torch_npu (the real one) imports and sees a device."""
    import importlib.util

    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401

        return not getattr(torch_npu, "EMULATED", False) and torch.npu.is_available()
    except Exception:
        return False


NPU = _real_npu()

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


def requires(*packages):
    """Skip marker naming the missing optional dependency and how to install it."""
    import importlib

    missing = []
    for pkg in packages:
        try:
            importlib.import_module(pkg)
        except Exception as exc:  # ImportError, or a broken install raising anything else
            missing.append(f"{pkg} ({type(exc).__name__}: {exc})")
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}; pip install -e '.[all]'")


@pytest.fixture(scope="session")
def device():
    """The device the cuda backend's kernels are tested on: cuda when present, else cpu (interpreter)."""
    return torch.device("cuda") if GPU else torch.device("cpu")


@pytest.fixture
def npu_backend():
    """The npu Backend: real hardware when present, else the contract emulator (CPU tensors)."""
    if NPU:
        from flux_npu.backends import get_backend

        yield get_backend("npu")
        return
    from npu_emulator.install import emulated_npu_backend

    with emulated_npu_backend() as backend:
        yield backend


@pytest.fixture
def npu_device(npu_backend):
    return torch.device("npu") if NPU else torch.device("cpu")


@pytest.fixture
def npu_emulated():
    """Yields the npu Backend bound to CPU tensors with the torch_npu contract emulator installed
    (EMULATOR, not hardware); uninstalls it afterwards."""
    from npu_emulator.install import emulated_npu_backend

    with emulated_npu_backend() as backend:
        yield backend
