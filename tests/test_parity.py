"""The parity suite: the shipped CPU golden checks out on cpu, on the stock references and on the
emulated npu backend; bad goldens and a wrong kernel fail with clear messages."""

import dataclasses
import json
import os

import pytest
import torch

from flux_npu import ops, parity
from flux_npu.backends import cpu as cpu_backend
from flux_npu.backends import register_backend, unregister_backend
from flux_npu.cli import main
from flux_npu.ops import registry
from flux_npu.parity import GoldenError
from flux_npu.parity import cases as C

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "parity_cpu.safetensors")


def test_shipped_golden_covers_every_op_and_both_blocks():
    g = parity.load_golden(GOLDEN)
    covered = {C.CASES[e["case"]].op for e in g.entries}
    assert covered == set(ops.OPS) | {"block"}
    ids = {e["id"] for e in g.entries}
    for dt in ("fp32", "bf16", "fp16"):
        assert f"tiny.double_block.{dt}" in ids and f"tiny.single_block.{dt}" in ids
        assert f"width.attention.{dt}" in ids  # real head dim 128
    assert g.meta["backend"] == "cpu" and json.loads(g.meta["versions"])["torch"]
    assert os.path.getsize(GOLDEN) < 6e6


def test_cpu_matches_shipped_golden():
    report = parity.check(GOLDEN, backend="cpu")
    assert report.ok, report.table()
    assert all(r.status == "pass" for r in report.results)
    # gradients are compared, for blocks the parameters' too
    blk = next(r for r in report.results if r.id == "tiny.double_block.bf16")
    kinds = {t.name.split("/")[0] for t in blk.tensors}
    assert kinds == {"out", "grad", "pgrad"}


def test_stock_references_match_golden_within_tolerance():
    """The plain-torch references and unpatched diffusers: an independent path, so errors are
    small but not all zero."""
    report = parity.check(GOLDEN, backend="cpu", stock=True)
    assert report.ok, report.table()
    worst = max(t.rel for r in report.results if r.dtype == "bf16" for t in r.tensors)
    assert 0.0 < worst <= 4e-2


@pytest.mark.emulator
def test_npu_emulator_matches_shipped_golden(npu_emulated):
    report = parity.check(GOLDEN, backend=npu_emulated)
    assert report.ok, report.table()


@pytest.fixture
def wrong_backend(monkeypatch):
    """A throwaway backend whose rms_norm forgets the affine weight (a realistic kernel bug)."""
    b = dataclasses.replace(cpu_backend.BACKEND, name="parity_wrong", kernel_modules=(), priority=999)
    register_backend(b, replace=True)

    def bad_rms_norm(backend, x, weight, eps, out_dtype):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(out_dtype or x.dtype)

    monkeypatch.setitem(registry._TABLE, ("rms_norm", "parity_wrong"),
                        [registry.Kernel("rms_norm", "parity_wrong", "bad", bad_rms_norm)])
    yield b
    unregister_backend("parity_wrong")


def test_wrong_kernel_fails_the_check(wrong_backend):
    report = parity.check(GOLDEN, backend=wrong_backend)
    assert not report.ok
    status = {r.id: r.status for r in report.results}
    for dt in ("fp32", "bf16", "fp16"):
        assert status[f"tiny.rms_norm.{dt}"] == "FAIL"
        assert status[f"width.rms_norm.{dt}"] == "FAIL"
        assert status[f"tiny.attention.{dt}"] == "pass"
    assert status["tiny.double_block.fp32"] == "FAIL"  # the QK norms inside the patched block


def test_cli_check_exit_codes(wrong_backend, capsys):
    assert main(["parity", "check", GOLDEN, "--backend", "cpu", "--cases", "rms_norm,attention"]) == 0
    out = capsys.readouterr().out
    assert "tiny.rms_norm.bf16" in out and "rel err" in out and "tolerance" in out
    assert main(["parity", "check", GOLDEN, "--backend", "parity_wrong", "--cases", "rms_norm"]) == 1
    cap = capsys.readouterr()
    assert "FAIL" in cap.out and "FAILED: tiny.rms_norm.fp32" in cap.err


def test_truncated_and_corrupted_goldens_fail_clearly(tmp_path, capsys):
    data = open(GOLDEN, "rb").read()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GoldenError, match="truncated or corrupted"):
        parity.check(trunc, backend="cpu")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 8 + b"not json at all")
    with pytest.raises(GoldenError, match="truncated or corrupted"):
        parity.load_golden(garbage)
    with pytest.raises(GoldenError, match="not found"):
        parity.load_golden(tmp_path / "missing.safetensors")
    assert main(["parity", "check", str(trunc)]) == 1
    assert "truncated or corrupted" in capsys.readouterr().err


def test_safetensors_without_our_metadata_is_rejected(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(p))
    with pytest.raises(GoldenError, match="not a flux-npu parity golden"):
        parity.load_golden(p)


def test_golden_missing_a_tensor_is_rejected(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(GOLDEN, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "tiny.attention.fp32/grad/q"}
    p = tmp_path / "holey.safetensors"
    save_file(tensors, str(p), metadata=meta)
    with pytest.raises(GoldenError, match="tiny.attention.fp32: 'grad/q' is listed but missing"):
        parity.load_golden(p)


def test_golden_from_other_shapes_is_rejected(tmp_path, monkeypatch):
    p = tmp_path / "other_shapes.safetensors"
    monkeypatch.setitem(C.SHAPE_SETS, "tiny", dataclasses.replace(C.SHAPE_SETS["tiny"], img=9))
    parity.record(p, backend="cpu", shape_sets="tiny", dtypes="fp32", cases=["attention"])
    monkeypatch.undo()
    with pytest.raises(GoldenError, match=r"shape set 'tiny' was recorded as img=9 \(now 16\)"):
        parity.check(p, backend="cpu")


def test_record_roundtrip_and_metadata(tmp_path, capsys):
    p = tmp_path / "g.safetensors"
    assert main(["parity", "record", "--backend", "cpu", "-o", str(p), "--shapes", "tiny",
                 "--dtypes", "bf16", "--cases", "attention,single_block", "--seed", "7"]) == 0
    g = parity.load_golden(p)
    assert g.meta["seed"] == "7" and g.meta["backend"] == "cpu" and g.meta["device"]
    assert [e["id"] for e in g.entries] == ["tiny.attention.bf16", "tiny.single_block.bf16"]
    # the stored inputs are the catalogue's, drawn from the seed on the CPU
    spec = C.CaseSpec(C.SHAPE_SETS["tiny"], C.CASES["attention"], torch.bfloat16)
    assert torch.equal(g.group("tiny.attention.bf16", "in")["q"], C.make_inputs(spec, 7)["q"])
    out = tmp_path / "r.json"
    assert main(["parity", "check", str(p), "--backend", "cpu", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["ok"] is True


def test_large_block_path_rebuilds_params_from_seed(tmp_path, monkeypatch):
    """Flux-width blocks are too big to store: parameters come back from the seed (verified by
    checksum) and only small parameters' gradients are kept. Exercised here at tiny size."""
    monkeypatch.setattr(C, "PARAM_STORE_LIMIT", 0)
    monkeypatch.setattr(C, "PARAM_GRAD_LIMIT", 200)
    p = tmp_path / "big.safetensors"
    parity.record(p, backend="cpu", shape_sets="tiny", dtypes="fp32", cases=["double_block"])
    g = parity.load_golden(p)
    e = g.entries[0]
    assert e["params"] == "seed" and e["checksum"]
    assert not g.group(e["id"], "param")
    pgrads = g.group(e["id"], "pgrad")
    assert pgrads and all(t.numel() <= 200 for t in pgrads.values())
    assert parity.check(p, backend="cpu").ok
    # a block that no longer rebuilds to the recorded values is refused, not silently compared
    monkeypatch.setattr(C, "param_checksum", lambda m: "0,0")
    with pytest.raises(GoldenError, match="differs from the recorded one"):
        parity.check(p, backend="cpu")
