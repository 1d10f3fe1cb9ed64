"""Per-op and per-block parity between devices.

    from flux_npu import parity
    parity.record("golden.safetensors", backend="cuda")            # on the reference device
    report = parity.check("golden.safetensors", backend="npu")    # on the device under test
    print(report.table()); assert report.ok

Command line: `flux-npu parity record|check|list`. The catalogue is in `cases.py`, the golden
format and the comparison in `suite.py`. The golden recorded on CPU ships as
`tests/golden/parity_cpu.safetensors`.
"""

from .cases import BLOCK_FACTOR, CASES, DTYPES, SHAPE_SETS, Case, CaseSpec, Shapes, select
from .suite import FORMAT, CaseResult, CheckReport, Golden, GoldenError, check, compute, load_golden, record

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
    "GoldenError",
    "SHAPE_SETS",
    "Shapes",
    "check",
    "compute",
    "load_golden",
    "record",
    "select",
]
