"""flux-npu run stops what it started and reports the script's own exit code (issue 12, items 1 and 9).

Real processes on the cpu backend: the launcher, torchrun (our in-process wrapper) and two ranks that
rendezvous over gloo. Every test kills what it started in `finally`, by pid, even when it fails."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPU_CONFIG = os.path.join(REPO, "configs", "ds_zero2_bf16_lora.json")

# Each rank records its pid, its parent's (torchrun, or the launcher in single-process mode) and the
# temporary DeepSpeed config the launcher made, then does what argv[2] says.
WORKER = r'''
import json, os, signal, sys, time
out, action = sys.argv[1], sys.argv[2]
rank = int(os.environ.get("RANK", "0"))
info = {"pid": os.getpid(), "ppid": os.getppid(), "ds_config": os.environ.get("FLUX_NPU_DS_CONFIG")}
with open(os.path.join(out, f"rank{rank}.tmp"), "w") as f:
    json.dump(info, f)
os.replace(os.path.join(out, f"rank{rank}.tmp"), os.path.join(out, f"rank{rank}.json"))
if action == "exit7" and rank == 1:
    sys.exit(7)
if action == "sigint":
    os.kill(os.getpid(), signal.SIGINT)  # default handler: KeyboardInterrupt, then death by SIGINT
if action == "term7":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))  # a script that stops cleanly with its own code
while True:
    time.sleep(0.1)
'''


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_all(proc, pids):
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Run:
    """`flux-npu run ... worker.py OUT ACTION` in a session of its own, cleaned up on exit."""

    def __init__(self, tmp_path, action, *options):
        self.out = tmp_path / "out"
        self.out.mkdir()
        script = tmp_path / "worker.py"
        script.write_text(WORKER)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("FLUX_NPU_BACKEND", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flux_npu", "run", "--backend", "cpu", *options, str(script), str(self.out), action],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.pids = set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _kill_all(self.proc, self.pids)

    def wait_ranks(self, n, timeout=180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            files = [self.out / f"rank{r}.json" for r in range(n)]
            if all(f.exists() for f in files):
                infos = [json.loads(f.read_text()) for f in files]
                self.pids |= {i["pid"] for i in infos} | {i["ppid"] for i in infos}
                return infos
            if self.proc.poll() is not None:
                pytest.fail(f"launcher exited {self.proc.returncode} before the ranks started:\n"
                            + self.proc.stdout.read()[-3000:])
            time.sleep(0.2)
        pytest.fail("ranks did not start in time")

    def result(self, timeout=120):
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out


@pytest.mark.slow
def test_sigterm_stops_torchrun_and_both_ranks_and_removes_the_temp_config(tmp_path):
    options = ("--nproc", "2", "--oversubscribe", "--ds-config", NPU_CONFIG, "--grace-period", "20")
    with Run(tmp_path, "sleep", *options) as run:
        infos = run.wait_ranks(2)
        temp_dir = os.path.dirname(infos[0]["ds_config"])
        torchrun_pid = infos[0]["ppid"]
        assert infos[1]["ppid"] == torchrun_pid and os.path.isdir(temp_dir)
        assert psutil.Process(torchrun_pid).ppid() == run.proc.pid  # the launcher's child
        run.proc.send_signal(signal.SIGTERM)
        rc, out = run.result()
        # the ranks died of the forwarded SIGTERM; torchrun stopped by it reports 128 + 15
        assert rc == 143, out[-3000:]
        for pid in run.pids:
            assert not _alive(pid), (pid, out[-3000:])
        assert not os.path.exists(temp_dir)


@pytest.mark.slow
def test_failing_rank_exit_code_is_the_launchers(tmp_path):
    # (a rank killed by SIGKILL giving 137 is checked by tests/test_checkpoint_resume.py)
    action, code = "exit7", 7
    with Run(tmp_path, action, "--nproc", "2", "--oversubscribe") as run:
        run.wait_ranks(2)
        rc, out = run.result()
        assert rc == code, out[-3000:]
        assert f"rank 1 failed first, with exit code {code}" in out
        for pid in run.pids:
            assert not _alive(pid)


def test_single_process_script_handles_sigterm_with_its_own_code(tmp_path):
    with Run(tmp_path, "term7") as run:
        (info,) = run.wait_ranks(1)
        assert info["ppid"] == run.proc.pid
        run.proc.send_signal(signal.SIGTERM)  # forwarded; the script's handler exits 7
        rc, out = run.result()
        assert rc == 7, out[-3000:]
        assert not _alive(info["pid"])


def test_single_process_sigint_death_is_130(tmp_path):
    with Run(tmp_path, "sigint") as run:
        run.wait_ranks(1)
        rc, out = run.result()
        assert rc == 130, out[-3000:]
        assert "KeyboardInterrupt" in out
