"""Reading a parity golden: the file format tag, its errors, and `load_golden`, which verifies a
file (readable, ours, same format, metadata well-formed, every listed tensor present and matching
its checksum, shapes equal to what this version's catalogue defines) before anything is compared."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from . import cases as C

# /2: per-tensor sha256 checksums and the SDPA policy in the metadata (goldens of /1 had neither)
# /3: a float64 reference (`ref/`) of every output and gradient of each bfloat16/float16 case, so
#     a check can apply Ascend's rule (this device's error against float64 at most 2x the recording
#     device's; 10x for the maximum relative error). /2 goldens are still read (the rule is n/a).
FORMAT = "flux-npu-parity/3"
READ_FORMATS = ("flux-npu-parity/2", FORMAT)
GOLDEN_FILES = "parity_*.safetensors"


class GoldenError(ValueError):
    """A golden file that is missing, unreadable, not ours, or does not match this catalogue."""


class GoldenCorrupted(GoldenError):
    """A golden whose stored bytes no longer match the checksums written when it was recorded."""


# -- reading a golden -------------------------------------------------------------------------


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes as safetensors stores them (contiguous, native order)."""
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


@dataclass
class Golden:
    path: str
    meta: dict
    entries: list[dict]
    _handle: object = field(repr=False, default=None)

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    def tensor(self, name: str) -> torch.Tensor:
        # the tensors were read into memory once and checked there: the file is not read again
        # (a memory map would serve bytes changed on disk after the check)
        try:
            return self._handle[name]
        except KeyError:
            raise GoldenError(f"{self.path}: no tensor {name!r} in the golden; re-record it") from None

    def group(self, case_id: str, kind: str) -> dict[str, torch.Tensor]:
        prefix = f"{case_id}/{kind}/"
        return {k[len(prefix):]: self.tensor(k) for k in self._keys if k.startswith(prefix)}

    @property
    def _keys(self):
        return self._handle.keys()

    def describe(self) -> str:
        v = json.loads(self.meta.get("versions", "{}"))
        sdpa = json.loads(self.meta.get("sdpa", "{}")).get("allowed", "default")
        meta_note = ("metadata checksum verified" if META_SUM in self.meta
                     else "metadata unchecked: recorded before metadata checksums, re-record to cover it")
        return (f"golden {self.path}: backend {self.meta.get('backend')} on {self.meta.get('device')}, "
                f"recorded {self.meta.get('created')}, torch {v.get('torch')}, diffusers {v.get('diffusers')}, "
                f"seed {self.meta.get('seed')}, {len(self.entries)} case(s), SDPA backends "
                f"{'torch default' if sdpa == 'default' else ','.join(sdpa)}, checksums verified, {meta_note}")


META_SUM = "meta_sha256"


def meta_sha256(meta: dict) -> str:
    """sha256 over every other metadata field (sorted, JSON): `backward=0` with gradient entries
    dropped, or a case removed from the list, is caught like a flipped tensor bit."""
    body = {k: v for k, v in meta.items() if k != META_SUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def _header_metadata(raw: bytes) -> dict:
    """The `__metadata__` of a safetensors file's header (8-byte little-endian length, then JSON)."""
    n = int.from_bytes(raw[:8], "little")
    if n <= 0 or 8 + n > len(raw):
        raise ValueError(f"header length {n} does not fit a {len(raw)}-byte file")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("metadata is not a mapping of strings")
    return meta


def _rerecord(path):
    return f"re-record it with `flux-npu parity record --backend <name> -o {path}`"


def load_golden(path) -> Golden:
    """Open and validate a golden's structure (not yet its numbers)."""
    from safetensors.torch import load as safetensors_load

    path = os.fspath(path)
    if not os.path.exists(path):
        raise GoldenError(f"parity golden {path!r} not found; record one with "
                          f"`flux-npu parity record --backend <name> -o {path}` "
                          f"(the shipped ones: `flux-npu parity list --goldens`)")
    if os.path.getsize(path) < 8:
        raise GoldenError(f"{path}: file is {os.path.getsize(path)} bytes, too short for safetensors (truncated?); "
                          f"{_rerecord(path)}")
    try:
        # one read of the whole file: metadata, tensors and checksums all come from the same bytes
        with open(path, "rb") as f:
            raw = f.read()
        meta = _header_metadata(raw)
        handle = safetensors_load(raw)
        keys = set(handle)
    except Exception as exc:
        raise GoldenError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
                          f"the file is truncated or corrupted: {_rerecord(path)}") from None
    if META_SUM in meta and meta[META_SUM] != meta_sha256(meta):
        raise GoldenCorrupted(f"golden corrupted: its metadata (cases, flags, shapes, checksums) does not match "
                              f"its recorded sha256 ({path}): it was edited after recording; {_rerecord(path)}")
    if meta.get("format") not in READ_FORMATS:
        if "format" not in meta:
            raise GoldenError(f"{path}: a safetensors file but not a flux-npu parity golden (no 'format' metadata); "
                              f"{_rerecord(path)}")
        raise GoldenError(f"{path}: golden format {meta['format']!r}, this flux-npu reads "
                          f"{' and '.join(map(repr, READ_FORMATS))}; {_rerecord(path)}")
    entries, recorded_sets, checksums = _parse_meta(path, meta)
    problems = []
    for name, rec in recorded_sets.items():
        ours = C.SHAPE_SETS.get(name)
        if ours is None:
            problems.append(f"shape set {name!r} is unknown to this version (known: {', '.join(C.SHAPE_SETS)})")
            continue
        mine = json.loads(json.dumps(dataclasses.asdict(ours)))
        if rec != mine:
            diff = {k: (rec.get(k), mine.get(k)) for k in mine if rec.get(k) != mine.get(k)}
            was = ", ".join(f"{k}={a} (now {b})" for k, (a, b) in diff.items())
            problems.append(f"shape set {name!r} was recorded as {was}")
    for e in entries:
        if e["shape_set"] not in recorded_sets:
            problems.append(f"case {e['id']!r}: shape set {e['shape_set']!r} is not among the recorded ones")
        for n in e["inputs"]:
            if f"{e['id']}/in/{n}" not in keys:
                problems.append(f"case {e['id']}: input {n!r} is listed but missing from the file")
        for n in e["outputs"]:
            if f"{e['id']}/{n}" not in keys:
                problems.append(f"case {e['id']}: {n!r} is listed but missing from the file")
        for n in e.get("references", ()):
            if f"{e['id']}/ref/{n}" not in keys:
                problems.append(f"case {e['id']}: float64 reference {n!r} is listed but missing from the file")
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise GoldenError(f"{path} does not match this version's parity catalogue:\n  {shown}\n{_rerecord(path)}")
    _verify_checksums(path, handle, keys, checksums)
    return Golden(path, meta, entries, handle)


def _bad_meta(path, what: str) -> GoldenError:
    return GoldenError(f"{path}: damaged metadata: {what}; {_rerecord(path)}")


def _json_field(path, meta: dict, key: str, kind: type):
    if key not in meta:
        raise _bad_meta(path, f"no {key!r} field")
    try:
        value = json.loads(meta[key])
    except ValueError as exc:
        raise _bad_meta(path, f"{key!r} is not JSON ({exc})") from None
    if not isinstance(value, kind):
        raise _bad_meta(path, f"{key!r} is a {type(value).__name__}, expected a {kind.__name__}")
    return value


def _is_shape(v) -> bool:
    return isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)


def _parse_meta(path, meta: dict):
    """Type-check every metadata field the suite reads, so that a crafted or damaged golden gives
    one GoldenError naming the field instead of a KeyError / AttributeError deep in `check`.
    Returns (entries, shape sets, checksums)."""
    try:
        int(meta.get("seed", ""))
    except ValueError:
        raise _bad_meta(path, f"seed {meta.get('seed')!r} is not an integer") from None
    if meta.get("backward", "1") not in ("0", "1"):
        raise _bad_meta(path, f"backward {meta.get('backward')!r} is not 0 or 1")
    _json_field(path, meta, "versions", dict)
    _json_field(path, meta, "sdpa", dict)
    recorded_sets = _json_field(path, meta, "shape_sets", dict)
    for name, rec in recorded_sets.items():
        if not isinstance(rec, dict):
            raise _bad_meta(path, f"shape set {name!r} is a {type(rec).__name__}, expected a dict")
    checksums = _json_field(path, meta, "checksums", dict)
    for name, digest in checksums.items():
        if not (isinstance(digest, str) and len(digest) == 64):
            raise _bad_meta(path, f"checksum of {name!r} is not a sha256 hex digest")
    entries = _json_field(path, meta, "cases", list)
    seen = set()
    for i, e in enumerate(entries):
        where = f"case #{i}"
        if not isinstance(e, dict):
            raise _bad_meta(path, f"{where} is a {type(e).__name__}, expected a dict")
        for key, kind in (("id", str), ("shape_set", str), ("case", str), ("dtype", str), ("inputs", dict),
                          ("outputs", dict)):
            if not isinstance(e.get(key), kind):
                raise _bad_meta(path, f"{where}: field {key!r} is missing or not a {kind.__name__}")
        where = f"case {e['id']!r}"
        if e["case"] not in C.CASES:
            raise _bad_meta(path, f"{where}: unknown case {e['case']!r} (this version has {', '.join(C.CASES)})")
        if e["dtype"] not in C.DTYPES:
            raise _bad_meta(path, f"{where}: unknown dtype {e['dtype']!r} (known: {', '.join(C.DTYPES)})")
        if e["shape_set"] not in C.SHAPE_SETS:
            raise _bad_meta(path, f"{where}: unknown shape set {e['shape_set']!r} (known: {', '.join(C.SHAPE_SETS)})")
        if e["id"] != f"{e['shape_set']}.{e['case']}.{e['dtype']}":
            raise _bad_meta(path, f"{where}: id does not match its shape set, case and dtype")
        if e["id"] in seen:
            raise _bad_meta(path, f"{where} is listed twice")
        seen.add(e["id"])
        for group in ("inputs", "outputs"):
            for n, shape in e[group].items():
                if not _is_shape(shape):
                    raise _bad_meta(path, f"{where}: {group} {n!r} has shape {shape!r}, not a list of sizes")
        for n in e["outputs"]:
            if n.split("/", 1)[0] not in ("out", "grad", "pgrad") or "/" not in n:
                raise _bad_meta(path, f"{where}: output {n!r} is not out/, grad/ or pgrad/<name>")
        if "checksum" in e and not isinstance(e["checksum"], str):
            raise _bad_meta(path, f"{where}: parameter checksum is not a string")
        refs = e.get("references", [])
        if not isinstance(refs, list) or any(not isinstance(n, str) or n not in e["outputs"] for n in refs):
            raise _bad_meta(path, f"{where}: 'references' must list some of the case's outputs")
    return entries, recorded_sets, checksums


def _verify_checksums(path, handle, keys, checksums: dict) -> None:
    """Every stored tensor must match the sha256 written when it was recorded: a flipped bit is
    a corrupted file, never a backend failure."""
    unlisted = sorted(set(keys) - set(checksums))
    if unlisted:
        raise GoldenCorrupted(f"golden corrupted: tensor {unlisted[0]} has no recorded checksum ({path}; "
                              f"{len(unlisted)} such tensor(s)): the file was altered after recording; "
                              f"{_rerecord(path)}")
    for name in sorted(keys):
        t = handle[name]
        if tensor_sha256(t) != checksums[name]:
            raise GoldenCorrupted(f"golden corrupted: tensor {name} does not match its recorded sha256 ({path}): "
                                  f"the file changed after recording (disk, transfer or edit); fetch it again or "
                                  f"{_rerecord(path)}")
