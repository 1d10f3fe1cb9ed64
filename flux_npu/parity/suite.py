"""Record a parity golden on one backend, check another backend against it.

A golden is one safetensors file (never pickle). Tensor names are `<case id>/<kind>/<name>` with
kind in: `in` (inputs and cotangents, drawn on the CPU from the seed), `out` (outputs), `grad`
(gradients of the inputs), `param` (a small block's parameters), `pgrad` (parameter gradients).
The string metadata holds the format tag, the recording backend and device, library versions,
the seed, the shape-set definitions, the case list (JSON), a sha256 of every tensor's raw bytes
(`checksums`, JSON) and the SDPA backends attention was allowed to use (`sdpa`, JSON).

`check` reads a golden, verifies it (readable, ours, same format, metadata well-formed, every
listed tensor present and matching its checksum, shapes equal to what this version's catalogue
defines), recomputes every case on the chosen backend from the golden's own inputs, through
`flux_npu.ops` / `flux_npu.patch(model=block)`, and compares each output and gradient with the
golden: relative error ||out - golden|| / ||golden|| against `flux_npu.testing.tolerance(dtype)`
(times `BLOCK_FACTOR` for whole blocks). Format /3 also stores (kind `ref`) a float64 reference of
each bfloat16/float16 case's outputs and gradients; `check` then reports Ascend's rule per case
next to that (see RATIO_LIMIT).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..backends import Backend, get_backend
from ..testing import max_abs_err, rel_err, tolerance
from ..utils.versions import versions
from . import cases as C
from . import golden as G
from .golden import FORMAT, Golden, GoldenError, load_golden
from .rule import LOW_PRECISION, MAX_REL_RATIO_LIMIT, RATIO_LIMIT, rate, reference64

# -- where the shipped goldens are --------------------------------------------------------------


def golden_dir() -> str:
    """The directory of the shipped goldens: $FLUX_NPU_GOLDEN_DIR, else the repository's
    `tests/golden` (a checkout: where `parity record` writes them), else the package data of an
    installed wheel (`flux_npu/data/golden`, links to tests/golden in the repository)."""
    import glob

    env = os.environ.get("FLUX_NPU_GOLDEN_DIR")
    if env:
        if not os.path.isdir(env):
            raise GoldenError(f"FLUX_NPU_GOLDEN_DIR={env!r} is not a directory; unset it or point it at the goldens")
        return env
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for d in (os.path.join(os.path.dirname(pkg), "tests", "golden"), os.path.join(pkg, "data", "golden")):
        if glob.glob(os.path.join(d, G.GOLDEN_FILES)):
            return d
    raise GoldenError("no shipped parity golden found (looked in tests/golden and flux_npu/data/golden); "
                      "reinstall flux-npu from a wheel that includes its goldens, or set FLUX_NPU_GOLDEN_DIR")


def shipped_goldens() -> list[str]:
    """Paths of every shipped golden (`parity_<backend>.safetensors`), sorted."""
    import glob

    return sorted(glob.glob(os.path.join(golden_dir(), G.GOLDEN_FILES)))


def golden_path(name: str = "parity_cpu.safetensors") -> str:
    """The path of one shipped golden, e.g. golden_path() for the CPU one."""
    path = os.path.join(golden_dir(), name)
    if not os.path.exists(path):
        have = ", ".join(os.path.basename(p) for p in shipped_goldens())
        raise GoldenError(f"no shipped golden {name!r}; shipped: {have}")
    return path


# -- numerics policy --------------------------------------------------------------------------

# torch 2.11's cuDNN SDPA backward returns wrong gradients on H100 (sm_90): on one lent H100
# (2026-11-25) the plain-torch reference itself failed tiny.single_block's bf16/fp16 q/k/v-path
# gradients (rel. err 1.2-2.3) with cuDNN SDPA allowed and passed with it off (see PyTorch issue
# 196678, NaN grad_q from cuDNN SDPA backward since 2.11). A golden must not depend on which SDPA
# backend torch picks, so on CUDA the suite allows only these; the choice is written into the
# golden's metadata.
PARITY_SDPA = ("flash", "efficient", "math")


def sdpa_policy(backend: Backend, allow_cudnn: bool = False):
    """(factory of a fresh context manager, metadata dict) restricting SDPA for parity on
    `backend`'s device; elsewhere (no cuDNN SDPA) the context does nothing."""
    if backend.device_type != "cuda" or allow_cudnn:
        return contextlib.nullcontext, {"device_type": backend.device_type, "allowed": "default"}
    from torch.nn.attention import sdpa_kernel

    from ..backends.cuda import sdpa_enums

    chosen = sdpa_enums(PARITY_SDPA)
    return (lambda: sdpa_kernel(chosen)), {"device_type": backend.device_type, "allowed": list(PARITY_SDPA)}


# -- computing one case -----------------------------------------------------------------------


@dataclass
class Computed:
    outputs: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    param_grads: dict[str, torch.Tensor]


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def compute(spec: C.CaseSpec, inputs: dict[str, torch.Tensor], backend: Backend, *, module=None,
            backward: bool = True, stock: bool = False, param_grad_filter=None) -> Computed:
    """Run one case on `backend` from CPU `inputs`; returns CPU tensors.

    module: the block (CPU, case dtype) for block cases. stock: compute with the plain-torch
    references / unpatched diffusers instead of the backend's ops (the baseline)."""
    device = backend.device()
    grad_names = set(spec.case.grads) if backward else set()
    t = {}
    for k, v in inputs.items():
        x = v.to(device)
        if k in grad_names:
            x.requires_grad_(True)
        t[k] = x
    if module is not None:
        module = module.to(device)
        module.requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        outs = spec.case.run(t, backend, module, stock)
    grads, pgrads = {}, {}
    if backward:
        pairs = [(outs[n], t[f"d_{n}"]) for n in outs if f"d_{n}" in t]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [c for _, c in pairs])
        for n in spec.case.grads:
            if t[n].grad is not None:  # a missing gradient fails the comparison ("not produced")
                grads[n] = _cpu(t[n].grad)
        if module is not None:
            for n, p in module.named_parameters():
                if p.grad is not None and (param_grad_filter is None or param_grad_filter(n, p)):
                    pgrads[n] = _cpu(p.grad)
    return Computed({n: _cpu(o) for n, o in outs.items()}, grads, pgrads)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _param_grad_filter(module):
    if _numel(module) <= C.PARAM_STORE_LIMIT:
        return None
    return lambda n, p: p.numel() <= C.PARAM_GRAD_LIMIT


def _progress(items, desc, show):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return items
    return tqdm(items, desc=desc, unit="case", disable=not show, file=sys.stderr, leave=False)


# -- record -----------------------------------------------------------------------------------


def record(path, backend=None, shape_sets="tiny,width", dtypes="fp32,bf16,fp16", cases=None, seed: int = 0,
           backward: bool = True, stock: bool = False, progress: bool = False, allow_cudnn: bool = False,
           references: bool = True) -> dict:
    """Compute every selected case on `backend` and write the golden to `path`.
    Returns the metadata written. allow_cudnn: let SDPA use cuDNN attention on CUDA (off by
    default: see PARITY_SDPA). references: store, for each bfloat16/float16 case, the float64
    reference of every output and gradient (computed on the CPU, stored as float32: 6e-8 relative,
    four orders below the errors it measures); False writes the previous format (/2)."""
    from safetensors.torch import save

    from ..utils.output import output_kind, write_output

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    output_kind(path)  # a directory or a socket fails before the cases run
    b = get_backend(backend)
    sdpa_ctx, sdpa_meta = sdpa_policy(b, allow_cudnn)
    specs = C.select(shape_sets, dtypes, cases)
    if not specs:
        raise ValueError("no parity case matches the selection (shape sets / dtypes / cases)")
    unsupported = sorted({C.DTYPE_NAMES[s.dtype] for s in specs if s.dtype not in b.dtypes})
    if unsupported:
        raise ValueError(f"backend {b.name} does not compute in {', '.join(unsupported)}; drop it from --dtypes")
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for spec in _progress(specs, f"parity record ({b.name})", progress):
        inputs = C.make_inputs(spec, seed)
        module = C.build_module(spec, seed) if spec.case.build else None
        entry = {
            "id": spec.id, "shape_set": spec.shapes.name, "case": spec.case.name, "dtype": C.DTYPE_NAMES[spec.dtype],
            "factor": spec.case.factor, "inputs": {k: list(v.shape) for k, v in inputs.items()},
        }
        if module is not None:
            stored = _numel(module) <= C.PARAM_STORE_LIMIT
            entry["params"] = "stored" if stored else "seed"
            entry["checksum"] = C.param_checksum(module)
            if stored:
                for n, p in module.state_dict().items():
                    tensors[f"{spec.id}/param/{n}"] = _cpu(p)
        with sdpa_ctx():
            res = compute(spec, inputs, b, module=module, backward=backward, stock=stock,
                          param_grad_filter=_param_grad_filter(module) if module is not None else None)
        missing = [n for n in spec.case.grads if backward and n not in res.grads]
        if missing:
            raise RuntimeError(f"{spec.id}: no gradient reached input(s) {missing} on backend {b.name}; "
                               f"cannot record a golden from a backend that drops gradients")
        for n, v in inputs.items():
            tensors[f"{spec.id}/in/{n}"] = v
        for kind, group in (("out", res.outputs), ("grad", res.grads), ("pgrad", res.param_grads)):
            for n, v in group.items():
                tensors[f"{spec.id}/{kind}/{n}"] = v
        groups = (("out", res.outputs), ("grad", res.grads), ("pgrad", res.param_grads))
        entry["outputs"] = {f"{kind}/{n}": list(v.shape) for kind, group in groups for n, v in group.items()}
        if references and spec.dtype in LOW_PRECISION:
            ref = reference64(spec, inputs, module, backward,
                              _param_grad_filter(module) if module is not None else None)
            refs = (("out", ref.outputs), ("grad", ref.grads), ("pgrad", ref.param_grads))
            entry["references"] = []
            for kind, group in refs:
                for n, v in group.items():
                    if f"{kind}/{n}" in entry["outputs"]:
                        tensors[f"{spec.id}/ref/{kind}/{n}"] = v.float().contiguous()
                        entry["references"].append(f"{kind}/{n}")
        entries.append(entry)
    meta = {
        "format": FORMAT if references else G.READ_FORMATS[0],
        "backend": b.name,
        "device": b.utils.device_name(),
        "stock": "1" if stock else "0",
        "backward": "1" if backward else "0",
        "seed": str(seed),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": json.dumps(versions()),
        "shape_sets": json.dumps({s.name: dataclasses.asdict(s) for s in C.parse_shape_sets(shape_sets)}),
        "cases": json.dumps(entries),
        "sdpa": json.dumps(sdpa_meta),
        "checksums": json.dumps({k: G.tensor_sha256(v) for k, v in sorted(tensors.items())}),
    }
    meta[G.META_SUM] = G.meta_sha256(meta)  # the metadata itself is covered too
    # utils.output: a regular file atomically (never a half-written golden under the final name, mode
    # from the umask: a golden is meant to be shared), a device or FIFO in place
    write_output(path, save(tensors, metadata=meta))
    return meta


# -- check ------------------------------------------------------------------------------------


@dataclass
class TensorResult:
    name: str
    max_abs: float
    rel: float
    tol: float
    # Ascend's rule, against the golden's float64 reference (None: the golden has none)
    ref_rel: float | None = None  # this device's rel. error vs float64
    golden_ref_rel: float | None = None  # the recording device's rel. error vs float64
    ratio: float | None = None  # ref_rel / golden_ref_rel (limit RATIO_LIMIT)
    max_rel: float | None = None  # this device's max elementwise rel. error vs float64 (`max_rel_err`)
    golden_max_rel: float | None = None
    max_rel_ratio: float | None = None  # max_rel / max(golden_max_rel, MINIMUM_ERROR) (limit MAX_REL_RATIO_LIMIT)

    @property
    def passed(self) -> bool:
        return self.rel <= self.tol  # inf and NaN never pass

    @property
    def rule(self) -> str | None:
        """'pass' / 'FAIL' by Ascend's 2x (10x max-rel) rule; None without a float64 reference."""
        if self.ratio is None:
            return None
        ok = self.ratio <= RATIO_LIMIT and self.max_rel_ratio <= MAX_REL_RATIO_LIMIT
        return "pass" if ok else "FAIL"


@dataclass
class CaseResult:
    id: str
    shape_set: str
    case: str
    dtype: str
    status: str  # pass / FAIL / skip / error
    tensors: list[TensorResult] = field(default_factory=list)
    message: str = ""

    @property
    def rule(self) -> str | None:
        """The case's verdict by Ascend's 2x rule: 'pass', 'FAIL' (a tensor breaks it) or None
        (no float64 reference: a float32 case, or a golden of format /2)."""
        rules = [t.rule for t in self.tensors if t.rule is not None]
        if not rules:
            return None
        return "FAIL" if "FAIL" in rules else "pass"

    @property
    def rule_message(self) -> str:
        if (w := self.worst_ratio) is None:
            return ""
        return (f"{w.name}: error vs float64 {w.ref_rel:.2e} = {w.ratio:.2f}x the golden device's "
                f"{w.golden_ref_rel:.2e} (limit {RATIO_LIMIT:g}x); max rel. error {w.max_rel:.2e} = "
                f"{w.max_rel_ratio:.1f}x (limit {MAX_REL_RATIO_LIMIT:g}x)")

    @property
    def worst_ratio(self) -> TensorResult | None:
        rated = [t for t in self.tensors if t.ratio is not None]
        if not rated:
            return None
        return max(rated, key=lambda t: max(t.ratio / RATIO_LIMIT, t.max_rel_ratio / MAX_REL_RATIO_LIMIT))

    @property
    def worst(self) -> TensorResult | None:
        if not self.tensors:
            return None
        return max(self.tensors,
                   key=lambda r: (r.rel / r.tol if r.tol else math.inf) if not math.isnan(r.rel) else math.inf)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for t, td in zip(self.tensors, d["tensors"], strict=True):
            td["rule"] = t.rule
        w = self.worst
        d["worst"] = dataclasses.asdict(w) if w else None
        wr = self.worst_ratio
        d["rule"] = self.rule
        d["worst_ratio"] = dict(dataclasses.asdict(wr), rule=wr.rule) if wr else None
        return d


@dataclass
class CheckReport:
    golden: str
    golden_meta: dict
    backend: str
    device: str
    stock: bool
    results: list[CaseResult]

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status in ("FAIL", "error")]

    @property
    def ok(self) -> bool:
        return not self.failed and any(r.status == "pass" for r in self.results)

    @property
    def rule_failed(self) -> list[CaseResult]:
        """Cases that break Ascend's 2x (10x max-rel) rule against the golden's float64 reference
        (reported next to `failed`, today's fixed-tolerance check)."""
        return [r for r in self.results if r.rule == "FAIL"]

    def table(self, all_tensors: bool = False) -> str:
        from ..utils.table import format_table

        rows = []

        def rule_cells(t):
            if t is None or t.ratio is None:
                return ["", "", "n/a"]
            return [f"{t.ref_rel:.2e} / {t.golden_ref_rel:.2e}", f"{t.ratio:.2f} ({t.max_rel_ratio:.1f})",
                    t.rule]

        for r in self.results:
            items = r.tensors if all_tensors else ([r.worst] if r.worst else [])
            if not items:
                rows.append([r.id, r.dtype, "", "", "", "", r.status + (f": {r.message}" if r.message else ""),
                             "", "", ""])
            for t in items:
                rated = t if all_tensors else r.worst_ratio
                rows.append([r.id, r.dtype, t.name, f"{t.max_abs:.3e}", f"{t.rel:.3e}", f"{t.tol:.1e}",
                             ("pass" if t.passed else "FAIL") if all_tensors else r.status, *rule_cells(rated)])
        head = ["case", "dtype", "worst tensor" if not all_tensors else "tensor", "max abs err", "rel err",
                "tolerance", "result", "vs f64: this / golden", "ratio (max-rel)", "2x rule"]
        n_pass = sum(r.status == "pass" for r in self.results)
        rated = [r for r in self.results if r.rule is not None]
        rule = (f"; Ascend's rule (error vs float64 <= {RATIO_LIMIT:g}x the golden device's, max-rel "
                f"<= {MAX_REL_RATIO_LIMIT:g}x): {sum(r.rule == 'pass' for r in rated)}/{len(rated)} "
                "low-precision cases pass" if rated else
                "; Ascend's 2x rule: n/a (no float64 reference in this golden: format "
                f"{self.golden_meta.get('format')}, or no bf16/fp16 case)")
        summary = (f"{n_pass}/{len(self.results)} cases pass on backend {self.backend} ({self.device})"
                   f"{' [stock references]' if self.stock else ''}; golden from {self.golden_meta.get('backend')} "
                   f"({self.golden_meta.get('device')}){rule}")
        return format_table(head, rows, max_width=60) + "\n" + summary

    def as_dict(self) -> dict:
        return {"golden": self.golden, "golden_meta": {k: v for k, v in self.golden_meta.items() if k != "cases"},
                "backend": self.backend, "device": self.device, "stock": self.stock, "ok": self.ok,
                "rule_limits": {"ratio": RATIO_LIMIT, "max_rel_ratio": MAX_REL_RATIO_LIMIT},
                "rule_failed": [r.id for r in self.rule_failed],
                "results": [r.as_dict() for r in self.results]}


def check(path, backend=None, cases: Sequence[str] | None = None, dtypes=None, shape_sets=None,
          stock: bool = False, progress: bool = False, allow_cudnn: bool = False) -> CheckReport:
    """Recompute the golden's cases on `backend` and compare. Never raises for a numeric failure
    (see `CheckReport.ok`); raises GoldenError for a bad file (GoldenCorrupted when its bytes
    changed after recording)."""
    golden = load_golden(path)
    b = get_backend(backend)
    sdpa_ctx, _ = sdpa_policy(b, allow_cudnn)
    want_dtypes = set(C.parse_dtypes(dtypes)) if dtypes else None
    want_sets = {s.name for s in C.parse_shape_sets(shape_sets)} if shape_sets else None
    if cases:
        unknown = [c for c in cases if c not in C.CASES]
        if unknown:
            raise ValueError(f"unknown parity case(s) {unknown}; cases: {', '.join(C.CASES)}")
    entries = [e for e in golden.entries
               if (not cases or e["case"] in cases)
               and (want_dtypes is None or C.DTYPES[e["dtype"]] in want_dtypes)
               and (want_sets is None or e["shape_set"] in want_sets)]
    if not entries:
        raise ValueError(f"no case of {path} matches the selection; it holds: "
                         f"{', '.join(sorted({e['case'] for e in golden.entries}))}")
    backward = golden.meta.get("backward", "1") == "1"
    results = []
    for e in _progress(entries, f"parity check ({b.name})", progress):
        with sdpa_ctx():
            results.append(_check_one(golden, e, b, backward, stock))
    return CheckReport(os.fspath(path), golden.meta, b.name, b.utils.device_name(), stock, results)


def _check_one(golden: Golden, e: dict, b: Backend, backward: bool, stock: bool) -> CaseResult:
    spec = C.CaseSpec(C.SHAPE_SETS[e["shape_set"]], C.CASES[e["case"]], C.DTYPES[e["dtype"]])
    res = CaseResult(e["id"], e["shape_set"], e["case"], e["dtype"], "pass")
    if spec.dtype not in b.dtypes:
        res.status, res.message = "skip", f"backend {b.name} does not compute in {e['dtype']}"
        return res
    inputs = golden.group(e["id"], "in")
    expected_shapes = {k: list(v.shape) for k, v in C.make_inputs(spec, golden.seed).items()}
    got_shapes = {k: list(v.shape) for k, v in inputs.items()}
    if expected_shapes != got_shapes:
        raise GoldenError(f"{golden.path}: case {e['id']} holds inputs {got_shapes} but this version's catalogue "
                          f"defines {expected_shapes}; the golden comes from other shapes: {G._rerecord(golden.path)}")
    module = None
    if spec.case.build:
        module = C.build_module(spec, golden.seed)
        params = golden.group(e["id"], "param")
        if params:
            try:
                module.load_state_dict(params, strict=True)
            except RuntimeError as exc:
                raise GoldenError(f"{golden.path}: case {e['id']}: stored block parameters do not fit the block "
                                  f"({str(exc).splitlines()[0]}); {G._rerecord(golden.path)}") from None
        elif C.param_checksum(module) != e.get("checksum"):
            raise GoldenError(f"{golden.path}: case {e['id']}: the block rebuilt from seed {golden.seed} differs from "
                              f"the recorded one (checksum {C.param_checksum(module)} vs {e.get('checksum')}): "
                              f"another torch version initialises differently; {G._rerecord(golden.path)}")
    try:
        got = compute(spec, inputs, b, module=module, backward=backward, stock=stock,
                      param_grad_filter=_param_grad_filter(module) if module is not None else None)
    except Exception as exc:  # a crashing kernel is a failed case, reported with the others
        res.status, res.message = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return res
    tol = tolerance(spec.dtype, spec.case.factor)
    computed = {"out": got.outputs, "grad": got.grads, "pgrad": got.param_grads}
    for key in e.get("outputs", {}):
        kind, name = key.split("/", 1)
        ref = golden.tensor(f"{e['id']}/{key}")
        out = computed[kind].get(name)
        if out is None:
            res.tensors.append(TensorResult(key, math.inf, math.inf, tol))
            res.message = f"{key} was not produced"
            continue
        if out.shape != ref.shape:
            res.tensors.append(TensorResult(key, math.inf, math.inf, tol))
            res.message = f"{key}: shape {tuple(out.shape)} vs golden {tuple(ref.shape)}"
            continue
        tr = TensorResult(key, max_abs_err(out, ref), rel_err(out, ref), tol)
        if key in e.get("references", ()):  # Ascend's rule against the golden's float64 reference
            rate(tr, out, ref, golden.tensor(f"{e['id']}/ref/{key}").double(), spec.dtype)
        res.tensors.append(tr)
    produced = {f"{kind}/{n}" for kind, group in computed.items() for n in group}
    unlisted = sorted(produced - set(e["outputs"]))
    if not res.tensors:
        res.status, res.message = "FAIL", "nothing compared: the golden lists no outputs for this case"
    elif unlisted:  # a golden that omits a result would let that result go unchecked
        res.status, res.message = "FAIL", f"the golden lists no reference for {', '.join(unlisted[:4])}"
    elif not all(t.passed for t in res.tensors):
        res.status = "FAIL"
    return res
