"""The x-flux / FluxKits `deepspeed:` section of a training YAML, converted to a DeepSpeed config."""

from __future__ import annotations

from typing import Any

from .ds_facts import (
    UNSET,
    Change,
    DeepSpeedConfigError,
    _set,
)

# -- the x-flux / FluxKits `deepspeed:` section ------------------------------------------------
# FluxKits' training YAMLs (flux-npu/train_configs/lora.yaml) carry a `deepspeed:` block whose keys
# are PyTorch Lightning DeepSpeedStrategy argument names, not DeepSpeed's, and hand it as a
# DictConfig to `accelerate.DeepSpeedPlugin(...)`, which does not read it.
_XFLUX_ZERO_KEYS = ("allgather_bucket_size", "reduce_bucket_size", "contiguous_gradients", "overlap_comm",
                    "allgather_partitions", "reduce_scatter", "sub_group_size", "round_robin_gradients")
_XFLUX_KEYS = set(_XFLUX_ZERO_KEYS) | {
    "precision", "stage", "offload_parameters", "offload_optimizer", "offload_params_device",
    "offload_optimizer_device", "pin_memory", "nvme_path", "zero_allow_untested_optimizer",
    "logging_batch_size_per_gpu", "zero_optimization",
}
# Keys only a DeepSpeed config has at its top level (x-flux YAMLs have their own train_batch_size,
# gradient_accumulation_steps: those do not tell the two apart).
_DS_TOP_KEYS = {"zero_optimization", "train_micro_batch_size_per_gpu", "bf16", "fp16", "optimizer", "scheduler"}


def is_xflux_section(d: dict) -> bool:
    return isinstance(d, dict) and bool({"precision", "stage", "offload_parameters", "offload_optimizer"} & set(d)) \
        and not isinstance(d.get("zero_optimization"), dict)


def _precision_flags(p) -> tuple[bool, bool]:
    s = str(p).lower()
    if s in ("bf16", "bf16-mixed", "bf16-true", "bfloat16"):
        return False, True
    if s in ("16", "fp16", "16-mixed", "16-true", "float16", "half"):
        return True, False
    if s in ("32", "fp32", "32-true", "float32", "no"):
        return False, False
    raise DeepSpeedConfigError(f"deepspeed.precision {p!r} is not one of bf16, fp16 (16), fp32 (32)")


def _whole(value, name, lo, hi) -> int:
    """An integer setting of the YAML, checked (a bool or 2.5 is refused naming the key, not rounded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise DeepSpeedConfigError(f"{name} = {value!r}: expected a whole number {rng}")
    return value


def convert_xflux(section: dict, top: dict | None, changes: list[Change]) -> dict:
    """The x-flux / FluxKits `deepspeed:` section (+ the training YAML's top level, when given:
    gradient_accumulation_steps, max_grad_norm, mixed_precision) -> a DeepSpeed dict."""
    unknown = sorted(set(section) - _XFLUX_KEYS)
    if unknown:
        raise DeepSpeedConfigError(
            f"unknown key(s) {unknown} in the x-flux-style deepspeed section; known: {sorted(_XFLUX_KEYS)}. "
            "Write a DeepSpeed JSON instead, or remove them")
    why = ("x-flux/FluxKits `deepspeed:` key (a Lightning DeepSpeedStrategy name) written as DeepSpeed's key; "
           "accelerate's DeepSpeedPlugin would not read it")
    out: dict[str, Any] = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    zero: dict[str, Any] = {}

    def put(src, dst_path, value):
        _set(out, dst_path, value)
        changes.append(Change(dst_path, UNSET, value, f"from deepspeed.{src}={section[src]!r}: {why}"))

    changes.append(Change("train_micro_batch_size_per_gpu", UNSET, "auto",
                          "accelerate fills 'auto' from the prepared DataLoader (accelerate/accelerator.py)"))
    out["zero_optimization"] = zero
    if "stage" in section:
        put("stage", "zero_optimization.stage", _whole(section["stage"], "deepspeed.stage", 0, 3))
    if "precision" in section:
        fp16, bf16 = _precision_flags(section["precision"])
        put("precision", "bf16.enabled", bf16)
        put("precision", "fp16.enabled", fp16)
    if section.get("offload_optimizer"):
        put("offload_optimizer", "zero_optimization.offload_optimizer.device",
            section.get("offload_optimizer_device", "cpu"))
    if section.get("offload_parameters"):
        put("offload_parameters", "zero_optimization.offload_param.device", section.get("offload_params_device", "cpu"))
    for k in ("pin_memory", "nvme_path"):
        if k in section:
            for sub in ("offload_optimizer", "offload_param"):
                if sub in zero:
                    put(k, f"zero_optimization.{sub}.{k}", section[k])
    for k in _XFLUX_ZERO_KEYS:
        if k in section:
            put(k, f"zero_optimization.{k}", section[k])
    if "zero_allow_untested_optimizer" in section:
        put("zero_allow_untested_optimizer", "zero_allow_untested_optimizer",
            bool(section["zero_allow_untested_optimizer"]))
    if "logging_batch_size_per_gpu" in section:
        changes.append(Change("deepspeed.logging_batch_size_per_gpu", section["logging_batch_size_per_gpu"], UNSET,
                              "Lightning-only logging setting with no DeepSpeed meaning; the micro-batch "
                              "comes from the DataLoader"))
    gas_from = "the training YAML's gradient_accumulation_steps" if top and "gradient_accumulation_steps" in top \
        else "'auto': accelerate fills it from Accelerator(gradient_accumulation_steps=...)"
    if top:
        if "gradient_accumulation_steps" in top:
            out["gradient_accumulation_steps"] = _whole(top["gradient_accumulation_steps"],
                                                        "gradient_accumulation_steps", 1, None)
        if top.get("max_grad_norm") is not None:
            mgn = top["max_grad_norm"]
            if isinstance(mgn, bool) or not isinstance(mgn, (int, float)) or mgn < 0:
                raise DeepSpeedConfigError(f"max_grad_norm = {mgn!r} in the training YAML: expected a number >= 0")
            out["gradient_clipping"] = float(mgn)
            changes.append(Change("gradient_clipping", UNSET, out["gradient_clipping"],
                                  "taken from the training YAML's max_grad_norm"))
        mp = top.get("mixed_precision")
        if mp is not None and "precision" not in section:
            # accelerate's mixed_precision decides the DeepSpeed precision when the section names
            # none: carried here so the target's rules (910A: no bf16) see it
            fp16, bf16 = _precision_flags(mp)
            for key, on in (("bf16.enabled", bf16), ("fp16.enabled", fp16)):
                _set(out, key, on)
                changes.append(Change(key, UNSET, on, f"from the training YAML's mixed_precision={mp!r} (the "
                                                      "deepspeed: section names no precision)"))
        if mp is not None and "precision" in section:
            want = _precision_flags(mp)
            if want != _precision_flags(section["precision"]):
                raise DeepSpeedConfigError(
                    f"mixed_precision {mp!r} and deepspeed.precision {section['precision']!r} disagree; accelerate "
                    "raises on this mismatch (DeepSpeedPlugin.set_mixed_precision): make them the same")
    changes.append(Change("gradient_accumulation_steps", UNSET, out["gradient_accumulation_steps"], gas_from))
    return out
