"""`bench model --isolate` leaves nothing running (issue 18 item 6): the isolated process runs in a
group of its own, a timeout kills the whole group (not only the direct child), SIGTERM/SIGHUP to
the benchmark are forwarded to it, and a non-finite --timeout-s is refused before anything runs."""

import os
import signal
import subprocess
import sys
import time

import pytest

from flux_npu.benchmark import model as M
from flux_npu.cli import main

# A "python" that, for the stock variant, leaves a grandchild (a stand-in for a data-loader worker
# or a compiler process) and hangs; both pids are written where the test can see them.
_HANGING_WITH_GRANDCHILD = """#!/bin/sh
case "$*" in *'"variants": ["stock"]'*)
  sleep 120 &
  echo $! > {pids}.grandchild
  echo $$ > {pids}.child
  wait ;;
esac
exec {python} "$@"
"""


def _fake_python(tmp_path):
    pids = tmp_path / "pids"
    fake = tmp_path / "python"
    fake.write_text(_HANGING_WITH_GRANDCHILD.format(python=sys.executable, pids=pids))
    fake.chmod(0o755)
    return fake, pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _gone(*pids, within=10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def _read_pid(path, within=60.0) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


def test_timeout_kills_the_whole_process_group(tmp_path, monkeypatch):
    fake, pids = _fake_python(tmp_path)
    monkeypatch.setattr(sys, "executable", str(fake))
    rows = M.run_benchmark(presets=("tiny",), modes=("infer",), resolutions=(64,), backend="cpu",
                           variants=("stock",), dtype="fp32", steps=1, warmup=0, repeats=1, isolate=True, timeout_s=2)
    assert [r.status for r in rows] == ["timeout"] and "killed after 2 s" in rows[0].message
    grandchild = _read_pid(pids.with_suffix(".grandchild"))
    assert _gone(grandchild, _read_pid(pids.with_suffix(".child"))), "the isolated process left its child running"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_stop_signal_to_the_benchmark_is_forwarded(tmp_path, sig):
    fake, pids = _fake_python(tmp_path)
    code = (f"import sys; sys.executable = {str(fake)!r}\n"
            "from flux_npu.benchmark import model as M\n"
            "M.run_benchmark(presets=('tiny',), modes=('infer',), resolutions=(64,), backend='cpu', "
            "variants=('stock',), dtype='fp32', steps=1, warmup=0, repeats=1, isolate=True)\n")
    bench = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        child = _read_pid(pids.with_suffix(".child"))
        grandchild = _read_pid(pids.with_suffix(".grandchild"))
        bench.send_signal(sig)
        bench.communicate(timeout=60)
        assert bench.returncode == -sig  # it stopped as the signal stops it, after its child's group
        assert _gone(child, grandchild), "the isolated benchmark process outlived the benchmark"
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()
        for path in (pids.with_suffix(".child"), pids.with_suffix(".grandchild")):
            if path.exists() and _alive(int(path.read_text())):
                os.kill(int(path.read_text()), signal.SIGKILL)


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0"])
def test_non_finite_or_non_positive_timeout_is_refused(capsys, tmp_path, value):
    out = tmp_path / "b.json"
    assert main(["bench", "model", "--preset", "tiny", "--isolate", "--timeout-s", value, "--no-progress",
                 "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--timeout-s" in err and "finite number of seconds > 0" in err and "Traceback" not in err
    assert not out.exists()
