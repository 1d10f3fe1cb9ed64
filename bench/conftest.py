"""pytest-benchmark suite for the per-op benchmarks: `pytest bench/ --benchmark-only`.

Options: --bench-shape (quick | mini | dev; default quick), --bench-backend (default:
FLUX_NPU_BACKEND, then auto-detect). The cases, their stock baselines and their reference checks
are the ones of `flux-npu bench ops` (flux_npu.benchmark.ops), which reuse the tests' oracle
(`flux_npu.ops.reference`) and tolerance table (`flux_npu.testing`).
"""

import os
import sys

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "bfl_model"))


def pytest_addoption(parser):
    parser.addoption("--bench-shape", default="quick", help="shape preset of flux_npu.benchmark.ops.SHAPES")
    parser.addoption("--bench-backend", default=None, help="backend name (default: FLUX_NPU_BACKEND / auto)")


@pytest.fixture(scope="session")
def backend(request):
    from flux_npu.backends import get_backend

    return get_backend(request.config.getoption("--bench-backend"))


@pytest.fixture(scope="session")
def bench_shape(request):
    return request.config.getoption("--bench-shape")


@pytest.fixture(scope="session")
def environment(backend):
    from flux_npu.benchmark.ops import copy_bandwidth, environment

    utils = backend.utils
    bw = copy_bandwidth(backend.device(), utils, (64 if backend.device_type == "cpu" else 1024) * 2**20)
    return environment(backend, utils, bw)
