"""Per-op timings, stock Flux code vs our patched op, with pytest-benchmark.

Each case first checks its implementation against the reference with the tests' tolerance, then
times it; extra_info carries the bytes moved, GB/s inputs and the device/version record. Each
pytest-benchmark round is one call followed by a synchronisation, i.e. per-call latency (host path
included); device time (back-to-back calls, the basis of GB/s and % of copy) is what
`flux-npu bench ops` reports next to it.
`pytest bench/ --benchmark-only --bench-shape mini --benchmark-json out.json`
"""

import pytest

from flux_npu.benchmark import ops as bench_ops
from flux_npu.testing import tolerance

DTYPES = ["bf16", "fp32"]


@pytest.mark.parametrize("impl", ["stock", "patched"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", bench_ops.OPS)
def test_op(benchmark, backend, bench_shape, environment, op, dtype, impl):
    if op == "rope_freqs/bfl" and dtype != "fp32":
        pytest.skip("rope_freqs takes float positions; one dtype is enough")
    case = bench_ops.build_case(op, bench_shape, dtype, backend, backend.device())
    fn = case.impls[impl]
    err = bench_ops.check(fn, case.reference(), case.tol_dtype)
    assert err <= tolerance(case.tol_dtype), f"{op} {impl}: rel err {err:.2e} before timing"
    utils = backend.utils

    def call():
        fn()
        utils.synchronize()

    benchmark.group = f"{op} {case.shape} {dtype}"
    benchmark.extra_info.update(environment)
    benchmark.extra_info.update(nbytes=case.nbytes, rel_err=err, note=case.note)
    benchmark.pedantic(call, rounds=7 if backend.device_type == "cpu" else 50, warmup_rounds=2, iterations=1)
