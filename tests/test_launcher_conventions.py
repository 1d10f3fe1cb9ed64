"""flux-npu run speaks torchrun (issue 19 item 4) and leaves process-group creation to the script
(issue 18 item 6): `--nproc-per-node`, `-m module`, torchrun's rendezvous options; a plain
torch.distributed script (no accelerate) runs in two processes as it does under torchrun."""

import json
import os
import subprocess
import sys

import pytest
from flux_helpers import flux_npu_run

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
    pythonpath = os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])])
    rc, _, err = flux_npu_run("--backend", "cpu", "--nproc-per-node", "2", "--oversubscribe",
                              "-m", "pkg.ddp_script", str(out), "--flag",
                              cwd=tmp_path, env_extra={"PYTHONPATH": pythonpath})
    assert rc == 0, err[-4000:]
    for rank in (0, 1):
        data = json.loads((out / f"rank{rank}.json").read_text())
        assert data == {"rank": rank, "world": 2, "sum": 3.0, "name": "__main__", "argv": ["--flag"],
                        "accelerate": False}


# --- accelerate's --config_file -----------------------------------------------------------------

ACCELERATE_SCRIPT = """\
import json, os, sys
from accelerate import Accelerator

acc = Accelerator()
with open(os.path.join(sys.argv[1], f"rank{acc.process_index}.json"), "w") as f:
    json.dump({"num_processes": acc.num_processes, "mixed_precision": acc.mixed_precision,
               "distributed_type": str(acc.distributed_type)}, f)
acc.wait_for_everyone()
"""

MULTI_CPU_YAML = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
mixed_precision: bf16
num_machines: 1
num_processes: 2
machine_rank: 0
use_cpu: true
dynamo_config: {dynamo_backend: INDUCTOR}
"""


def _dry_run(capsys, *args):
    args = [os.path.join(REPO, "examples", "train_flux_lora.py") if a == "train.py" else a for a in args]
    rc = main(["run", "--backend", "cpu", "--dry-run", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_config_file_sets_processes_precision_and_deepspeed(capsys, tmp_path):
    cfg = tmp_path / "accelerate.yaml"
    cfg.write_text(MULTI_CPU_YAML)
    rc, out, err = _dry_run(capsys, "--oversubscribe", "--config_file", str(cfg), "train.py")
    assert rc == 0, err
    argv = out.strip().splitlines()[-1].split()
    assert argv[argv.index("--nproc-per-node") + 1] == "2"
    assert "ACCELERATE_MIXED_PRECISION=bf16" in out and "ACCELERATE_USE_CPU=true" in out
    assert "not applied by flux-npu run: dynamo_config" in err
    # the command line wins over the file, and says so
    rc, out, err = _dry_run(capsys, "--nproc-per-node", "1", "--config-file", str(cfg), "train.py")
    assert rc == 0 and "--nproc-per-node" not in out and "--nproc 1 given" in err
    # the shipped accelerate DeepSpeed file: its deepspeed_config_file goes through the backend rewrite
    shipped = os.path.join(REPO, "configs", "accelerate_zero2_lora.yaml")
    rc, out, err = _dry_run(capsys, "--nproc-per-node", "2", "--oversubscribe", "--config_file", shipped, "train.py")
    assert rc == 0, err
    assert "ACCELERATE_USE_DEEPSPEED=true" in out and "ACCELERATE_MIXED_PRECISION=bf16" in out
    assert "ACCELERATE_USE_CPU" not in out  # accelerate's cpu=True would turn DeepSpeed off
    assert "ds_zero2_bf16_lora.json (via accelerate config" in err  # the rewrite's report names the file


@pytest.mark.parametrize("text,message", [
    ("distributed_type: FSDP\nnum_processes: 2\n", "is not launched by flux-npu run"),
    ("distributed_type: MULTI_CPU\nnum_processes: 3\nnum_machines: 2\n", "does not divide"),
    ("distributed_type: MULTI_CPU\nnum_processes: two\n", "num_processes is 'two'"),
    ("- a list\n", "not a mapping"),
    ("distributed_type: DEEPSPEED\nnum_processes: 1\ndeepspeed_config: {zero_stage: 2}\n",
     "names no deepspeed_config_file"),
])
def test_config_file_refusals_name_the_problem(capsys, tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    rc, _, err = _dry_run(capsys, "--config_file", str(cfg), "train.py")
    assert rc == 1 and message in err, err


@pytest.mark.slow
def test_config_file_runs_an_accelerate_script_in_two_processes(tmp_path):
    (tmp_path / "acc_script.py").write_text(ACCELERATE_SCRIPT)
    (tmp_path / "accelerate.yaml").write_text(MULTI_CPU_YAML)
    out = tmp_path / "out"
    out.mkdir()
    pythonpath = os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])])
    rc, _, err = flux_npu_run("--backend", "cpu", "--oversubscribe", "--config_file", "accelerate.yaml",
                              "acc_script.py", str(out), cwd=tmp_path, env_extra={"PYTHONPATH": pythonpath})
    assert rc == 0, err[-4000:]
    for rank in (0, 1):
        data = json.loads((out / f"rank{rank}.json").read_text())
        assert data == {"num_processes": 2, "mixed_precision": "bf16", "distributed_type": "DistributedType.MULTI_CPU"}
