"""`flux-npu verify`: one report directory with pass/fail per parity case against every shipped
golden, the kernels that served each op (dispatch counts), op and model benchmarks, device,
versions and date, and what to send back when something failed. On the cpu backend and on the
npu backend's code path through the contract emulator (a test stand-in, never a hardware
result). No timing is asserted."""

import dataclasses
import json
import os
import shutil
import sys

import pytest
import torch

from flux_npu import verify as V
from flux_npu.backends import cpu as cpu_backend
from flux_npu.backends import register_backend, unregister_backend
from flux_npu.cli import main
from flux_npu.ops import registry

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "parity_cpu.safetensors")


def test_verify_quick_on_cpu_writes_the_full_report(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["verify", "--backend", "cpu", "--quick", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "flux-npu verify: PASS on backend cpu" in printed and str(out / "report.md") in printed
    data = json.loads((out / "report.json").read_text())
    assert data["verdict"] == "PASS" and not data["failures"]
    env = data["environment"]
    assert env["backend"] == "cpu" and env["device"] and env["versions"]["torch"] == torch.__version__
    assert data["date"] and data["command"].startswith("flux-npu verify")
    # parity: every shipped golden, every (tiny, --quick) case passed, each listed
    g = data["parity"]["goldens"][0]
    assert g["golden"] == "parity_cpu.safetensors" and g["status"] == "pass"
    assert g["passed"] == g["total"] == len(g["results"]) > 20
    assert {r["case"] for r in g["results"]} >= {"attention", "rms_norm", "double_block", "single_block"}
    # what served each op: counted, on the cpu backend's kernels
    served = {(s["op"], s["backend"]) for s in data["parity"]["kernels"]["served"] if s["calls"] > 0}
    assert {("attention", "cpu"), ("rms_norm", "cpu"), ("layer_norm_modulate", "cpu")} <= served
    # op benchmark: stock and patched for every op, device time and latency
    impls = {(r["op"], r["impl"]) for r in data["ops"]["rows"] if r["status"] == "ok"}
    assert ("rms_norm", "stock") in impls and ("rms_norm", "patched") in impls
    assert all(r["device_us"] > 0 and r["latency_us"] > 0 for r in data["ops"]["rows"] if r["status"] == "ok")
    # model benchmark: four rows (infer / train-lora x stock / patched), all ok, and the patched one routed
    rows = data["model"]["results"]
    assert [(r["mode"], r["variant"], r["status"]) for r in rows] == [
        ("infer", "stock", "ok"), ("infer", "patched", "ok"), ("train-lora", "stock", "ok"),
        ("train-lora", "patched", "ok")]
    assert any(s["op"] == "attention" and s["calls"] > 0 for s in data["model"]["kernels"]["served"])
    assert json.loads((out / "model.json").read_text())["meta"]["complete"] is True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in data["plots"]["skipped"]
    else:
        assert data["plots"]["files"] == ["model.png", "ops.png", "trajectory.png"]
        assert (out / "model.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
    # the training trajectory (issue 17): --quick runs LoRA against the shipped reference, and passes
    assert data["trajectory"]["status"] == "pass" and list(data["trajectory"]["modes"]) == ["lora"]
    # Ascend's rule against the golden's float64 reference, next to the fixed-tolerance check
    assert g["rule"]["rated"] > 10 and g["rule"]["passed"] == g["rule"]["rated"]
    md = (out / "report.md").read_text()
    for text in ("# flux-npu verify: PASS", "## Parity against the shipped goldens", "tiny.single_block.bf16",
                 "What served each op during parity", "## Op benchmarks", "## Whole-model benchmark",
                 "## What to send back", f"tar czf {out}.tar.gz", "## Training trajectory", "2x rule",
                 "low-precision cases pass"):
        assert text in md


@pytest.mark.emulator
def test_verify_parity_on_the_emulated_npu(tmp_path, npu_emulated):
    data = V.verify(npu_emulated, out_dir=str(tmp_path / "npu"), quick=True, skip=("ops", "model"))
    assert data["verdict"] == "PASS", data["failures"]
    assert data["environment"]["backend"] == "npu"
    assert "not hardware results" in data["environment"]["note"]
    assert "not hardware results" in (tmp_path / "npu" / "report.md").read_text()
    g = data["parity"]["goldens"][0]
    assert g["status"] == "pass" and g["passed"] == g["total"]
    served = {(s["op"], s["backend"]): s["kernel"] for s in data["parity"]["kernels"]["served"] if s["calls"]}
    assert ("attention", "npu") in served and ("rms_norm", "npu") in served  # the npu kernels, not the cpu ones


@pytest.fixture
def wrong_backend(monkeypatch):
    """A backend whose rms_norm forgets its weight (a realistic kernel bug)."""
    b = dataclasses.replace(cpu_backend.BACKEND, name="verify_wrong", kernel_modules=(), priority=999)
    register_backend(b, replace=True)

    def bad_rms_norm(backend, x, weight, eps, out_dtype):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(out_dtype or x.dtype)

    monkeypatch.setitem(registry._TABLE, ("rms_norm", "verify_wrong"),
                        [registry.Kernel("rms_norm", "verify_wrong", "bad", bad_rms_norm)])
    yield b
    unregister_backend("verify_wrong")


def test_failures_are_reported_with_what_to_send_back(tmp_path, capsys, monkeypatch, wrong_backend):
    """A wrong kernel fails its parity cases; a phase that crashes is recorded with its traceback
    while the other phases still run; without matplotlib the report says so."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    def crash(*a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(V, "_ops_bench", crash)
    out = tmp_path / "bad"
    rc = main(["verify", "--backend", "verify_wrong", "--quick", "--skip", "model", "-o", str(out)])
    assert rc == 1
    printed = capsys.readouterr().out
    assert "FAIL on backend verify_wrong" in printed
    assert "FAILED parity parity_cpu.safetensors: tiny.rms_norm" in printed
    assert f"send back: tar czf {out}.tar.gz" in printed
    data = json.loads((out / "report.json").read_text())
    assert data["verdict"] == "FAIL"
    g = data["parity"]["goldens"][0]
    status = {r["id"]: r["status"] for r in g["results"]}
    assert status["tiny.rms_norm.fp32"] == "FAIL" and status["tiny.attention.fp32"] == "pass"
    assert data["ops"]["status"] == "error" and data["ops"]["error"] == "RuntimeError: device lost"
    assert "model" not in data  # skipped on request
    log = (out / "verify.log").read_text()
    assert "phase ops" in log and "Traceback" in log and "device lost" in log
    assert "matplotlib is not installed" in data["plots"]["skipped"]
    md = (out / "report.md").read_text()
    assert "# flux-npu verify: FAIL" in md and "## Failures" in md
    send = md[md.index("## What to send back"):]
    assert f"tar czf {out}.tar.gz -C {tmp_path} bad" in send
    assert "flux-npu verify --backend verify_wrong --quick --skip model -o" in send
    assert "matplotlib is not installed" in md


def test_corrupted_shipped_golden_is_a_golden_error_not_a_backend_fail(tmp_path, monkeypatch):
    gdir = tmp_path / "goldens"
    gdir.mkdir()
    raw = bytearray(open(GOLDEN, "rb").read())
    raw[-3] ^= 0x40  # inside the last tensor's data
    (gdir / "parity_cpu.safetensors").write_bytes(bytes(raw))
    shutil.copy(GOLDEN, gdir / "parity_other.safetensors")
    monkeypatch.setenv("FLUX_NPU_GOLDEN_DIR", str(gdir))
    data = V.verify("cpu", out_dir=str(tmp_path / "r"), quick=True, skip=("ops", "model"))
    assert data["verdict"] == "FAIL"
    by = {g["golden"]: g for g in data["parity"]["goldens"]}
    assert by["parity_cpu.safetensors"]["status"] == "golden error"
    assert "golden corrupted: tensor" in by["parity_cpu.safetensors"]["error"]
    assert by["parity_other.safetensors"]["status"] == "pass"  # every shipped golden is checked


def test_unknown_backend_and_phase_fail_clearly(capsys, tmp_path):
    assert main(["verify", "--backend", "tpu", "-o", str(tmp_path / "x")]) == 1
    assert "unknown flux_npu backend 'tpu'" in capsys.readouterr().err
    assert main(["verify", "--backend", "cpu", "--skip", "everything", "-o", str(tmp_path / "y")]) == 1
    assert "unknown phase(s) ['everything']" in capsys.readouterr().err
