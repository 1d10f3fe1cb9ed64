"""report.md of `flux-npu verify`, rendered from report.json's content (the orchestration is
`flux_npu.verify`)."""

from __future__ import annotations

from .benchmark.stats import CONFIDENCE
from .utils.versions import system_line
from .verify_sections import parity_markdown, section_head, sections_markdown


def _md_table(head: list[str], rows: list[list]) -> str:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _kernels_md(k) -> str:
    if not isinstance(k, dict):
        return f"_{k}_"
    out = [_md_table(["op", "backend", "kernel", "calls"],
                     [[s["op"], s["backend"], s["kernel"], s["calls"]] for s in k["served"]]) if k["served"]
           else "_no op was dispatched_"]
    if k["fallback"]:
        out.append("\nFallbacks to the plain-torch reference or stock code:\n")
        out.append(_md_table(["op", "backend", "reason", "calls"],
                             [[s["op"], s["backend"], s["reason"], s["calls"]] for s in k["fallback"]]))
    return "\n".join(out)


def render_markdown(r: dict) -> str:
    env, v = r["environment"], r["environment"]["versions"]
    out = [f"# flux-npu verify: {r['verdict']}", ""]
    if r.get("interrupted"):
        out += [f"**{r['interrupted']['summary']}**: a partial report; the phases after it did not run.", ""]
    if env.get("note"):
        out.append(f"- **{env['note']}**")
    out += [f"- backend `{env['backend']}` on {env['device']} (device type {env['device_type']})",
            f"- date {r['date']}; command `{r['command']}`" + (" (--quick)" if r["quick"] else ""),
            "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
            f"- Python {env['python']} on {env['platform']}, {env['torch_threads']} torch threads"]
    out += [f"- {system_line(env['system'])} (at the start)"] if env.get("system") else []
    out.append("")
    if r["failures"]:
        out += ["## Failures", ""] + [f"- {f}" for f in r["failures"]] + [""]
    p = r.get("parity")
    if p:
        out += section_head("Parity against the shipped goldens", p)
        for g in p.get("goldens", []):
            if "status" not in g:  # interrupted while this golden was being checked
                out += [f"### {g['golden']}: unfinished (interrupted)", ""]
                continue
            if g["status"] == "golden error":
                out += [f"### {g['golden']}: golden error", "", f"```\n{g['error']}\n```", ""]
                continue
            out += [f"### {g['golden']}: {g['status']}, {g['passed']}/{g['total']} cases pass", "",
                    g.get("describe", ""), ""]
            out += parity_markdown(g, _md_table, _num)
        if "kernels" in p:
            out += ["### What served each op during parity", "", _kernels_md(p["kernels"]), ""]
    out += sections_markdown(r, _md_table)
    o = r.get("ops")
    if o:
        out += section_head("Op benchmarks", o)
        if "table" in o:
            e = o["environment"]
            grow = (f", grown up to {o['max_repeats']} until significant" if o.get("max_repeats", 0) > o["repeats"]
                    else "")
            out += [f"Shape `{o['shape']}` {o['shape_def']}, dtypes {', '.join(o['dtypes'])}, median and IQR of "
                    f"{o['repeats']}{grow} after {o['warmup']} warm-up; copy bandwidth "
                    f"{e['copy_bandwidth_gbps']:.1f} GB/s. Device time: {e['device_time']}; GB/s, % copy and vs stock "
                    f"come from it. Latency: {e['latency']}. A \"vs stock\" ratio is a verdict only where it says "
                    f"faster or slower (Mann-Whitney U at {o.get('confidence', CONFIDENCE):.0%} confidence); "
                    "\"not significant\" means the runs could not tell the two apart. % copy above 100 is "
                    "cache-resident, not bandwidth.", "", "```", o["table"], "```", ""]
    m = r.get("model")
    if m:
        out += section_head("Whole-model benchmark", m)
        if "table" in m:
            out += [f"Configuration: {m['config']}; rows in `model.json`, tracebacks (if any) in `model.log`.", "",
                    "```", m["table"], "```", ""]
            if m.get("ratio_table"):
                out += ["```", m["ratio_table"], "```", ""]
            out += ["### What served each op during the model benchmark", "", _kernels_md(m["kernels"]), ""]
    pl = r.get("plots", {})
    out += ["## Plots", "", (", ".join(f"`{f}`" for f in pl.get("files", [])) or "none") if "files" in pl
            else pl.get("skipped", pl.get("error", "none")), ""]
    sb = r["send_back"]
    out += ["## What to send back", ""]
    if r["failures"]:
        out += ["Something failed. Please send, to the flux-npu issue tracker or to whoever asked you to run this:", "",
                "1. this report directory as a tarball:", "", "```", sb["tar"], "```", "",
                f"2. the command line you ran: `{sb['command']}`", "",
                "3. anything the terminal printed that is not in the report (warnings from the driver, CANN or "
                "CUDA).", ""]
    else:
        out += ["Every check passed. To share the figures anyway:", "", "```", sb["tar"], "```", "",
                f"(command line: `{sb['command']}`)", ""]
    return "\n".join(out)


def _num(v) -> str:
    return "" if v is None else f"{v:.3e}"
