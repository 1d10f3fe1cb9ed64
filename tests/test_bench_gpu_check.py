"""bench/gpu_check.sh, the one command a GPU session runs: valid shell, a --dry-run that lists
every step, and every flux-npu command in it accepted by this version's CLI parsers (so the
script cannot drift from the CLI unnoticed)."""

import argparse
import os
import shlex
import shutil
import subprocess

import pytest
import torch

from flux_npu.benchmark import ops as bench_ops
from flux_npu.cli import build_parser

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_check.sh")
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60)


def test_shell_syntax():
    proc = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_lists_every_step_and_the_cli_accepts_each_command(tmp_path):
    out = tmp_path / "gc"
    proc = _run(str(out), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    steps = [ln.split("]")[0].lstrip("[") for ln in lines]
    assert steps == ["env", "tests", "suite", "parity", "parity-cudnn", "record", "record-check", "ops", "model",
                     "compile", "verify"]
    text = proc.stdout
    assert "pytest -q tests/test_triton_kernels.py tests/test_cuda_backend.py tests/ops --junitxml" in text
    assert "parity record --backend cuda --shapes tiny width -o tests/golden/parity_cuda.safetensors" in text
    assert "--preset flux-mini --res 512 1024 --mode both --train lora full --compare --isolate" in text
    assert not out.exists()  # a dry run writes nothing
    parser = build_parser()
    checked = 0
    for ln in lines:
        cmd = shlex.split(ln.split("] ", 1)[1])
        if cmd[:3] != ["python", "-m", "flux_npu"]:
            continue
        args = parser.parse_args(cmd[3:])  # SystemExit(2) here means the script uses an option we lack
        if getattr(args, "bench_command", None) == "ops":
            p = argparse.ArgumentParser()
            bench_ops.add_arguments(p)
            p.parse_args(args.ops_args)
        checked += 1
    assert checked == 8


def test_only_and_unknown_steps(tmp_path):
    proc = _run(str(tmp_path / "x"), "--dry-run", "--only", "parity,verify", "--quick")
    assert [ln.split("]")[0] for ln in proc.stdout.splitlines()] == ["[parity", "[parity-cudnn", "[verify"]
    assert "verify --backend cuda" in proc.stdout and proc.stdout.rstrip().endswith("--quick")
    proc = _run("--dry-run", "--only", "bogus")
    assert proc.returncode == 2 and "unknown step 'bogus'" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU host the script would really run")
def test_without_a_gpu_it_stops_with_a_clear_message(tmp_path):
    proc = _run(str(tmp_path / "y"), "--only", "env")
    assert proc.returncode == 1 and "no CUDA device visible to torch" in proc.stderr
