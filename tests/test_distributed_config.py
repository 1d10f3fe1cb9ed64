"""flux_npu.distributed.deepspeed_config: every rule on real-world configs, validation by DeepSpeed's
own DeepSpeedConfig, clear errors for configs that cannot work, the configs/ generator, the CLI."""

import json
import os

import pytest

from flux_npu.distributed import UNSET, DeepSpeedConfigError, deepspeed_config, rewrite, validate
from flux_npu.distributed import configs as gen

HERE = os.path.dirname(__file__)
DATA = os.path.join(HERE, "data", "ds_configs")
REPO = os.path.dirname(HERE)
FLUXKITS = os.path.join(DATA, "fluxkits_lora.yaml")
HF_ZERO2 = os.path.join(DATA, "hf_zero2_offload.json")

# The op builders of DeepSpeed's NPU accelerator before the NPU FusedLamb / FusedLion / Quantizer
# were added (DeepSpeed issue #8626, PR #8627): what older targets have.
OLD_NPU_BUILDERS = frozenset({"AsyncIOBuilder", "CPUAdagradBuilder", "CPUAdamBuilder", "CPULionBuilder",
                              "FusedAdamBuilder", "InferenceBuilder", "PinMemoryBuilder"})


def by_path(changes):
    out = {}
    for c in changes:
        out.setdefault(c.path, []).append(c)
    return out


def test_fluxkits_training_yaml_for_npu_every_change():
    result = rewrite(FLUXKITS, "npu", soc="910B3", world_size=16)
    cfg, changes = result.config, by_path(result.changes)
    assert cfg == {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": 2, "allgather_bucket_size": 20_000_000, "reduce_bucket_size": 200_000_000,
                              "contiguous_gradients": True, "overlap_comm": True},
    }
    # the translated keys, each a change with its source key named
    for path, src in [("zero_optimization.stage", "deepspeed.stage"), ("bf16.enabled", "deepspeed.precision"),
                      ("zero_optimization.overlap_comm", "deepspeed.overlap_comm"),
                      ("zero_optimization.offload_param.device", "deepspeed.offload_parameters")]:
        assert src in changes[path][0].reason
    # YAML numbers become integer element counts
    assert [(c.old, c.new) for c in changes["zero_optimization.reduce_bucket_size"]][-1] == (2e8, 200_000_000)
    # offload_parameters at stage 2 did nothing in DeepSpeed: removed, and said so
    (removed,) = changes["zero_optimization.offload_param"]
    assert removed.old == {"device": "cpu"} and removed.new is UNSET and "ZeRO-3" in removed.reason
    assert changes["gradient_clipping"][0].new == 1.0 and "max_grad_norm" in changes["gradient_clipping"][0].reason
    assert not result.notes  # the SoC was given: nothing assumed


def test_fluxkits_section_as_dictconfig_is_applied_not_ignored():
    from omegaconf import OmegaConf

    section = OmegaConf.load(FLUXKITS).deepspeed  # what FluxKits hands to accelerate.DeepSpeedPlugin
    cfg, changes = deepspeed_config(section, "npu", soc="910B")
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 200_000_000
    assert "offload_param" not in cfg["zero_optimization"]
    assert cfg["gradient_accumulation_steps"] == "auto"  # no training YAML around it: accelerate fills it
    ds = validate(cfg)
    assert ds.zero_optimization_stage == 2 and ds.bfloat16_config.enabled


def test_fluxkits_on_910a_with_old_deepspeed():
    result = rewrite(FLUXKITS, "npu", soc="910A", deepspeed_version="0.16.0")
    cfg, changes = result.config, by_path(result.changes)
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"] == {"enabled": True, "loss_scale": 0}
    assert "910A" in changes["bf16.enabled"][-1].reason
    (overlap,) = [c for c in changes["zero_optimization.overlap_comm"] if c.old is True]
    assert overlap.new is False and "#7965" in overlap.reason


def test_strict_refuses_offload_param_below_stage3():
    with pytest.raises(DeepSpeedConfigError, match="only acts at ZeRO stage 3"):
        rewrite(FLUXKITS, "npu", soc="910B", strict=True)


def test_training_yaml_precision_mismatch_is_an_error(tmp_path):
    text = open(FLUXKITS).read().replace('mixed_precision: "bf16"', 'mixed_precision: "fp16"')
    p = tmp_path / "mismatch.yaml"
    p.write_text(text)
    with pytest.raises(DeepSpeedConfigError, match="disagree"):
        rewrite(str(p), "npu", soc="910B")


def test_hf_zero2_offload_on_cpu_and_npu():
    cpu = rewrite(HF_ZERO2, "cpu")
    changes = by_path(cpu.changes)
    assert cpu.config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert "accelerator" in changes["zero_optimization.offload_optimizer.pin_memory"][0].reason
    assert set(changes) == {"zero_optimization.offload_optimizer.pin_memory", "zero_optimization.reduce_bucket_size",
                            "zero_optimization.allgather_bucket_size"}
    npu = rewrite(HF_ZERO2, "npu", soc="910B")
    assert npu.config["zero_optimization"]["offload_optimizer"]["pin_memory"] is True  # NPU has pinned memory
    assert {c.path for c in npu.changes} == {"zero_optimization.reduce_bucket_size",
                                             "zero_optimization.allgather_bucket_size"}
    # a user's key we know nothing about passes through
    cfg, _ = deepspeed_config(dict(json.load(open(HF_ZERO2)), my_team_key={"x": 1}), "npu", soc="910B")
    assert cfg["my_team_key"] == {"x": 1}


def test_old_deepspeed_on_npu_disables_overlap_and_fused_adam():
    cfg = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "zero_optimization": {"stage": 1, "overlap_comm": True}}
    result = rewrite(cfg, "npu", soc="910B", deepspeed_version="0.14.0")
    changes = by_path(result.changes)
    assert result.config["zero_optimization"]["overlap_comm"] is False and "#5606" in \
        changes["zero_optimization.overlap_comm"][0].reason
    assert result.config["optimizer"]["params"]["torch_adam"] is True
    assert "#5777" in changes["optimizer.params.torch_adam"][0].reason
    # with a fixed DeepSpeed both stay, and the user's input was not modified
    fixed = rewrite(cfg, "npu", soc="910B", deepspeed_version="0.19.8")
    assert fixed.changes == [] and fixed.config["zero_optimization"]["overlap_comm"] is True
    assert cfg["zero_optimization"]["overlap_comm"] is True and "torch_adam" not in cfg["optimizer"]["params"]


@pytest.mark.parametrize("version", ["0.17.3", "0.17.5"])
def test_npu_init_broken_versions_refused(version):
    with pytest.raises(DeepSpeedConfigError, match="0.17.6"):
        rewrite({"train_micro_batch_size_per_gpu": 1}, "npu", deepspeed_version=version)


def test_cuda_keeps_what_npu_would_change():
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2, "overlap_comm": True}}
    assert rewrite(cfg, "cuda", deepspeed_version="0.16.0").changes == []


def test_adam_on_cpu_uses_torch_adamw():
    cfg = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
           "zero_optimization": {"stage": 2}}
    (c,) = rewrite(cfg, "cpu").changes
    assert (c.path, c.old, c.new) == ("optimizer.params.torch_adam", UNSET, True) and "compiled" in c.reason


def test_max_grad_norm_moves_to_gradient_clipping():
    cfg = {"train_micro_batch_size_per_gpu": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "max_grad_norm": 0.5}}}
    out, changes = deepspeed_config(cfg, "cuda")
    assert out["gradient_clipping"] == 0.5 and "max_grad_norm" not in out["optimizer"]["params"]
    assert {c.path for c in changes} == {"optimizer.params.max_grad_norm", "gradient_clipping"}
    with pytest.raises(DeepSpeedConfigError, match="disagree"):
        deepspeed_config(dict(cfg, gradient_clipping=1.0), "cuda")


def test_lamb_lion_zeropp_need_their_builders_on_old_npu():
    base = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}
    with pytest.raises(DeepSpeedConfigError, match="FusedLambBuilder.*#8626"):
        rewrite(dict(base, optimizer={"type": "Lamb", "params": {"lr": 1e-3}}), "npu", op_builders=OLD_NPU_BUILDERS)
    with pytest.raises(DeepSpeedConfigError, match="offload_optimizer.device='cpu'"):
        rewrite(dict(base, optimizer={"type": "Lion", "params": {"lr": 1e-4}}), "npu", op_builders=OLD_NPU_BUILDERS)
    # Lion with CPU offload runs DeepSpeedCPULion, which NPU has
    lion_offload = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Lion", "params": {"lr": 1e-4}},
                    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert rewrite(lion_offload, "npu", soc="910B", op_builders=OLD_NPU_BUILDERS).changes == []
    zpp = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "zero_quantized_weights": True}}
    with pytest.raises(DeepSpeedConfigError, match="QuantizerBuilder"):
        rewrite(zpp, "npu", op_builders=OLD_NPU_BUILDERS)


def test_installed_deepspeed_builders_are_probed():
    """The installed DeepSpeed decides: its NPU builders include Lamb/Lion/Quantizer (code wins over
    older notes); its CPU accelerator has no quantizer, so ZeRO++ quantization is refused on cpu."""
    t = rewrite({"train_micro_batch_size_per_gpu": 1}, "npu", soc="910B").target
    assert {"FusedLambBuilder", "FusedLionBuilder", "QuantizerBuilder", "FusedAdamBuilder"} <= t.op_builders
    lamb = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Lamb", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": 2}}
    assert rewrite(lamb, "npu", soc="910B").changes == []
    zpp = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "zero_quantized_gradients": True}}
    with pytest.raises(DeepSpeedConfigError, match="QuantizerBuilder.*cpu"):
        rewrite(zpp, "cpu")


def test_910a_bf16_communication_becomes_fp32():
    cfg = {"train_micro_batch_size_per_gpu": 1, "communication_data_type": "bf16", "bf16": {"enabled": True}}
    out, changes = deepspeed_config(cfg, "npu", soc="910A")
    assert out["communication_data_type"] == "fp32" and out["fp16"]["enabled"] is True
    assert "bf16 AllReduce" in by_path(changes)["communication_data_type"][0].reason


@pytest.mark.parametrize("cfg, match", [
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both true"),
    ({"optimizer": {"type": "OneBitAdam", "params": {}}}, "neither a DeepSpeed optimizer"),
    ({"optimizer": {"params": {"lr": 1}}}, "without a 'type'"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "lots"}}, "not a number"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": 2.5}}, "whole number"),
    ({"gradient_clipping": -1}, ">= 0"),
    ({"zero_optimization": {"stage": 2, "bogus_knob": 1}}, "(?s)DeepSpeed .* rejects the config.*bogus_knob"),
])
def test_bad_configs_get_clear_errors(cfg, match):
    with pytest.raises(DeepSpeedConfigError, match=match):
        rewrite(dict(cfg, train_micro_batch_size_per_gpu=1), "cuda")


def test_string_bucket_size_from_pyyaml_is_converted():
    out, changes = deepspeed_config({"train_micro_batch_size_per_gpu": 1,
                                     "zero_optimization": {"stage": 2, "reduce_bucket_size": "2e8"}}, "cuda")
    assert out["zero_optimization"]["reduce_bucket_size"] == 200_000_000 and changes[0].old == "2e8"


def test_batch_arithmetic_checked_for_the_world_size():
    cfg = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}
    validate(cfg, world_size=8)
    with pytest.raises(DeepSpeedConfigError, match="world size 2"):
        validate(cfg, world_size=2)


def test_unknown_xflux_key_and_bad_input():
    with pytest.raises(DeepSpeedConfigError, match="unknown key"):
        rewrite({"stage": 2, "precision": "bf16", "offload_everything": True}, "npu")
    with pytest.raises(FileNotFoundError):
        rewrite("/nonexistent/ds.json", "npu")
    with pytest.raises(DeepSpeedConfigError, match="unknown backend"):
        rewrite({"train_micro_batch_size_per_gpu": 1}, "tpu")
    with pytest.raises(TypeError, match="must be a dict"):
        rewrite(42, "npu")


def test_committed_configs_match_the_generator_and_validate():
    configs = os.path.join(REPO, "flux_npu", "data", "configs")  # shipped in the package; configs/ links here
    assert os.path.samefile(configs, os.path.join(REPO, "configs")) and os.path.samefile(configs, gen.SHIPPED)
    assert gen.check(configs) == []
    from accelerate.commands.config.config_args import load_config_from_file

    names = sorted(gen.render())
    assert [n for n in names if n.endswith(".json")] == ["ds_zero2_bf16_full.json", "ds_zero2_bf16_lora.json"]
    for name in names:
        path = os.path.join(configs, name)
        if name.endswith(".json"):
            cfg = json.load(open(path))
            ds = validate(cfg)
            assert ds.zero_optimization_stage == 2 and ds.bfloat16_config.enabled
            # one file for both: a fixed point of the rules for each, on the installed and the minimum DeepSpeed
            for version in (None, gen.MIN_DEEPSPEED):
                assert rewrite(path, "npu", soc="910B", deepspeed_version=version).changes == []
                assert rewrite(path, "cuda", deepspeed_version=version).changes == []
            # what a 910A needs is applied for it at launch, not shipped as a copy
            assert rewrite(path, "npu", soc="910A").config["fp16"]["enabled"] is True
        else:
            acc = load_config_from_file(path)
            assert acc.distributed_type == "DEEPSPEED" and acc.mixed_precision == "bf16"
            ds_file = acc.deepspeed_config["deepspeed_config_file"]
            assert os.path.isfile(os.path.join(REPO, ds_file)), ds_file


def test_generator_check_detects_drift(tmp_path):
    gen.write(str(tmp_path))
    assert gen.check(str(tmp_path)) == []
    victim = tmp_path / "ds_zero2_bf16_lora.json"
    victim.write_text(victim.read_text().replace("200000000", "300000000"))
    (tmp_path / "ds_zero2_bf16_lora_npu.json").write_text("{}")  # a copy the generator no longer makes
    assert gen.check(str(tmp_path)) == ["ds_zero2_bf16_lora.json", "ds_zero2_bf16_lora_npu.json"]
    assert gen.main(["--check", str(tmp_path)]) == 1


def test_cli_ds_config(tmp_path, capsys):
    from flux_npu.cli import main

    out = tmp_path / "out.json"
    assert main(["ds-config", FLUXKITS, "--backend", "npu", "--soc", "910B", "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert "zero_optimization.offload_param" in table and "ZeRO-3" in table
    assert json.load(open(out)) == rewrite(FLUXKITS, "npu", soc="910B").config
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
                               "fp16": {"enabled": True}}))
    assert main(["ds-config", str(bad), "--backend", "cuda"]) == 1
    assert "both true" in capsys.readouterr().err


def test_accelerate_ignores_a_dictconfig_unless_fixed():
    """accelerate 1.15 silently replaces a DictConfig DeepSpeed block by its defaults; under
    flux-npu run (accelerate_fix) the block is converted and applied, and undo restores accelerate."""
    from accelerate import DeepSpeedPlugin
    from omegaconf import OmegaConf

    import flux_npu
    from flux_npu.distributed import accelerate_fix

    section = OmegaConf.load(FLUXKITS).deepspeed
    plain = DeepSpeedPlugin(hf_ds_config=section).deepspeed_config
    assert "reduce_bucket_size" not in plain["zero_optimization"] and "bf16" not in plain  # ignored
    original = DeepSpeedPlugin.__dict__["__post_init__"]
    handle = flux_npu.patch(backend="cpu", targets=[])
    try:
        accelerate_fix.install(handle)
        fixed = DeepSpeedPlugin(hf_ds_config=section).deepspeed_config
        assert fixed["zero_optimization"]["reduce_bucket_size"] == 200_000_000
        assert fixed["zero_optimization"]["allgather_bucket_size"] == 20_000_000
        assert fixed["bf16"] == {"enabled": True} and "offload_param" not in fixed["zero_optimization"]
        ds_dict = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}}
        assert DeepSpeedPlugin(hf_ds_config=ds_dict).deepspeed_config["zero_optimization"] == {"stage": 1}
    finally:
        handle.undo()
    assert DeepSpeedPlugin.__dict__["__post_init__"] is original


def test_unread_top_level_key_is_noted():
    result = rewrite({"train_micro_batch_size_per_gpu": 1, "zero_optimisation": {"stage": 2}}, "cuda")
    assert result.config["zero_optimisation"] == {"stage": 2}  # kept as written
    assert any("zero_optimisation" in n and "typo" in n for n in result.notes)
    assert rewrite(HF_ZERO2, "cuda").notes == []
