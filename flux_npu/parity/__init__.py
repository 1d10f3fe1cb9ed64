"""Per-op and per-block parity between devices.

    from flux_npu import parity
    parity.record("golden.safetensors", backend="cuda")            # on the reference device
    report = parity.check("golden.safetensors", backend="npu")    # on the device under test
    print(report.table()); assert report.ok

Command line: `flux-npu parity record|check|list`. The catalogue is in `cases.py`, the golden
format in `golden.py`, recording and the comparison in `suite.py`. The shipped goldens
(`parity_<backend>.safetensors`, in `tests/golden/` of the repository and `flux_npu/data/golden/`
of a wheel) are found by `golden_dir()` / `shipped_goldens()` / `golden_path()`.
"""

from .cases import BLOCK_FACTOR, CASES, DTYPES, SHAPE_SETS, Case, CaseSpec, Shapes, select
from .golden import FORMAT, Golden, GoldenCorrupted, GoldenError, load_golden
from .suite import (
    PARITY_SDPA,
    CaseResult,
    CheckReport,
    check,
    compute,
    golden_dir,
    golden_path,
    record,
    shipped_goldens,
)

__all__ = [
    "BLOCK_FACTOR",
    "CASES",
    "Case",
    "CaseResult",
    "CaseSpec",
    "CheckReport",
    "DTYPES",
    "FORMAT",
    "Golden",
    "GoldenCorrupted",
    "GoldenError",
    "PARITY_SDPA",
    "SHAPE_SETS",
    "Shapes",
    "check",
    "compute",
    "golden_dir",
    "golden_path",
    "load_golden",
    "record",
    "select",
    "shipped_goldens",
]
