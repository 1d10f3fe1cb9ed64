"""Types and ranges of the DeepSpeed keys users write, checked before any rule runs, so that a
refusal names the key (DeepSpeed's own validation reports many of these without the key, and
accepts some that then misbehave: `stage: true` is ZeRO-1, `gradient_accumulation_steps: 2.5`).

Each entry: dotted path -> (kind, low, high); kinds: "int" (not a bool), "number", "bool",
"choice" (low = the allowed values), "betas" (two numbers in [0, 1)). "auto" (filled in by
accelerate) is accepted wherever DeepSpeed takes it.
"""

from __future__ import annotations

import math

from .ds_facts import UNSET, DeepSpeedConfigError, _get

AUTO_OK = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
           "optimizer.params.lr", "optimizer.params.weight_decay", "optimizer.params.betas", "optimizer.params.eps",
           "bf16.enabled", "fp16.enabled", "zero_optimization.stage", "scheduler.params.warmup_min_lr",
           "scheduler.params.warmup_max_lr", "scheduler.params.warmup_num_steps", "scheduler.params.total_num_steps"}
# bucket and threshold sizes (SIZE_KEYS) are checked and converted by ds_rules (YAML writes 2e8 as a string)

SPEC = {
    "train_batch_size": ("int", 1, None),
    "train_micro_batch_size_per_gpu": ("int", 1, None),
    "gradient_accumulation_steps": ("int", 1, None),
    "gradient_clipping": ("number", 0, None),
    "steps_per_print": ("int", 1, None),
    "wall_clock_breakdown": ("bool", None, None),
    "zero_allow_untested_optimizer": ("bool", None, None),
    "zero_optimization.stage": ("int", 0, 3),
    "zero_optimization.overlap_comm": ("bool", None, None),
    "zero_optimization.contiguous_gradients": ("bool", None, None),
    "zero_optimization.reduce_scatter": ("bool", None, None),
    "zero_optimization.allgather_partitions": ("bool", None, None),
    "zero_optimization.round_robin_gradients": ("bool", None, None),
    "zero_optimization.offload_optimizer.device": ("choice", ("cpu", "nvme", "none"), None),
    "zero_optimization.offload_param.device": ("choice", ("cpu", "nvme", "none"), None),
    "zero_optimization.offload_optimizer.pin_memory": ("bool", None, None),
    "zero_optimization.offload_param.pin_memory": ("bool", None, None),
    "bf16.enabled": ("bool", None, None),
    "fp16.enabled": ("bool", None, None),
    "fp16.loss_scale": ("number", 0, None),
    "fp16.initial_scale_power": ("int", 0, 64),
    "fp16.loss_scale_window": ("int", 1, None),
    "fp16.hysteresis": ("int", 1, None),
    "fp16.min_loss_scale": ("number", 0, None),
    "optimizer.type": ("str", None, None),
    "optimizer.params.lr": ("number", 0, None),
    "optimizer.params.weight_decay": ("number", 0, None),
    "optimizer.params.eps": ("number", 0, None),
    "optimizer.params.betas": ("betas", None, None),
    "scheduler.type": ("str", None, None),
    "scheduler.params.warmup_min_lr": ("number", 0, None),
    "scheduler.params.warmup_max_lr": ("number", 0, None),
    "scheduler.params.warmup_num_steps": ("int", 0, None),
    "scheduler.params.total_num_steps": ("int", 1, None),
}

_KIND_TEXT = {"int": "a whole number", "number": "a number", "bool": "true or false", "str": "a name",
              "betas": "two numbers in [0, 1), e.g. [0.9, 0.999]"}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad(path, value, kind, lo, hi) -> str | None:
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = _is_number(value)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str) and bool(value.strip())
    elif kind == "choice":
        ok = isinstance(value, str) and value.lower() in lo
        if not ok:
            return f"{path} = {value!r}: expected one of {', '.join(lo)}"
        return None
    else:  # betas
        ok = (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(b) and 0 <= b < 1
                                                                             for b in value))
    if not ok:
        return f"{path} = {value!r}: expected {_KIND_TEXT[kind]}, got {type(value).__name__}"
    if kind in ("int", "number"):
        if lo is not None and value < lo:
            return f"{path} = {value!r}: must be >= {lo}"
        if hi is not None and value > hi:
            return f"{path} = {value!r}: must be <= {hi}"
    return None


def check_types(cfg: dict, source: str = "the config") -> None:
    """Raise DeepSpeedConfigError naming the first key whose value has the wrong type or range, and
    refuse batch sizes that cannot multiply up (train_batch_size = micro-batch x accumulation x
    world size, so the first must be a multiple of the other two)."""
    problems = []
    for path, (kind, lo, hi) in SPEC.items():
        value = _get(cfg, path)
        if value is UNSET or (value == "auto" and path in AUTO_OK):
            continue
        why = _bad(path, value, kind, lo, hi)
        if why:
            problems.append(why)
    if problems:
        raise DeepSpeedConfigError(f"{source}: " + "; ".join(problems))
    tb, mb, gas = (cfg.get(k, UNSET) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                "gradient_accumulation_steps"))
    if isinstance(tb, int) and isinstance(mb, int) and tb % (mb * (gas if isinstance(gas, int) else 1)):
        per_step = mb * (gas if isinstance(gas, int) else 1)
        raise DeepSpeedConfigError(
            f"{source}: train_batch_size {tb} is not a multiple of train_micro_batch_size_per_gpu {mb}"
            + (f" x gradient_accumulation_steps {gas}" if isinstance(gas, int) else "")
            + f" = {per_step}: it must equal that times the world size; fix one, or set train_batch_size to 'auto'")
