"""A stand-in Triton driver naming an sm_90 (H100) target, for tests that compile kernels for a GPU
on a machine without one (tests/test_triton_compile.py, tests/test_triton_launch_frames.py).

Their child scripts import it (the tests put this folder on PYTHONPATH) and pass the launcher class
they need: one that records each launch's grid, one that records the launch's Python caller. Only
the driver is stood in for: its device queries (device 0, stream 0, sm_90 with an H100's shared
memory and 132 SMs), `load_binary` (no module is loaded into a GPU) and the launcher (no C launch);
everything triton does above it (specialisation, compilation, the kernel cache) is its own.
"""

import torch
import triton
from triton.backends.compiler import GPUTarget

SM_COUNT = 132


class Utils:  # what triton asks of the driver's C utilities
    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": SM_COUNT, "max_num_regs": 65536, "warpSize": 32}

    def unload_module(self, module):
        pass


def install(launcher_cls):
    """Make an sm_90 driver with `launcher_cls` (called as triton calls its launcher) triton's active
    driver; returns it."""

    class Driver:  # an sm_90 (H100) target, device 0, stream 0
        utils = Utils()

        def __init__(self):
            self.launcher_cls = launcher_cls

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_capability(self, device):
            return (9, 0)

    driver = Driver()
    triton.runtime.driver.set_active(driver)
    return driver


def script_env() -> dict:
    """The environment for a child script that uses this driver: TRITON_INTERPRET unset (`triton.jit`
    then makes compiled kernels at import), triton's default FP fusion, and this folder at the end of
    PYTHONPATH so that `import sm90_driver` finds it."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), here) if p)
    return env
