"""The phases issue 17 added to `flux-npu verify` and their report sections: the training
trajectory (`flux_npu.trajectory`), the open torch_npu questions asked on an npu backend
(`flux_npu.device_questions`) and the msprobe dump (`flux_npu.probe`). `flux_npu.verify` runs
them inside its phase guard (a crash is recorded, the other phases still run)."""

from __future__ import annotations

import json
import os
import shlex


def section_head(title: str, section: dict) -> list[str]:
    """A report section's heading, and the line saying its phase crashed when it did."""
    out = [f"## {title}", ""]
    if section.get("status") == "error":
        out += [f"**phase crashed**: {section['error']} (traceback in verify.log)", ""]
    return out


def parity_rule(rep) -> dict:
    """Ascend's rule over one golden's check (`parity.CheckReport`), for report.json."""
    rated = [r for r in rep.results if r.rule is not None]
    return {"rated": len(rated), "passed": sum(r.rule == "pass" for r in rated),
            "failed": [{"id": r.id, "message": r.rule_message} for r in rep.rule_failed],
            "note": None if rated else "no float64 reference in this golden (format "
                                        f"{rep.golden_meta.get('format')}): re-record it to get the 2x rule"}


def parity_markdown(g: dict, _md_table, _num) -> list:
    """report.md lines for one golden's cases: today's check and Ascend's rule side by side."""
    out, rows = [], []
    for c in g["results"]:
        w = c["worst"] or {}
        wr = c.get("worst_ratio") or {}
        rule = [f"{_num(wr.get('ref_rel'))} / {_num(wr.get('golden_ref_rel'))}",
                f"{wr['ratio']:.2f} ({wr['max_rel_ratio']:.1f})", c["rule"]] if wr else ["", "", "n/a"]
        rows.append([c["id"], c["dtype"], w.get("name", ""), _num(w.get("rel")), _num(w.get("tol")),
                     c["status"] + (f": {c['message']}" if c["message"] else ""), *rule])
    out += [_md_table(["case", "dtype", "worst tensor", "rel err", "tolerance", "result",
                       "vs float64: this / golden device", "ratio (max-rel ratio)", "2x rule"], rows), ""]
    rule = g.get("rule")
    if rule and rule["note"]:
        out += [f"Ascend's 2x rule: n/a, {rule['note']}.", ""]
    elif rule:
        out += [f"Ascend's rule (msprobe's benchmark standard: against a float64 reference of the same inputs, this "
                f"device's relative error at most 2x the golden device's, its maximum relative error at most 10x): "
                f"{rule['passed']}/{rule['rated']} low-precision cases pass."
                + (" Cases that break it:" if rule["failed"] else ""), ""]
        out += [f"- `{f['id']}`: {f['message']}" for f in rule["failed"]] + ([""] if rule["failed"] else [])
    return out


def device_questions(report, b):
    from .device_questions import ask

    report["device_questions"]["rows"] = ask(b)
    report["device_questions"]["status"] = "asked"


def trajectory(report, b, quick):
    from . import trajectory as T

    res = T.check(b, modes=("lora",) if quick else T.MODES)
    entry = report["trajectory"]
    entry.update(res)
    for mode, e in res["modes"].items():
        for k, w in e["worst"].items():
            if not w["deviation"] <= w["tolerance"]:
                report["failures"].append(
                    f"trajectory: {mode} {k} at step {w['step']} deviates {w['deviation']:.2e} from the reference "
                    f"(tolerance {w['tolerance']:.2e} = {T.RULE:g} x the measured bf16 spread)")
    entry["status"] = "pass" if res["ok"] else "FAIL"


def msprobe_dump(report, b, out_dir):
    import shutil

    from . import probe

    dump_dir = os.path.join(out_dir, "msprobe")
    if os.path.isdir(dump_dir):  # a reused report directory: this run's dump only
        shutil.rmtree(dump_dir)
    res = probe.dump_flux_step(b, dump_dir)
    entry = report["msprobe"]
    rel = os.path.relpath(res["dump_json"], out_dir)
    entry.update(dump_json=rel, stack_json=res["stack_json"] and os.path.relpath(res["stack_json"], out_dir),
                 flux_npu_entries=res["flux_npu_entries"], kernels=res["kernels"],
                 compare=(f"msprobe compare -tp {shlex.quote(rel)} -gp <the other device's report>/{rel} "
                          "-o msprobe-compare"))
    missing = [op for op in ("attention", "rms_norm") if not any(e.startswith(f"{probe.PREFIX}.{op}.")
                                                                 for e in res["flux_npu_entries"])]
    if missing:
        report["failures"].append(f"msprobe: the dump has no {', '.join(missing)} entries under {probe.PREFIX}.*")
    entry["status"] = "FAIL" if missing else "pass"


def plot_trajectory(report, out_dir) -> str:
    from . import trajectory as T

    env = report["environment"]
    T.plot(report["trajectory"], os.path.join(out_dir, "trajectory.png"),
           f"training trajectory: {env['backend']} on {env['device']} vs the shipped cpu float32 reference; "
           f"{report['date']}")
    return "trajectory.png"


def sections_markdown(r: dict, _md_table) -> list:
    """report.md lines for the device questions, the trajectory and the msprobe dump."""
    out = []
    dq = r.get("device_questions")
    if dq:
        out += section_head("Open device questions (please send the answers back)", dq)
        rows = [[q["question"], q["asked"], q.get("answer", ""), q.get("verdict", q.get("error", "")),
                 json.dumps(q.get("detail", {}), default=str)] for q in dq.get("rows", [])]
        if rows:
            out += ["The torch_npu documentation leaves these open; each was asked on this device against a float64 "
                    "reference (`flux_npu/device_questions.py`). flux-npu keeps the documented call until an answer "
                    "from hardware comes back.", "",
                    _md_table(["question", "asked", "answer", "verdict", "detail"], rows), "",
                    "Send back this report directory (`tar` command below) and the command line: "
                    f"`{r['command']}`.", ""]
    tr = r.get("trajectory")
    if tr:
        out += section_head("Training trajectory", tr)
        if tr.get("modes"):
            out += [f"A short fine-tune of a small Flux-width model on synthetic data, {tr['dtype']}, patched, "
                    f"against the shipped reference: {tr['how']}.", ""]
            rows = []
            for mode, e in tr["modes"].items():
                for k, w in e["worst"].items():
                    ref, got = e["reference"][k], e["got"][k]
                    rows.append([mode, k, f"{ref[0]:.4g} -> {ref[-1]:.4g}", f"{got[0]:.4g} -> {got[-1]:.4g}",
                                 w["step"], f"{w['deviation']:.2e}", f"{e['spread'][k]:.2e}", f"{w['tolerance']:.2e}",
                                 "pass" if w["deviation"] <= w["tolerance"] else "FAIL"])
            out += [_md_table(["mode", "metric", "reference (first -> last)", "this run", "worst step",
                               "rel. deviation", "bf16 spread", "tolerance", "result"], rows), "",
                    "Curves side by side: `trajectory.png`.", ""]
    mp = r.get("msprobe")
    if mp:
        out += section_head("msprobe dump (op names shared by every device)", mp)
        if "dump_json" in mp:
            ours = sorted({e.rsplit(".", 2)[0] for e in mp["flux_npu_entries"]})
            out += [f"One patched Flux step (forward and backward) dumped by msprobe: `{mp['dump_json']}`. "
                    f"flux_npu's ops appear as {', '.join(f'`{n}`' for n in ours) or 'nothing'} "
                    f"({len(mp['flux_npu_entries'])} forward/backward entries). Compare with the same command's "
                    "dump from another device (e.g. the GPU run as golden):", "", "```", mp["compare"], "```", ""]
    return out
