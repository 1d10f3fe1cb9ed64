"""ds-config speaks JSON and refuses what it cannot honour (issue 18 item 8): stdout is JSON only
(DeepSpeed's own logging goes to stderr), an accelerate config is converted through its
deepspeed_config_file or refused with the fix, a training YAML's mixed_precision is carried (and
the 910A rule applied), DeepSpeed keys are checked by type and range naming the key, and the config
generator says what is missing without DeepSpeed."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from flux_npu.distributed import DeepSpeedConfigError, rewrite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_JSON = os.path.join(ROOT, "configs", "ds_zero2_bf16_full.json")
ACC_YAML = os.path.join(ROOT, "configs", "accelerate_zero2_full.yaml")


def _ds_json():
    with open(DS_JSON) as f:
        return json.load(f)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "flux_npu", "ds-config", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.parametrize("flags", [["--json"], []])
def test_stdout_is_json_only(flags):
    out = _cli(DS_JSON, "--backend", "cpu", *flags)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)  # nothing from DeepSpeed's logger in front of it
    assert "zero_optimization" in (data["config"] if flags else data)


def test_accelerate_config_is_converted_through_its_deepspeed_file(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    shutil.copy(DS_JSON, tmp_path / "configs")
    shutil.copy(ACC_YAML, tmp_path / "configs")
    monkeypatch.chdir(tmp_path)  # accelerate reads deepspeed_config_file relative to the working directory
    result = rewrite("configs/accelerate_zero2_full.yaml", "npu", soc="910B3")
    assert result.config["zero_optimization"]["stage"] == 2
    assert any("accelerate config file" in n for n in result.notes)


def test_accelerate_config_without_a_deepspeed_file_is_refused_with_the_fix(tmp_path):
    p = tmp_path / "acc.yaml"
    p.write_text(textwrap.dedent("""\
        compute_environment: LOCAL_MACHINE
        distributed_type: DEEPSPEED
        deepspeed_config:
          zero_stage: 2
          offload_optimizer_device: none
        mixed_precision: bf16
        num_processes: 8
    """))
    with pytest.raises(DeepSpeedConfigError, match="accelerate config file.*pass the DeepSpeed JSON"):
        rewrite(str(p), "npu")
    out = _cli(str(p), "--backend", "npu", "--strict")
    assert out.returncode == 1 and "accelerate config file" in out.stderr


def test_training_yaml_mixed_precision_is_carried_and_910a_gets_fp16(tmp_path):
    p = tmp_path / "train.yaml"
    p.write_text(textwrap.dedent("""\
        mixed_precision: bf16
        gradient_accumulation_steps: 2
        deepspeed:
          stage: 2
          offload_optimizer: false
    """))
    result = rewrite(str(p), "npu", soc="910A")
    assert result.config["fp16"]["enabled"] is True
    assert result.config.get("bf16", {}).get("enabled") in (False, None)
    b = rewrite(str(p), "npu", soc="910B3")
    assert b.config["bf16"]["enabled"] is True


@pytest.mark.parametrize("patch,key", [
    ({"zero_optimization": {"stage": True}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage"),
    ({"gradient_accumulation_steps": 2.5}, "gradient_accumulation_steps"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "fast"}}}, "optimizer.params.lr"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 1.5]}}}, "optimizer.params.betas"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu"),
    ({"gradient_clipping": -1.0}, "gradient_clipping"),
    ({"fp16": {"enabled": "yes"}}, "fp16.enabled"),
    ({"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1},
     "train_batch_size 7"),
])
def test_typed_keys_are_checked_naming_the_key(patch, key):
    cfg = _ds_json()
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    with pytest.raises(DeepSpeedConfigError, match=key.replace(".", r"\.")):
        rewrite(cfg, "cpu")


def test_xflux_stage_true_is_refused_not_read_as_one(tmp_path):
    p = tmp_path / "train.yaml"
    p.write_text("deepspeed:\n  stage: true\n  precision: bf16\n")
    with pytest.raises(DeepSpeedConfigError, match="deepspeed.stage"):
        rewrite(str(p), "cpu")


def test_strict_refuses_keys_deepspeed_never_reads():
    cfg = {**_ds_json(), "zero_optimisation": {"stage": 3}}
    assert any("zero_optimisation" in n for n in rewrite(cfg, "cpu").notes)
    with pytest.raises(DeepSpeedConfigError, match="zero_optimisation"):
        rewrite(cfg, "cpu", strict=True)


def test_config_generator_without_deepspeed_says_so_and_writes_nothing(tmp_path):
    target = tmp_path / "configs"
    code = ("import sys; sys.modules['deepspeed'] = None; from flux_npu.distributed.configs import main; "
            f"sys.exit(main(['--write', {str(target)!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 1
    assert "DeepSpeed" in out.stderr and "pip install" in out.stderr and "Traceback" not in out.stderr
    assert not target.exists()
