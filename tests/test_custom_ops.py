"""Every custom op in the `flux_npu` namespace is opchecked.

The cpu and npu kernels register no custom ops, by design (docs/DESIGN.md, "Custom ops"): they
are plain torch, which dynamo traces and inductor fuses across op boundaries, and torch_npu's
fused ops already are dispatcher ops with their own meta and autograd. The Triton kernels of the
cuda backend are custom ops (`flux_npu::triton_*`). This file discovers the namespace by name
after loading every backend's kernel modules, requires an opcheck case for each op found, and
runs `torch.library.opcheck` on it (on CUDA when present, else under the Triton interpreter).
"""

import importlib

import pytest
import torch

from flux_npu import backends, ops


def _load_all_kernels():
    for b in backends.registered_backends():
        ops.kernels_for("rms_norm", b)  # imports the backend's kernel modules (or records why not)


def _discovered():
    _load_all_kernels()
    ns = torch.ops.flux_npu
    names = []
    for name in dir(ns):
        if name.startswith("_") or name == "name":
            continue
        try:
            _ = getattr(ns, name).default  # raises for a namespace entry that is no op
        except (AttributeError, RuntimeError):
            continue
        names.append(name)
    return sorted(names)


def _cases(device):
    """{qualname: [(case id, op, args)]} from the tables next to each kernel family's tests."""
    out = {}
    try:
        triton_tests = importlib.import_module("test_triton_kernels")
    except Exception as exc:  # triton missing: those ops are then not registered either
        return out, f"test_triton_kernels not importable: {type(exc).__name__}: {exc}"
    for case, (op, args) in triton_tests._op_cases(device).items():
        out.setdefault(op._qualname, []).append((case, op, args))
    return out, None


def test_cpu_and_npu_kernels_register_no_custom_ops():
    mine = [n for n in _discovered() if n.startswith(("cpu_", "npu_", "ref_"))]
    assert not mine, f"custom ops {mine} need opcheck cases here (see the module doc for why there are none)"


def test_every_flux_npu_custom_op_has_an_opcheck_case():
    names = _discovered()
    if not names:
        pytest.skip("no flux_npu custom ops registered here (triton not importable?)")
    cases, why = _cases("cpu")
    if why:
        pytest.skip(why)
    missing = [n for n in names if f"flux_npu::{n}" not in cases]
    assert not missing, f"flux_npu custom ops without an opcheck case: {missing}; add them to the op-case table"


@pytest.mark.parametrize("name", _discovered() or ["<none>"])
def test_opcheck_discovered_op(name, device):
    if name == "<none>":
        pytest.skip("no flux_npu custom ops registered here (triton not importable?)")
    cases, why = _cases(device)
    if why:
        pytest.skip(why)
    for case, op, args in cases.get(f"flux_npu::{name}", []):
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (case, results)
