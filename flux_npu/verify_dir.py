"""`flux-npu verify`'s report directory: whose it is (a marker file written first), where a run
writes (the directory, or `partial-<time>/` in it while an earlier report stays whole), the move of a
complete report over an earlier one, and interruption (SIGTERM / SIGHUP raise `Interrupted` so the
report so far is written)."""

from __future__ import annotations

import os

REPORT_FILES = ("report.md", "report.json", "verify.log", "model.json", "model.log", "model.png", "ops.png",
                "trajectory.png")
# written first into every report directory: a directory without it holds the user's files, not ours
MARKER = ".flux-npu-verify"
PARTIAL = "partial-"  # a run into a directory holding an earlier report writes here until it is complete


class Interrupted(BaseException):
    """SIGTERM / SIGHUP during verify (SIGINT is KeyboardInterrupt): the partial report is kept."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def check_out_dir(out_dir: str, force: bool = False) -> None:
    """Refuse a directory holding files verify did not write (unless `force`): its report.md,
    report.json and the others would be replaced."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ValueError(f"-o {out_dir} exists and is not a directory: name a new or report directory")
    entries = os.listdir(out_dir)
    if not entries or force:
        return
    ours = MARKER in entries
    foreign = sorted(e for e in entries if not (
        ours and (e in REPORT_FILES or e in (MARKER, "msprobe") or e.startswith(PARTIAL)
                  or (e.startswith(".") and e.endswith(".tmp")))))
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        what = ("it holds files verify did not write" if ours else "it is not a verify report directory")
        raise ValueError(f"-o {out_dir}: {what} ({listed}); report.md, report.json and the others would replace "
                         "files of the same name. Name a new directory, or pass --force to write there anyway")


def _summary(report, phases) -> str:
    """'parity: 12 passed, 1 failed; ops: pass' for the phases that ran."""
    parts = []
    for name in (*phases, "msprobe"):
        e = report.get(name)
        if not isinstance(e, dict) or not e:
            continue
        if name == "parity":
            done = [g for g in e.get("goldens", []) if "passed" in g]
            p = sum(g["passed"] for g in done)
            f = sum(g["total"] - g["passed"] for g in done)
            parts.append(f"parity: {p} passed, {f} failed")
        else:
            parts.append(f"{name}: {e.get('status', 'unfinished')}")
    return "; ".join(parts) or "no phase finished"


def stage_dir(out_dir: str, stamp: str) -> str:
    """Create out_dir (marked as ours) and return where this run writes: out_dir itself, or, when it
    holds an earlier report, a fresh partial-<stamp>-*/ inside it (promoted once complete)."""
    import tempfile

    os.makedirs(out_dir, exist_ok=True)
    earlier = any(os.path.exists(os.path.join(out_dir, n)) for n in REPORT_FILES)
    if not os.path.exists(os.path.join(out_dir, MARKER)):
        with open(os.path.join(out_dir, MARKER), "w") as f:
            f.write("written by flux-npu verify: this directory holds its reports\n")
    if not earlier:
        return out_dir
    stage = tempfile.mkdtemp(prefix=f"{PARTIAL}{stamp}-", dir=out_dir)
    os.chmod(stage, 0o777 & ~_umask())
    return stage


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _promote(stage, out_dir):
    """Move a complete report from its staging directory over the earlier one, then drop the earlier
    report's files this run did not make (a plot it no longer draws)."""
    import shutil

    made = set(os.listdir(stage))
    for name in sorted(made):
        dst = os.path.join(out_dir, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(stage, name), dst)
    for name in (*REPORT_FILES, "msprobe"):
        if name not in made:
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.rmdir(stage)


class _signals_raise:
    """While verify runs (main thread only): SIGTERM and SIGHUP raise Interrupted, so the report so
    far is written before the process ends (SIGINT already raises KeyboardInterrupt)."""

    def __enter__(self):
        import signal
        import threading

        self.saved = {}
        if threading.current_thread() is not threading.main_thread():
            return self

        def handler(signum, frame):
            raise Interrupted(signum)

        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None:
                self.saved[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, old in self.saved.items():
            signal.signal(sig, old)
        return False
