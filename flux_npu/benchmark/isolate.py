"""Run one isolated benchmark process so that nothing outlives it (`bench model --isolate`).

The child starts in a process group (a session) of its own, with a parent-death signal, so:
- SIGTERM / SIGHUP / SIGINT to the benchmark are forwarded to the child's whole group (and every
  process seen under it), which gets `GRACE_S` seconds to stop before SIGKILL; then the benchmark
  itself stops as that signal would have stopped it (KeyboardInterrupt for SIGINT);
- a timeout kills the whole group and every process under the child, not only the child;
- a SIGKILLed benchmark still takes the child down (PR_SET_PDEATHSIG on Linux).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import threading
import time

GRACE_S = 10.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def check_timeout(timeout_s: float | None) -> None:
    """A timeout is a finite number of seconds > 0 (inf and nan are refused, not run)."""
    if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s)
                                      and timeout_s > 0):
        raise ValueError(f"--timeout-s {timeout_s} must be a finite number of seconds > 0 (leave it out for no limit)")


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _signal_group(pid: int, signum, procs=()) -> None:
    import psutil

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
    for p in procs:  # anything under the child that left its group (setsid) still gets it
        with contextlib.suppress(psutil.Error):
            p.send_signal(signum)


def _stop(child: subprocess.Popen, signum, grace: float) -> None:
    """`signum` to the child's group, up to `grace` seconds for it to go, then SIGKILL to what is left."""
    procs = _descendants(child.pid)
    _signal_group(child.pid, signum, procs)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (child.poll() is None or any(p.is_running() for p in procs)):
        time.sleep(0.05)
    _signal_group(child.pid, signal.SIGKILL, [p for p in procs if p.is_running()])


def run_child(cmd: list[str], timeout_s: float | None = None, grace: float = GRACE_S
              ) -> tuple[int | None, str, str]:
    """Run `cmd` to completion and return (returncode, stdout, stderr); returncode None: it was killed
    after `timeout_s` seconds (with every process under it)."""
    from ..distributed.launcher import _die_with_parent

    check_timeout(timeout_s)
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, preexec_fn=_die_with_parent)
    received = []

    def forward(signum, _frame):
        received.append(signum)
        _stop(child, signum, grace)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        try:
            out, err = child.communicate(timeout=timeout_s)
            code: int | None = child.returncode
        except subprocess.TimeoutExpired:
            _stop(child, signal.SIGKILL, 0.0)
            out, err = child.communicate()
            code = None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:  # an exception on the way out: leave nothing running
            _stop(child, signal.SIGKILL, 0.0)
            child.wait()
    if received:  # stop as the signal would have stopped us, now that the child's group is gone
        signum = received[0]
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        handler = previous.get(signum, signal.SIG_DFL)
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), signum)
    return code, out or "", err or ""
