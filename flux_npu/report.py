"""The environment report behind `flux-npu info`: which backends exist and why each is or is not
usable, library versions, each backend's capabilities, and, per op and Flux preset shape, which
kernel would serve it and why others decline (computed on meta tensors: nothing is allocated)."""

from __future__ import annotations

import torch

from . import backends as _backends
from .ops import catalogue, registry
from .shapes import SHAPES
from .utils.table import format_table
from .utils.versions import versions

# the named Flux shapes (flux_npu.shapes) the routing rows are computed at
INFO_SHAPES = ("flux-dev", "flux-mini", "tiny")


def sample_inputs(op: str, shape, dtype=torch.bfloat16, device="meta"):
    """Representative arguments of `op` for a Flux shape (as the patches call it): the catalogue's."""
    return catalogue.info(op).sample_inputs(SHAPES[shape] if isinstance(shape, str) else shape, dtype, device)


def op_routing(backend, dtype=torch.bfloat16) -> list[tuple]:
    """Rows (op, preset, kernel or 'reference', reasons) for the backend at Flux shapes."""
    meta_backend = backend.with_device_type("meta")
    rows = []
    for op in catalogue.OPS:
        for preset in INFO_SHAPES:
            try:
                args = sample_inputs(op, preset, dtype)
                name, reasons = registry.explain(op, meta_backend, *args)
            except Exception as exc:  # a kernel's check must not break the report
                name, reasons = None, [f"check failed: {type(exc).__name__}: {exc}"]
            rows.append((op, preset, name or "reference", "; ".join(reasons)))
    return rows


def kernel_capability_rows(backend) -> list[list]:
    """One row per kernel that declares its capabilities (kernels.caps): what it takes, as data."""
    try:
        return [[f"{op}: {k.name}", k.caps.describe()] for op in catalogue.OPS
                for k in registry.kernels_for(op, backend) if k.caps is not None]
    except Exception as exc:  # a kernel package that fails to load must not break the report
        return [["kernels", f"error: {type(exc).__name__}: {exc}"]]


def collect(backend: str | None = None, patches: bool = False) -> dict:
    from .utils.versions import environment

    data = {"versions": versions(), "environment": environment(), "backends": [], "selection": None}
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
        declared = kernel_capability_rows(b)
        if declared:
            entry["capabilities"] = entry.get("capabilities", []) + declared
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


def dry_run_patches() -> list[dict]:
    """What patch() would do here: apply it, read the report, undo it."""
    from .patches import patch

    handle = patch()
    try:
        return [r.as_dict() for r in handle.report()]
    finally:
        handle.undo()


def patch_runtime() -> dict[str, list]:
    """What patched code did so far in this process: run-time hand-backs to stock code (and kernel
    declines) per op and reason, and which implementation served calls that have a choice (e.g.
    diffusers attention: ops.attention or the user's dispatch_attention_fn backend). Empty in a
    fresh `flux-npu info`; useful from a script (`flux_npu.report.collect(patches=True)`)."""
    from .ops import dispatch_stats
    from .patches import live_handles, routes

    fb = dispatch_stats()["fallback"]
    rows = [dict(c, backend=h.backend.name) for h in live_handles() for c in h.row_counts() if c["calls"]]
    return {
        "handbacks": [{"op": op, "backend": b, "reason": r, "calls": n} for (op, b, r), n in sorted(fb.items())],
        "routes": [{"call": w, "served_by": r, "calls": n} for (w, r), n in sorted(routes().items())],
        # per row of the live patch handles that ran: calls served / handed back, top hand-back reason
        "rows": rows,
    }


def render(data: dict) -> str:
    from .utils.versions import render_environment

    out = [render_environment(data["environment"]) if "environment" in data else
           format_table(("package", "version"), sorted(data["versions"].items())), ""]
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
        if rt.get("rows"):
            out.append("")
            out.append("patched rows that ran so far (live handles): served / handed back")
            out.append(format_table(("target", "symbol", "served", "handed back", "top hand-back reason"),
                                    [(r["target"], r["symbol"], f"{r['served']}/{r['calls']}", str(r["handed_back"]),
                                      r["top_reason"] or "") for r in rt["rows"]]))
        if rt.get("routes"):
            out.append("")
            out.append("which implementation served patched calls so far")
            out.append(format_table(("call", "served by", "calls"),
                                    [(r["call"], r["served_by"], str(r["calls"])) for r in rt["routes"]]))
    return "\n".join(out)


# -- what a run did (demo, FLUX_NPU_REPORT=1) ----------------------------------------------------


def dispatch_tables(stats: dict | None = None) -> str:
    """The tables `flux-npu demo` prints after its patched run: the kernels that served each op
    (calls) and the hand-backs to the reference with their reasons (from `ops.dispatch_stats()`)."""
    from .ops import dispatch_stats

    stats = dispatch_stats() if stats is None else stats
    text = "kernels that served the patched run\n" + format_table(
        ("op", "backend", "kernel", "calls"), [(*k, n) for k, n in sorted(stats["served"].items())])
    if stats["fallback"]:
        text += "\n\nfallbacks to the reference\n" + format_table(
            ("op", "backend", "reason", "calls"), [(*k, n) for k, n in sorted(stats["fallback"].items())])
    return text


def run_summary(handle) -> str:
    """What `FLUX_NPU_REPORT=1` prints at exit: the patched symbols the run called (served / handed
    back), skips and refusals for the code the script imported, one line for the layouts it never
    imported, then `dispatch_tables()`. Rows that only said "pending" for a module the script later
    imported (the import hook patched it: its own rows follow) and the import bookkeeping rows are
    left out: they described the start, not the run. `handle.report_table()` keeps every row."""
    rows = handle.row_counts()
    resolved = {r["target"] for r in rows if r["status"] not in ("pending", "settled")}
    never = [r["target"] for r in rows if r["status"] == "pending" and r["target"] not in resolved]
    called, idle, other = [], 0, []
    for r in rows:
        if r["status"] in ("pending", "settled"):
            continue
        if r["status"] == "patched":
            if r["calls"]:
                calls = f"{r['served']}/{r['calls']} served"
                if r["handed_back"]:
                    calls += f", {r['handed_back']} handed back (top: {r['top_reason']})"
                called.append((r["target"], r["symbol"], calls))
            else:
                idle += 1
            continue
        other.append((r["target"], r["symbol"], r["status"], r["reason"]))
    level = "instance" if handle.model is not None else "module/class"
    text = f"flux_npu run summary (backend {handle.backend.name}, {level} level)\n"
    text += "patched code the run called\n" + format_table(("target", "symbol", "calls"), called)
    if idle:
        text += f"\n({idle} more patched symbol(s) were not called by this run)"
    if other:
        text += "\n\nskipped or refused\n" + format_table(("target", "symbol", "status", "reason"), other)
    if never:
        text += "\n\nnot imported by the script (nothing patched): " + ", ".join(dict.fromkeys(never))
    return text + "\n\n" + dispatch_tables()
