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


def test_golden_locator_finds_the_shipped_goldens(tmp_path, monkeypatch):
    assert os.path.samefile(parity.golden_path(), GOLDEN)
    assert GOLDEN in [os.path.abspath(p) for p in parity.shipped_goldens()]
    # an installed wheel or a copied directory: FLUX_NPU_GOLDEN_DIR wins
    (tmp_path / "parity_x.safetensors").write_bytes(b"")
    monkeypatch.setenv("FLUX_NPU_GOLDEN_DIR", str(tmp_path))
    assert parity.shipped_goldens() == [str(tmp_path / "parity_x.safetensors")]
    with pytest.raises(GoldenError, match="no shipped golden 'parity_cpu.safetensors'; shipped: parity_x"):
        parity.golden_path()
    monkeypatch.setenv("FLUX_NPU_GOLDEN_DIR", str(tmp_path / "nope"))
    with pytest.raises(GoldenError, match="is not a directory"):
        parity.golden_dir()


def test_golden_locator_in_an_installed_wheel(tmp_path, monkeypatch):
    """site-packages has flux_npu/data/golden (package data) and no tests/ beside the package."""
    from flux_npu.parity import suite

    site = tmp_path / "site-packages"
    (site / "flux_npu" / "parity").mkdir(parents=True)
    data = site / "flux_npu" / "data" / "golden"
    data.mkdir(parents=True)
    (data / "parity_cpu.safetensors").write_bytes(open(GOLDEN, "rb").read())
    monkeypatch.delenv("FLUX_NPU_GOLDEN_DIR", raising=False)
    monkeypatch.setattr(suite, "__file__", str(site / "flux_npu" / "parity" / "suite.py"))
    assert parity.golden_path() == str(data / "parity_cpu.safetensors")
    assert parity.load_golden(parity.golden_path()).meta["backend"] == "cpu"
    (data / "parity_cpu.safetensors").unlink()
    with pytest.raises(GoldenError, match="no shipped parity golden found"):
        parity.golden_dir()


def test_shipped_golden_covers_every_op_and_both_blocks():
    g = parity.load_golden(GOLDEN)
    covered = {C.CASES[e["case"]].op for e in g.entries}
    assert covered == set(ops.OPS) | {"block"}
    ids = {e["id"] for e in g.entries}
    for dt in ("fp32", "bf16", "fp16"):
        assert f"tiny.double_block.{dt}" in ids and f"tiny.single_block.{dt}" in ids
        assert f"width.attention.{dt}" in ids  # real head dim 128
    assert g.meta["backend"] == "cpu" and json.loads(g.meta["versions"])["torch"]
    assert json.loads(g.meta["sdpa"]) == {"device_type": "cpu", "allowed": "default"}
    assert len(json.loads(g.meta["checksums"])) == len(list(g._keys))  # every tensor has its sha256
    assert os.path.getsize(GOLDEN) < 10e6  # 9.6 MB: adaln_residual at hidden width 3072, float64 references (f32)


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


CUDA_GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "parity_cuda.safetensors")
_NO_CUDA_GOLDEN = pytest.mark.skipif(
    not os.path.exists(CUDA_GOLDEN),
    reason="no CUDA golden shipped yet: a GPU session records it with `bench/gpu_check.sh --only record`")


@_NO_CUDA_GOLDEN
def test_cpu_matches_shipped_cuda_golden():
    g = parity.load_golden(CUDA_GOLDEN)
    assert g.meta["backend"] == "cuda"
    assert json.loads(g.meta["sdpa"])["allowed"] == list(parity.PARITY_SDPA)  # recorded with cuDNN SDPA off
    report = parity.check(CUDA_GOLDEN, backend="cpu")
    assert report.ok, report.table()


@_NO_CUDA_GOLDEN
@pytest.mark.emulator
def test_npu_emulator_matches_shipped_cuda_golden(npu_emulated):
    report = parity.check(CUDA_GOLDEN, backend=npu_emulated)
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
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "tiny.attention.fp32/grad/q"}  # noqa: SIM118 (safe_open is not iterable)
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


# -- integrity (issue 12 item 6) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_golden(tmp_path_factory):
    p = tmp_path_factory.mktemp("g") / "small.safetensors"
    parity.record(p, backend="cpu", shape_sets="tiny", dtypes="fp32", cases=["rms_norm", "attention"])
    return p


def _data_offset(path, name):
    """Byte offset in the file of tensor `name`'s first data byte (safetensors layout: u64 header
    length, JSON header, data)."""
    import struct

    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return 8 + n + header[name]["data_offsets"][0]


def _flip(src, dst, name, byte, bit):
    raw = bytearray(open(src, "rb").read())
    raw[_data_offset(src, name) + byte] ^= 1 << bit
    dst.write_bytes(bytes(raw))
    return dst


@pytest.mark.parametrize("byte,bit", [(0, 0), (3, 6)], ids=["low-mantissa", "high-exponent"])
def test_flipped_bit_is_reported_as_corruption_not_as_a_backend_fail(small_golden, tmp_path, capsys, byte, bit):
    """fp32 little-endian: byte 0 bit 0 is the lowest mantissa bit (would pass the tolerance),
    byte 3 bit 6 an exponent bit (would fail the backend)."""
    bad = _flip(small_golden, tmp_path / "bad.safetensors", "tiny.rms_norm.fp32/out/out", byte, bit)
    with pytest.raises(parity.GoldenCorrupted, match="golden corrupted: tensor tiny.rms_norm.fp32/out/out"):
        parity.check(bad, backend="cpu")
    assert main(["parity", "check", str(bad), "--backend", "cpu"]) == 1
    cap = capsys.readouterr()
    assert "golden corrupted: tensor tiny.rms_norm.fp32/out/out" in cap.err and "FAIL" not in cap.out


def test_input_corruption_is_caught_too(small_golden, tmp_path):
    bad = _flip(small_golden, tmp_path / "bad.safetensors", "tiny.attention.fp32/in/q", 0, 0)
    with pytest.raises(parity.GoldenCorrupted, match="tensor tiny.attention.fp32/in/q"):
        parity.load_golden(bad)


def _rewrite(src, dst, meta_edit=None, drop=()):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}  # noqa: SIM118 (safe_open is not iterable)
    if meta_edit:
        meta_edit(meta)
        if "meta_sha256" in meta:  # sealed again: these tests reach the checks behind the metadata checksum
            from flux_npu.parity.golden import meta_sha256

            meta["meta_sha256"] = meta_sha256(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_case_that_compares_nothing_fails(small_golden, tmp_path):
    def no_outputs(meta):
        entries = json.loads(meta["cases"])
        for e in entries:
            if e["case"] == "rms_norm":
                e["outputs"] = {}
        meta["cases"] = json.dumps(entries)

    p = _rewrite(small_golden, tmp_path / "empty.safetensors", no_outputs)
    report = parity.check(p, backend="cpu")
    status = {r.id: (r.status, r.message) for r in report.results}
    assert status["tiny.rms_norm.fp32"] == ("FAIL", "nothing compared: the golden lists no outputs for this case")
    assert status["tiny.attention.fp32"][0] == "pass"
    assert not report.ok


def test_golden_omitting_one_result_fails_that_case(small_golden, tmp_path):
    def drop_grad(meta):
        entries = json.loads(meta["cases"])
        for e in entries:
            e["outputs"].pop("grad/weight", None)
        meta["cases"] = json.dumps(entries)

    p = _rewrite(small_golden, tmp_path / "partial.safetensors", drop_grad)
    r = next(r for r in parity.check(p, backend="cpu").results if r.id == "tiny.rms_norm.fp32")
    assert r.status == "FAIL" and "no reference for grad/weight" in r.message


def _set(key, value):
    return lambda meta: meta.__setitem__(key, value)


def _case_field(field, value):
    def edit(meta):
        entries = json.loads(meta["cases"])
        if value is _DELETE:
            del entries[0][field]
        else:
            entries[0][field] = value
        meta["cases"] = json.dumps(entries)

    return edit


_DELETE = object()
_CRAFTED = {
    "cases not JSON": (_set("cases", "{not json"), "'cases' is not JSON"),
    "cases a dict": (_set("cases", "{}"), "'cases' is a dict, expected a list"),
    "case an int": (_set("cases", "[1]"), "case #0 is a int, expected a dict"),
    "no cases": (lambda m: m.pop("cases"), "no 'cases' field"),
    "outputs missing": (_case_field("outputs", _DELETE), "field 'outputs' is missing"),
    "outputs a list": (_case_field("outputs", ["out/out"]), "field 'outputs' is missing or not a dict"),
    "shape not sizes": (_case_field("inputs", {"x": "abc"}), "inputs 'x' has shape 'abc'"),
    "unknown dtype": (_case_field("dtype", "fp8"), "unknown dtype 'fp8'"),
    "unknown case": (_case_field("case", "conv"), "unknown case 'conv'"),
    "unknown shape set": (_case_field("shape_set", "huge"), "unknown shape set 'huge'"),
    "id mismatch": (_case_field("id", "tiny.attention.fp16"), "id does not match"),
    "id not a string": (_case_field("id", 7), "field 'id' is missing or not a str"),
    "bad output kind": (_case_field("outputs", {"weird": [1]}), "output 'weird' is not out/"),
    "versions a list": (_set("versions", "[]"), "'versions' is a list, expected a dict"),
    "shape sets a list": (_set("shape_sets", "[]"), "'shape_sets' is a list"),
    "seed not a number": (_set("seed", "x"), "seed 'x' is not an integer"),
    "no checksums": (lambda m: m.pop("checksums"), "no 'checksums' field"),
    "checksum not sha256": (lambda m: m.__setitem__("checksums", json.dumps({"a": 1})), "not a sha256"),
    "no sdpa": (lambda m: m.pop("sdpa"), "no 'sdpa' field"),
}


@pytest.mark.parametrize("what", list(_CRAFTED))
def test_crafted_metadata_gives_one_clear_error(small_golden, tmp_path, capsys, what):
    edit, message = _CRAFTED[what]
    p = _rewrite(small_golden, tmp_path / "crafted.safetensors", edit)
    with pytest.raises(GoldenError) as exc:
        parity.check(p, backend="cpu")
    assert "damaged metadata" in str(exc.value) and message in str(exc.value), str(exc.value)
    assert main(["parity", "check", str(p), "--backend", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "damaged metadata" in err and "Traceback" not in err


def test_tensor_without_checksum_is_corruption(small_golden, tmp_path):
    def forget(meta):
        sums = json.loads(meta["checksums"])
        sums.pop("tiny.attention.fp32/in/k")
        meta["checksums"] = json.dumps(sums)

    p = _rewrite(small_golden, tmp_path / "nosum.safetensors", forget)
    with pytest.raises(parity.GoldenCorrupted, match="tensor tiny.attention.fp32/in/k has no recorded checksum"):
        parity.load_golden(p)


def test_old_format_golden_is_refused_with_the_fix(small_golden, tmp_path):
    p = _rewrite(small_golden, tmp_path / "v1.safetensors", _set("format", "flux-npu-parity/1"))
    with pytest.raises(GoldenError, match="golden format 'flux-npu-parity/1'.*re-record it"):
        parity.load_golden(p)


# -- SDPA policy (issue 10 item 3) ---------------------------------------------------------------


def test_cuda_parity_runs_with_cudnn_sdpa_disabled():
    """The policy parity applies on cuda: cuDNN SDPA off, flash / efficient / math on; elsewhere
    nothing changes. (Entered on CPU: sdpa_kernel only flips torch's global SDPA flags.)"""
    from flux_npu.backends import get_backend

    cuda = dataclasses.replace(cpu_backend.BACKEND, name="cuda_like", device_type="cuda")
    make, meta = parity.suite.sdpa_policy(cuda)
    assert meta == {"device_type": "cuda", "allowed": ["flash", "efficient", "math"]}
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with make():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    make, meta = parity.suite.sdpa_policy(cuda, allow_cudnn=True)
    assert meta["allowed"] == "default"
    make, meta = parity.suite.sdpa_policy(get_backend("cpu"))
    assert meta == {"device_type": "cpu", "allowed": "default"}
