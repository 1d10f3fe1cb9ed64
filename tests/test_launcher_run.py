"""flux-npu run: the launch it builds, the bootstrap, and the unchanged example trained with
accelerate + DeepSpeed ZeRO-2 in two processes (gloo on 127.0.0.1), checkpointed and resumed."""

import json
import os
import subprocess
import sys

import pytest

from flux_npu import BackendError
from flux_npu.distributed import rewrite
from flux_npu.distributed.launcher import build_launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "train_flux_lora.py")
NPU_CONFIG = os.path.join(REPO, "configs", "ds_zero2_bf16_lora.json")


def flux_npu_run(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FLUX_NPU_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "flux_npu", "run", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def test_launch_for_two_processes_with_deepspeed(tmp_path):
    launch = build_launch(EXAMPLE, ["--output_dir", "x"], backend="cpu", nproc=2, ds_config=NPU_CONFIG,
                          report_dir=str(tmp_path), base_env={"PATH": os.environ.get("PATH", "")}, oversubscribe=True)
    try:
        argv = launch.argv
        assert argv[1:3] == ["-m", "flux_npu.distributed.torchrun"]  # torchrun, keeping the ranks' exit codes
        assert argv[argv.index("--nproc-per-node") + 1] == "2" and argv[argv.index("--master-addr") + 1] == "127.0.0.1"
        assert int(argv[argv.index("--master-port") + 1]) > 0
        assert argv[-5:] == ["-m", "flux_npu.distributed.bootstrap", EXAMPLE, "--output_dir", "x"]
        env = launch.env
        assert env["FLUX_NPU_BACKEND"] == "cpu" and env["FLUX_NPU_TRANSFER_TO_NPU"] == "0"
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["DS_ACCELERATOR"] == "cpu"
        path = env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
        assert json.load(open(path)) == rewrite(NPU_CONFIG, "cpu").config == launch.ds_result.config
    finally:
        launch.cleanup()
    assert not os.path.exists(path)


def test_launch_single_process_and_bad_input(tmp_path):
    launch = build_launch(EXAMPLE, ["a"], backend="cpu", base_env={})
    assert launch.argv == [sys.executable, "-m", "flux_npu.distributed.bootstrap", EXAMPLE, "a"]
    with pytest.raises(ValueError, match="transfer_to_npu only applies"):
        build_launch(EXAMPLE, backend="cpu", transfer_to_npu=True, base_env={})
    with pytest.raises(FileNotFoundError):
        build_launch(str(tmp_path / "missing.py"), backend="cpu", base_env={})
    with pytest.raises(BackendError, match="not available"):
        build_launch(EXAMPLE, backend="npu", base_env={})
    with pytest.raises(ValueError, match="--master-port is required"):
        build_launch(EXAMPLE, backend="cpu", nproc=2, nnodes=2, base_env={}, oversubscribe=True)


def test_cli_dry_run_and_errors(tmp_path):
    r = flux_npu_run("--backend", "cpu", "--nproc", "2", "--oversubscribe", "--master-port", "29999", "--dry-run",
                     EXAMPLE, "--x", "1")
    assert r.returncode == 0, r.stderr
    assert "FLUX_NPU_BACKEND=cpu" in r.stdout and "--master-port 29999" in r.stdout
    assert r.stdout.rstrip().endswith("--x 1")
    r = flux_npu_run("--backend", "cpu", str(tmp_path / "nope.py"))
    assert r.returncode == 1 and "error: script" in r.stderr
    r = flux_npu_run("--backend", "cpu", "--nproc", "0", EXAMPLE)
    assert r.returncode == 1 and "--nproc" in r.stderr


def test_bootstrap_runs_script_as_main_and_keeps_exit_code(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(
        "import sys, json, diffusers.models.transformers.transformer_flux as tf\n"
        "json.dump({'name': __name__, 'argv': sys.argv[1:],\n"
        "           'patched': getattr(tf.FluxAttnProcessor.__call__, '__module__', '')}, open(sys.argv[1], 'w'))\n"
        "sys.exit(3)\n")
    out = tmp_path / "out.json"
    r = flux_npu_run("--backend", "cpu", "--report-dir", str(tmp_path / "rep"), str(script), str(out), "--flag")
    assert r.returncode == 3, r.stderr
    data = json.load(open(out))
    assert data["name"] == "__main__" and data["argv"] == [str(out), "--flag"]
    assert data["patched"].startswith("flux_npu")  # the diffusers processor the script sees is ours
    assert r.stderr.count("flux_npu patches (backend cpu") == 1
    report = json.load(open(tmp_path / "rep" / "patch-rank0.json"))
    assert report["backend"] == "cpu" and "dispatch" in report


def _events(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_example_trains_checkpoints_and_resumes_in_two_processes(tmp_path):
    out, rep1, rep2 = tmp_path / "out", tmp_path / "rep1", tmp_path / "rep2"
    common = ["--nproc", "2", "--oversubscribe", "--backend", "cpu", "--ds-config", NPU_CONFIG]
    train = [EXAMPLE, "--output_dir", str(out), "--checkpointing_steps", "2"]
    r = flux_npu_run(*common, "--report-dir", str(rep1), *train, "--max_train_steps", "4")
    assert r.returncode == 0, r.stderr[-4000:]
    events = _events(out / "train_log.jsonl")
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    losses = [e["loss"] for e in steps]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert [e["step"] for e in events if e["event"] == "saved"] == [2, 4]
    assert (out / "checkpoint-4" / "COMPLETE").is_file()  # renamed into place once every rank saved
    assert [(e["num_processes"], e["distributed_type"]) for e in events if e["event"] == "start"] == \
        [(2, "DistributedType.DEEPSPEED")]
    assert r.stderr.count("flux_npu patches (backend cpu") == 1  # printed by rank 0 only

    # the patch was live in both worker processes, and the patched ops served the model
    for rank in (0, 1):
        report = json.load(open(rep1 / f"patch-rank{rank}.json"))
        assert report["backend"] == "cpu" and report["world_size"] == 2 and report["rank"] == rank
        patched = {(p["target"], p["symbol"]) for p in report["patches"] if p["status"] == "patched"}
        assert ("diffusers.models.transformers.transformer_flux", "FluxAttnProcessor.__call__") in patched
        assert ("accelerate.state", "PartialState") in patched
        assert ("accelerate.utils.dataclasses", "DeepSpeedPlugin.__post_init__") in patched
        served = {tuple(d["key"][:2]): d["count"] for d in report["dispatch"]["served"]}
        assert served[("attention", "cpu")] > 0 and served[("rms_norm", "cpu")] > 0

    r = flux_npu_run(*common, "--report-dir", str(rep2), *train, "--max_train_steps", "6",
                     "--resume_from_checkpoint", "latest")
    assert r.returncode == 0, r.stderr[-4000:]
    new = [e for e in _events(out / "train_log.jsonl")[len(events):] if e["event"] != "start"]
    assert new[0] == {"event": "resumed", "step": 4, "checkpoint": str(out / "checkpoint-4")}
    resumed = [e for e in new if e["event"] == "step"]
    assert [e["step"] for e in resumed] == [5, 6]
    # it continued from the saved LoRA and optimizer state, not from scratch
    assert resumed[0]["loss"] < losses[-1] and resumed[1]["loss"] < resumed[0]["loss"]
    assert (out / "checkpoint-6").is_dir()
