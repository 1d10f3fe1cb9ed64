"""The environment report behind `flux-npu info`: which backends exist and why each is or is not
usable, library versions, each backend's capabilities, and, per op and Flux preset shape, which
kernel would serve it and why others decline (computed on meta tensors: nothing is allocated)."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from . import backends as _backends
from .ops import registry
from .utils.table import format_table
from .utils.versions import versions

SHAPES = {
    # (batch, heads, image+text tokens at 1024 px with 512 T5 tokens, head dim)
    "flux-dev": dict(B=1, H=24, S=4096 + 512, D=128, hidden=3072, axes=(16, 56, 56)),
    "flux-mini": dict(B=1, H=24, S=1024 + 512, D=128, hidden=3072, axes=(16, 56, 56)),
    "tiny": dict(B=1, H=2, S=64 + 8, D=16, hidden=32, axes=(4, 6, 6)),
}


def sample_inputs(op: str, shape: dict, dtype=torch.bfloat16, device="meta"):
    """Representative arguments of `op` for a Flux shape (as the patches call it)."""
    B, H, S, D, hidden = shape["B"], shape["H"], shape["S"], shape["D"], shape["hidden"]

    def t(*s, dt=dtype):
        return torch.empty(*s, dtype=dt, device=device)

    if op == "attention":
        q = t(B, S, H, D)
        return (q, t(B, S, H, D), t(B, S, H, D), None, None, "BSHD")
    if op == "apply_rope":
        return (t(B, S, H, D), (t(S, D, dt=torch.float32), t(S, D, dt=torch.float32)), 1)
    if op == "rms_norm":
        return (t(B, S, H, D), t(D), 1e-6, None)
    if op == "layer_norm_modulate":
        return (t(B, S, hidden), t(B, 1, hidden), t(B, 1, hidden), 1e-6)
    if op == "rope_freqs":
        return (t(S, dt=torch.float32), shape["axes"][-1], 10000.0, "cos_sin")
    if op == "gated_residual":
        return (t(B, S, hidden), t(B, 1, hidden), t(B, S, hidden))
    if op == "qk_norm_rope":
        cs = (t(S, D, dt=torch.float32), t(S, D, dt=torch.float32))
        return (t(B, S, H, D), t(B, S, H, D), t(D), t(D), cs, 1e-6, 1)
    if op == "adaln_residual":
        m = t(B, 1, hidden)
        return (t(B, S, hidden), m, t(B, S, hidden), m, m, 1e-6)
    raise ValueError(f"no sample inputs for op {op!r}: add them to flux_npu.report.sample_inputs")


def op_routing(backend, dtype=torch.bfloat16) -> List[tuple]:
    """Rows (op, preset, kernel or 'reference', reasons) for the backend at Flux shapes."""
    meta_backend = backend.with_device_type("meta")
    rows = []
    for op in registry.OPS:
        for preset, shape in SHAPES.items():
            try:
                args = sample_inputs(op, shape, dtype)
                name, reasons = registry.explain(op, meta_backend, *args)
            except Exception as exc:  # a kernel's check must not break the report
                name, reasons = None, [f"check failed: {type(exc).__name__}: {exc}"]
            rows.append((op, preset, name or "reference", "; ".join(reasons)))
    return rows


def collect(backend: Optional[str] = None, patches: bool = False) -> Dict:
    data = {"versions": versions(), "backends": [], "selection": None}
    for b in _backends.registered_backends():
        reason = b.unavailable_reason()
        entry = {
            "name": b.name,
            "available": reason is None,
            "reason": reason,
            "device_type": b.device_type,
            "dist_backend": b.dist_backend,
            "autocast": b.autocast_device_type,
            "float64": b.supports_float64,
            "dtypes": sorted(str(d).replace("torch.", "") for d in b.dtypes),
            "description": b.description,
        }
        try:
            entry["fused_ops"] = registry.fused_ops(b)
        except Exception as exc:
            entry["fused_ops"] = [f"error: {exc}"]
        rows_fn = b.option("capability_rows")
        if rows_fn is not None:
            try:
                entry["capabilities"] = [list(r) for r in rows_fn()]
            except Exception as exc:
                entry["capabilities"] = [["error", f"{type(exc).__name__}: {exc}"]]
        if reason is None:
            try:
                entry["device_name"] = b.utils.device_name()
            except Exception as exc:
                entry["device_name"] = f"unknown ({exc})"
        if backend is None or backend == b.name:
            entry["routing"] = op_routing(b)
        data["backends"].append(entry)
    try:
        chosen = _backends.get_backend(None)
        data["selection"] = dict(_backends.selection_report(), backend=chosen.name)
    except _backends.BackendError as exc:
        data["selection"] = {"error": str(exc)}
    if patches:
        data["patches"] = dry_run_patches()
        data["patch_runtime"] = patch_runtime()
    return data


def dry_run_patches() -> List[dict]:
    """What patch() would do here: apply it, read the report, undo it."""
    from .patches import patch

    handle = patch()
    try:
        return [r.as_dict() for r in handle.report()]
    finally:
        handle.undo()


def patch_runtime() -> Dict[str, list]:
    """What patched code did so far in this process: run-time hand-backs to stock code (and kernel
    declines) per op and reason, and which implementation served calls that have a choice (e.g.
    diffusers attention: ops.attention or the user's dispatch_attention_fn backend). Empty in a
    fresh `flux-npu info`; useful from a script (`flux_npu.report.collect(patches=True)`)."""
    from .ops import dispatch_stats
    from .patches import routes

    fb = dispatch_stats()["fallback"]
    return {
        "handbacks": [{"op": op, "backend": b, "reason": r, "calls": n} for (op, b, r), n in sorted(fb.items())],
        "routes": [{"call": w, "served_by": r, "calls": n} for (w, r), n in sorted(routes().items())],
    }


def render(data: Dict) -> str:
    out = ["flux-npu environment", ""]
    out.append(format_table(("package", "version"), sorted(data["versions"].items())))
    out.append("")
    rows = []
    for b in data["backends"]:
        rows.append((
            b["name"],
            "yes" if b["available"] else "no",
            b.get("device_name") or b["reason"],
            b["dist_backend"],
            b["autocast"],
            "yes" if b["float64"] else "no",
            ",".join(d.replace("float", "f").replace("bf", "bf") for d in b["dtypes"]),
            ",".join(b["fused_ops"]),
        ))
    heads = ("backend", "avail", "device / reason", "dist", "autocast", "fp64", "dtypes", "fused ops")
    out.append(format_table(heads, rows))
    sel = data.get("selection") or {}
    out.append("")
    if "error" in sel:
        out.append(f"selected: none ({sel['error']})")
    else:
        out.append(f"selected: {sel.get('backend')} ({sel.get('how')})")
    for b in data["backends"]:
        if b.get("capabilities"):
            out.append("")
            out.append(f"{b['name']} capabilities")
            out.append(format_table(("capability", "value"), b["capabilities"]))
    for b in data["backends"]:
        if "routing" not in b:
            continue
        out.append("")
        out.append(f"op routing on backend {b['name']} (bfloat16, Flux shapes; 'reference' = plain-torch fallback)")
        out.append(format_table(("op", "shape", "kernel", "why others decline"), b["routing"]))
    if "patches" in data:
        out.append("")
        out.append("what patch() would do here")
        out.append(format_table(("target", "symbol", "status", "reason"),
                                [(r["target"], r["symbol"], r["status"], r["reason"]) for r in data["patches"]]))
        rt = data.get("patch_runtime") or {}
        if rt.get("handbacks"):
            out.append("")
            out.append("run-time hand-backs to stock code / reference so far")
            out.append(format_table(("op", "backend", "reason", "calls"),
                                    [(h["op"], h["backend"], h["reason"], str(h["calls"])) for h in rt["handbacks"]]))
        if rt.get("routes"):
            out.append("")
            out.append("which implementation served patched calls so far")
            out.append(format_table(("call", "served by", "calls"),
                                    [(r["call"], r["served_by"], str(r["calls"])) for r in rt["routes"]]))
    return "\n".join(out)
