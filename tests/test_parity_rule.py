"""Goldens with a float64 reference and Ascend's accuracy rule (issue 17 item 1).

Format /3 stores, for each bfloat16/float16 case, the float64 reference of every output and
gradient (computed on the CPU from the same low-precision inputs); `parity check` reports per case
this device's error against it, the recording device's error against it, their ratio and the
verdict of the rule msprobe applies to a port (<= 2x; max relative error <= 10x), next to today's
fixed-tolerance check. Goldens of format /2 are still read (the rule is n/a there)."""

import dataclasses
import json

import pytest
import torch

from flux_npu import parity
from flux_npu.backends import cpu as cpu_backend
from flux_npu.backends import register_backend, unregister_backend
from flux_npu.cli import main
from flux_npu.ops import registry
from flux_npu.parity import suite

CASES = ["rms_norm", "attention"]


@pytest.fixture(scope="module")
def golden3(tmp_path_factory):
    p = tmp_path_factory.mktemp("g3") / "g3.safetensors"
    parity.record(p, backend="cpu", shape_sets="tiny", dtypes="fp32,bf16,fp16", cases=CASES)
    return p


@pytest.fixture
def sloppy_backend(monkeypatch):
    """A backend whose rms_norm rounds at every step in the input dtype (three roundings instead of
    one): within today's fixed bf16 tolerance, about twice the error of one rounding."""
    b = dataclasses.replace(cpu_backend.BACKEND, name="parity_sloppy", kernel_modules=(), priority=999)
    register_backend(b, replace=True)

    def sloppy(backend, x, weight, eps, out_dtype):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)
        y = (x * rstd).to(x.dtype)
        return (y * weight.to(x.dtype)).to(out_dtype or x.dtype)

    monkeypatch.setitem(registry._TABLE, ("rms_norm", "parity_sloppy"),
                        [registry.Kernel("rms_norm", "parity_sloppy", "sloppy", sloppy)])
    registry.invalidate_plans()  # plans are cached per signature: forget any made with another kernel
    yield b
    unregister_backend("parity_sloppy")


def test_golden_stores_a_float64_reference_per_low_precision_case(golden3):
    g = parity.load_golden(golden3)
    assert g.meta["format"] == "flux-npu-parity/3"
    by_id = {e["id"]: e for e in g.entries}
    for dt in ("bf16", "fp16"):
        e = by_id[f"tiny.rms_norm.{dt}"]
        assert sorted(e["references"]) == sorted(e["outputs"])  # out/out, grad/x, grad/weight
    assert "references" not in by_id["tiny.rms_norm.fp32"]
    # the reference is float64 maths on the golden's own (bf16) inputs: check it independently
    inp = g.group("tiny.rms_norm.bf16", "in")
    x = inp["x"].double().requires_grad_()
    w = inp["weight"].double().requires_grad_()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    dx, dw = torch.autograd.grad(y, (x, w), inp["d_out"].double())
    for name, want in (("out/out", y), ("grad/x", dx), ("grad/weight", dw)):
        ref = g.tensor(f"tiny.rms_norm.bf16/ref/{name}")
        assert ref.dtype == torch.float32
        assert parity.suite.rel_err(ref, want) < 1e-7, name  # float64 maths, float32 storage
        low = g.tensor(f"tiny.rms_norm.bf16/{name}")
        assert parity.suite.rel_err(low, want) > 1e-4, name  # the bf16 golden itself is not the reference


def test_same_device_is_exactly_at_ratio_one(golden3):
    rep = parity.check(golden3, backend="cpu")
    assert rep.ok and not rep.rule_failed
    for r in rep.results:
        if r.dtype == "fp32":
            assert r.rule is None and all(t.ratio is None for t in r.tensors)
            continue
        assert r.rule == "pass"
        for t in r.tensors:
            assert t.ratio == pytest.approx(1.0) and t.max_rel_ratio <= 1.0 + 1e-9, t
            assert 0 < t.ref_rel < 2e-2
    d = rep.as_dict()
    case = next(c for c in d["results"] if c["id"] == "tiny.rms_norm.bf16")
    assert case["rule"] == "pass" and case["worst_ratio"]["ratio"] == pytest.approx(1.0)
    assert "2x rule" in rep.table()


def test_the_rule_catches_what_the_fixed_tolerance_lets_through(golden3, sloppy_backend, capsys):
    rep = parity.check(golden3, backend=sloppy_backend, cases=["rms_norm"])
    status = {r.id: (r.status, r.rule) for r in rep.results}
    assert status["tiny.rms_norm.bf16"] == ("pass", "FAIL"), rep.table()  # today's check passes
    assert status["tiny.rms_norm.fp16"][1] == "FAIL"
    bad = next(r for r in rep.rule_failed if r.id == "tiny.rms_norm.bf16")
    w = bad.worst_ratio
    assert w.ratio > 2 or w.max_rel_ratio > 10
    assert "error vs float64" in bad.rule_message
    # the CLI reports it always, and fails on it when asked to
    assert main(["parity", "check", str(golden3), "--backend", "parity_sloppy", "--cases", "rms_norm",
                 "--dtypes", "bf16"]) == 0
    assert "Ascend's rule broken: tiny.rms_norm.bf16" in capsys.readouterr().err
    assert main(["parity", "check", str(golden3), "--backend", "parity_sloppy", "--cases", "rms_norm",
                 "--dtypes", "bf16", "--ascend-rule"]) == 1
    assert "FAILED Ascend's rule: tiny.rms_norm.bf16" in capsys.readouterr().err


def test_nan_never_passes_the_rule(golden3, sloppy_backend, monkeypatch):
    def nan_norm(backend, x, weight, eps, out_dtype):
        return torch.full_like(x, float("nan"), dtype=out_dtype or x.dtype) + 0 * x

    monkeypatch.setitem(registry._TABLE, ("rms_norm", "parity_sloppy"),
                        [registry.Kernel("rms_norm", "parity_sloppy", "nan", nan_norm)])
    registry.invalidate_plans()
    rep = parity.check(golden3, backend=sloppy_backend, cases=["rms_norm"], dtypes=["bf16"])
    (r,) = rep.results
    assert r.status == "FAIL" and r.rule == "FAIL"


def test_old_format_golden_is_still_read(tmp_path, capsys):
    p = tmp_path / "old.safetensors"
    meta = parity.record(p, backend="cpu", shape_sets="tiny", dtypes="bf16", cases=["rms_norm"], references=False)
    assert meta["format"] == "flux-npu-parity/2"
    assert all("references" not in e for e in json.loads(meta["cases"]))
    rep = parity.check(p, backend="cpu")
    assert rep.ok and all(r.rule is None for r in rep.results) and not rep.rule_failed
    assert "n/a (no float64 reference in this golden: format flux-npu-parity/2" in rep.table()
    assert main(["parity", "check", str(p), "--backend", "cpu", "--ascend-rule"]) == 0


def test_shipped_golden_has_references_and_the_emulated_npu_is_rated(npu_emulated):
    """Every bf16/fp16 case of the shipped golden is rated on the npu code path (contract
    emulator: CPU tensors, not hardware). Known result: the npu RoPE rounds cos/sin to x's dtype
    (npu_rotary_mul takes one dtype for input, r1, r2 by the strict reading of its docstring), which
    breaks the 10x max-relative-error part of the rule at outputs near zero; every other case
    passes. `verify --backend npu` asks a device whether float32 cos/sin with bf16 x is accepted."""
    from flux_npu.parity import shipped_goldens

    (path,) = [p for p in shipped_goldens() if p.endswith("parity_cpu.safetensors")]
    g = parity.load_golden(path)
    assert g.meta["format"] == suite.FORMAT
    low = [e for e in g.entries if e["dtype"] in ("bf16", "fp16")]
    assert low and all(sorted(e["references"]) == sorted(e["outputs"]) for e in low)
    rep = parity.check(path, backend=npu_emulated, shape_sets=["tiny"])
    assert rep.ok
    rated = [r for r in rep.results if r.rule is not None]
    assert len(rated) == sum(e["dtype"] in ("bf16", "fp16") and e["shape_set"] == "tiny" for e in g.entries)
    broken = {r.case for r in rep.rule_failed}
    assert broken <= {"apply_rope_cos_sin", "apply_rope_bfl"}, [(r.id, r.rule_message) for r in rep.rule_failed]
    for r in rep.rule_failed:  # the norm-error part holds; the max-relative part is what breaks
        assert r.worst_ratio.ratio <= suite.RATIO_LIMIT and r.worst_ratio.max_rel_ratio > suite.MAX_REL_RATIO_LIMIT
