"""flux-npu run's input checks and the CPU multi-process run without DeepSpeed (issue 12, items 4 and 9)."""

import json
import os
import subprocess
import sys

import pytest

from flux_npu.cli import main
from flux_npu.distributed.launcher import build_launch, device_count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "train_flux_lora.py")


def run_cli(capsys, *args):
    rc = main(["run", "--backend", "cpu", *args])
    out = capsys.readouterr()
    return rc, out.err


def test_nproc_is_checked_against_the_cores_unless_oversubscribed(capsys):
    from flux_npu import get_backend

    cores = device_count(get_backend("cpu"))
    assert cores == len(os.sched_getaffinity(0))
    rc, err = run_cli(capsys, "--nproc", str(cores + 1), "--dry-run", EXAMPLE)
    assert rc == 1 and f"--nproc {cores + 1} is more than the {cores} usable CPU cores" in err
    assert "--oversubscribe" in err
    rc, err = run_cli(capsys, "--nproc", "1000", "--dry-run", EXAMPLE)
    assert rc == 1 and "--nproc 1000" in err
    rc, _ = run_cli(capsys, "--nproc", str(cores + 1), "--oversubscribe", "--master-port", "29400", "--dry-run",
                    EXAMPLE)
    assert rc == 0


@pytest.mark.parametrize("port", ["0", "65536", "99999", "-1"])
def test_master_port_range(capsys, port):
    rc, err = run_cli(capsys, "--master-port", port, "--dry-run", EXAMPLE)
    assert rc == 1 and f"--master-port {port} is not a TCP port" in err and "1..65535" in err


def test_unwritable_report_dir_is_one_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = run_cli(capsys, "--report-dir", str(blocker / "sub"), "--dry-run", EXAMPLE)
    assert rc == 1 and "--report-dir" in err and "cannot be written" in err and "Traceback" not in err
    if os.geteuid() != 0:  # root writes anywhere: the read-only case only means something for a user
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        rc, err = run_cli(capsys, "--report-dir", str(ro), "--dry-run", EXAMPLE)
        assert rc == 1 and "cannot be written" in err


def test_grace_period_must_be_non_negative(capsys):
    for bad in ("-1", "nan"):
        rc, err = run_cli(capsys, "--grace-period", bad, "--dry-run", EXAMPLE)
        assert rc == 1 and "--grace-period" in err


def test_cpu_ranks_without_deepspeed_get_a_cpu_accelerate_run():
    launch = build_launch(EXAMPLE, backend="cpu", nproc=2, base_env={}, oversubscribe=True)
    assert launch.env["ACCELERATE_USE_CPU"] == "true"
    assert launch.argv[1:3] == ["-m", "flux_npu.distributed.torchrun"]
    # with DeepSpeed, accelerate must not be told "cpu" (that would turn DeepSpeed off)
    launch = build_launch(EXAMPLE, backend="cpu", nproc=2, base_env={"ACCELERATE_USE_DEEPSPEED": "true"},
                          oversubscribe=True)
    assert "ACCELERATE_USE_CPU" not in launch.added
    assert "ACCELERATE_USE_CPU" not in build_launch(EXAMPLE, backend="cpu", base_env={}).added


@pytest.mark.slow
def test_two_cpu_ranks_without_ds_config_train_as_one_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FLUX_NPU_BACKEND", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flux_npu", "run", "--backend", "cpu", "--nproc", "2", "--oversubscribe",
         "--report-dir", str(tmp_path / "rep"), EXAMPLE, "--output_dir", str(out), "--max_train_steps", "2",
         "--checkpointing_steps", "2", "--mixed_precision", "no"],
        cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    events = [json.loads(line) for line in open(out / "train_log.jsonl")]
    # one main process (not two copies that each think they are alone) that sees both ranks
    starts = [e for e in events if e["event"] == "start"]
    assert starts == [{"event": "start", "num_processes": 2, "distributed_type": "DistributedType.MULTI_CPU"}]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]
    assert [e["step"] for e in events if e["event"] == "saved"] == [2]
    for rank in (0, 1):
        report = json.load(open(tmp_path / "rep" / f"patch-rank{rank}.json"))
        assert report["world_size"] == 2
        assert any(p["symbol"] == "PartialState" and p["status"] == "patched" for p in report["patches"])
