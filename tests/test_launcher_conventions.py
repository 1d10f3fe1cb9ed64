"""flux-npu run speaks torchrun (issue 19 item 4) and leaves process-group creation to the script
(issue 18 item 6): `--nproc-per-node`, `-m module`, torchrun's rendezvous options; a plain
torch.distributed script (no accelerate) runs in two processes as it does under torchrun."""

import json
import os
import subprocess
import sys

import pytest

from flux_npu.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a script written for plain torchrun: it forms the process group itself and never imports accelerate
DDP_SCRIPT = """\
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
rank = dist.get_rank()
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world": dist.get_world_size(), "sum": t.item(), "name": __name__,
               "argv": sys.argv[2:], "accelerate": "accelerate.state" in sys.modules
               and bool(sys.modules["accelerate.state"].PartialState._shared_state)}, f)
dist.destroy_process_group()
"""


def test_torchrun_spellings_reach_torchrun(capsys):
    rc = main(["run", "--backend", "cpu", "--nproc_per_node", "2", "--oversubscribe", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", "localhost:29411", "--rdzv_id", "job7", "--max-restarts", "0", "--dry-run",
               "-m", "pkg.train", "--lr", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    argv = out.strip().splitlines()[-1].split()
    assert argv[argv.index("--nproc-per-node") + 1] == "2"
    for flag, value in (("--rdzv-backend", "c10d"), ("--rdzv-endpoint", "localhost:29411"), ("--rdzv-id", "job7"),
                        ("--max-restarts", "0")):
        assert argv[argv.index(flag) + 1] == value
    # the bootstrap runs the module as `python -m` would, with the script's own arguments after it
    assert argv[-5:] == ["flux_npu.distributed.bootstrap", "-m", "pkg.train", "--lr", "1"]
    # --nproc is still accepted, and a module name is checked for what it is
    assert main(["run", "--backend", "cpu", "--nproc", "1", "--dry-run", "-m", "pkg.train"]) == 0
    capsys.readouterr()
    assert main(["run", "--backend", "cpu", "--dry-run", "-m", "pkg/train.py"]) == 1
    assert "is not a module name" in capsys.readouterr().err


def test_bootstrap_refuses_a_missing_module(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flux_npu.distributed.bootstrap", "-m", "no_such_pkg.mod"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "no module named 'no_such_pkg.mod'" in r.stderr


@pytest.mark.slow
def test_plain_torch_distributed_module_in_two_processes(tmp_path):
    """`run --nproc-per-node 2 -m pkg.module` on cpu: the script's own init_process_group works (the
    bootstrap used to create accelerate's state, and with it the default process group, first)."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "ddp_script.py").write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [REPO, *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("FLUX_NPU_BACKEND", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flux_npu", "run", "--backend", "cpu", "--nproc-per-node", "2", "--oversubscribe",
         "-m", "pkg.ddp_script", str(out), "--flag"],
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    for rank in (0, 1):
        data = json.loads((out / f"rank{rank}.json").read_text())
        assert data == {"rank": rank, "world": 2, "sum": 3.0, "name": "__main__", "argv": ["--flag"],
                        "accelerate": False}
