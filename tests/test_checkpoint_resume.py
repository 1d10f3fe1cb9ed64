"""The two-process example run, and a rank killed inside save_state (issue 12, item 3): the
example's checkpoints are written under a temporary name and renamed when every rank has
finished, so the kill leaves no `checkpoint-N` that looks complete; `--resume_from_checkpoint
latest` skips incomplete ones with a message and resumes from the newest complete one, and the
resumed losses are exactly those of the uninterrupted run."""

import importlib.util
import json
import os

import pytest
from flux_helpers import flux_npu_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "train_flux_lora.py")
NPU_CONFIG = os.path.join(REPO, "configs", "ds_zero2_bf16_lora.json")


def _events(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_two_process_training_killed_in_save_then_resumed_bit_exactly(tmp_path):
    """The unchanged example trained with accelerate + DeepSpeed ZeRO-2 in two processes (gloo on
    127.0.0.1), in two launches (it was two tests of two launches each; the resume below proves
    more than a second plain resume did: it must reproduce the uninterrupted losses bit for bit).
    Run 1: four steps; rank 1 SIGKILLs itself inside the save of step 4. Run 2: resumes `latest`,
    with a per-rank patch report."""
    out, rep = tmp_path / "out", tmp_path / "rep"
    common = ["--nproc", "2", "--oversubscribe", "--backend", "cpu", "--ds-config", NPU_CONFIG, "--grace-period", "10"]
    train = [EXAMPLE, "--output_dir", str(out), "--checkpointing_steps", "2", "--max_train_steps", "4"]

    # rank 1 SIGKILLs itself inside the save of step 4, after writing its part of the checkpoint
    rc, _, err = flux_npu_run(*common, *train, env_extra={"FLUX_NPU_EXAMPLE_CRASH_IN_SAVE": "4:1"})
    assert rc == 137, err[-4000:]  # the killed rank's own status (128 + SIGKILL), not torchrun's 1
    assert "rank 1 failed first, with exit code 137 (signal 9)" in err
    first = _events(out / "train_log.jsonl")
    assert [(e["num_processes"], e["distributed_type"]) for e in first if e["event"] == "start"] == \
        [(2, "DistributedType.DEEPSPEED")]
    uninterrupted = {e["step"]: e["loss"] for e in first if e["event"] == "step"}
    assert sorted(uninterrupted) == [1, 2, 3, 4]  # every step ran; only the last save was cut
    losses = [uninterrupted[s] for s in sorted(uninterrupted)]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses  # it trains
    assert [e["step"] for e in first if e["event"] == "saved"] == [2]
    assert (out / "checkpoint-2" / "COMPLETE").is_file()
    assert not (out / "checkpoint-4").exists() and (out / "checkpoint-4.partial").is_dir()
    # what an older, non-atomic save left behind: a newer checkpoint-N folder that is empty
    (out / "checkpoint-9").mkdir()

    rc, stdout, err = flux_npu_run(*common, "--report-dir", str(rep), *train, "--resume_from_checkpoint", "latest")
    assert rc == 0, err[-4000:]
    assert f"skipping {out / 'checkpoint-9'}: incomplete" in stdout + err
    assert err.count("flux_npu patches (backend cpu") == 1  # printed by rank 0 only
    new = _events(out / "train_log.jsonl")[len(first):]
    resumed = [e for e in new if e["event"] == "resumed"]
    assert resumed == [{"event": "resumed", "step": 2, "checkpoint": str(out / "checkpoint-2")}]
    steps = {e["step"]: e["loss"] for e in new if e["event"] == "step"}
    # bit-for-bit the same run: it continued from the saved LoRA and optimizer state, not from scratch
    assert steps == {3: uninterrupted[3], 4: uninterrupted[4]}
    assert [e["step"] for e in new if e["event"] == "saved"] == [4]
    assert (out / "checkpoint-4" / "COMPLETE").is_file() and not (out / "checkpoint-4.partial").exists()

    # the patch was live in both worker processes, and the patched ops served the model
    for rank in (0, 1):
        report = json.loads((rep / f"patch-rank{rank}.json").read_text())
        assert report["backend"] == "cpu" and report["world_size"] == 2 and report["rank"] == rank
        patched = {(p["target"], p["symbol"]) for p in report["patches"] if p["status"] == "patched"}
        assert ("diffusers.models.transformers.transformer_flux", "FluxAttnProcessor.__call__") in patched
        assert ("accelerate.state", "PartialState") in patched
        assert ("accelerate.utils.dataclasses", "DeepSpeedPlugin.__post_init__") in patched
        served = {tuple(d["key"][:2]): d["count"] for d in report["dispatch"]["served"]}
        assert served[("attention", "cpu")] > 0 and served[("rms_norm", "cpu")] > 0


def _example():
    spec = importlib.util.spec_from_file_location("train_flux_lora_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resolve_checkpoint_takes_only_complete_ones(tmp_path):
    ex = _example()
    for step, complete in [(2, True), (10, True), (11, False), (12, False)]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / ex.MARKER).write_text(json.dumps({"step": step, "num_processes": 2}))
    (tmp_path / "checkpoint-13.partial").mkdir()  # a save in progress (or killed) never counts
    (tmp_path / "checkpoint-x").mkdir()
    messages = []
    assert ex.resolve_checkpoint("latest", str(tmp_path), messages.append) == str(tmp_path / "checkpoint-10")
    assert [m.split(":")[0] for m in messages] == [f"skipping {tmp_path / 'checkpoint-12'}",
                                                   f"skipping {tmp_path / 'checkpoint-11'}"]
    assert ex.resolve_checkpoint("latest", str(tmp_path / "nothing")) is None
    assert ex.resolve_checkpoint(str(tmp_path / "checkpoint-2"), str(tmp_path)) == str(tmp_path / "checkpoint-2")
    # naming an incomplete checkpoint is an error that says so, not a DeepSpeed assertion later
    with pytest.raises(SystemExit, match="not a complete checkpoint"):
        ex.resolve_checkpoint(str(tmp_path / "checkpoint-12"), str(tmp_path))


def test_resume_reads_the_marker_and_the_files_it_lists(tmp_path):
    """A garbage marker, a marker of another step, a truncated model file: each is named, none is
    loaded into a raw zip error; another process count is refused before DeepSpeed starts."""
    ex = _example()
    ck = tmp_path / "checkpoint-4"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"x" * 100)
    good = {"step": 4, "num_processes": 2, "files": {"model.safetensors": 100}}
    (ck / ex.MARKER).write_text(json.dumps(good))
    assert ex.resolve_checkpoint(str(ck), str(tmp_path)) == str(ck)
    with pytest.raises(SystemExit, match="saved by 2 processes and this run has 4.*--nproc 2"):
        ex.resolve_checkpoint("latest", str(tmp_path), num_processes=4)
    (ck / "model.safetensors").write_bytes(b"x" * 60)  # truncated
    with pytest.raises(SystemExit, match="model.safetensors is missing or not the size"):
        ex.resolve_checkpoint(str(ck), str(tmp_path))
    (ck / ex.MARKER).write_text("\x00garbage")
    with pytest.raises(SystemExit, match="marker is unreadable"):
        ex.resolve_checkpoint(str(ck), str(tmp_path))
    (ck / ex.MARKER).write_text(json.dumps({**good, "step": 9}))
    messages = []
    assert ex.resolve_checkpoint("latest", str(tmp_path), messages.append) is None
    assert "does not describe this checkpoint" in messages[0]
