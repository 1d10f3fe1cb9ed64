"""A parity golden is read once into memory and checked there (bytes changed on disk after the
check are never used), and its metadata is covered by a checksum of its own (issue 18 item 9)."""

import json

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from flux_npu import parity
from flux_npu.parity.golden import META_SUM, GoldenCorrupted


@pytest.fixture
def golden(tmp_path):
    path = tmp_path / "g.safetensors"
    parity.record(str(path), backend="cpu", shape_sets="tiny", dtypes="fp32", cases=["rms_norm"])
    return path


def test_bytes_changed_after_the_check_are_not_used(golden):
    g = parity.load_golden(str(golden))
    before = {k: g.tensor(k).clone() for k in g._keys}
    raw = bytearray(golden.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8 + n:] = bytes([0x7F]) * (len(raw) - 8 - n)  # every tensor's bytes, overwritten in place on disk
    with open(golden, "r+b") as f:
        f.write(raw)
    for k, t in before.items():
        assert (g.tensor(k) == t).all(), k  # what was checked is what is used
    with pytest.raises(GoldenCorrupted):  # a fresh load sees the change
        parity.load_golden(str(golden))


def test_edited_metadata_is_refused(golden, tmp_path):
    with safe_open(str(golden), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (a safe_open handle, not a dict)
    assert META_SUM in meta
    meta["backward"] = "0"  # claims no gradients, so dropped gradient entries would go unchecked
    cases = json.loads(meta["cases"])
    for e in cases:
        for k in [k for k in e["outputs"] if k.startswith("grad/")]:
            del e["outputs"][k]
            tensors.pop(f"{e['id']}/{k}", None)
    meta["cases"] = json.dumps(cases)
    meta["checksums"] = json.dumps({k: v for k, v in json.loads(meta["checksums"]).items() if k in tensors})
    bad = tmp_path / "edited.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(GoldenCorrupted, match="metadata"):
        parity.load_golden(str(bad))
    assert "metadata checksum verified" in parity.load_golden(str(golden)).describe()
