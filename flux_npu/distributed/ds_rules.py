"""The rules that rewrite a DeepSpeed config for its target, each change with its reason."""

from __future__ import annotations

from dataclasses import dataclass, field

from .ds_facts import (
    _CPU_OFFLOAD_BUILDER,
    _DEVICE_BUILDER,
    NPU_FUSED_ADAM_FIXED,
    NPU_INIT_BROKEN,
    OVERLAP_COMM_RACE_FIXED,
    SIZE_KEYS,
    UNSET,
    ZERO2_OVERLAP_NAN_FIXED,
    Change,
    DeepSpeedConfigError,
    Target,
    _delete,
    _get,
    _set,
    _true,
    _version,
)


@dataclass
class Result:
    config: dict
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    target: Target | None = None
    source: str = ""


class _Ctx:
    def __init__(self, cfg, target, strict):
        self.cfg, self.target, self.strict = cfg, target, strict
        self.changes: list[Change] = []
        self.notes: list[str] = []
        self.v = _version(target.deepspeed_version)

    def change(self, path, new, reason):
        old = _get(self.cfg, path)
        if new is UNSET:
            _delete(self.cfg, path)
        else:
            _set(self.cfg, path, new)
        self.changes.append(Change(path, old, new, reason))

    def has_builder(self, name) -> bool | None:
        b = self.target.op_builders
        return None if b is None else name in b


# -- the rules --------------------------------------------------------------------------------

def _rule_version(ctx: _Ctx):
    if ctx.target.backend == "npu" and _version(NPU_INIT_BROKEN[0]) <= ctx.v <= _version(NPU_INIT_BROKEN[1]):
        raise DeepSpeedConfigError(
            f"DeepSpeed {ctx.v} fails in init_process_group on NPU ('device' object has no attribute 'index'; "
            "fixed in 0.17.6, DeepSpeed PR #7560): install deepspeed>=0.17.6 (flux-npu is tested with 0.19.8)")


def _rule_precision(ctx: _Ctx):
    cfg, t = ctx.cfg, ctx.target
    bf16, fp16 = _get(cfg, "bf16.enabled", False), _get(cfg, "fp16.enabled", False)
    if _true(bf16) and _true(fp16):
        raise DeepSpeedConfigError("bf16.enabled and fp16.enabled are both true; DeepSpeed refuses this "
                                   "('bfloat16 and fp16 modes cannot be simultaneously enabled'): keep one")
    if t.backend != "npu":
        return
    if t.bf16 is False and _true(bf16):
        ctx.change("bf16.enabled", False, "this Ascend SoC (910A) has no bf16: fp16 with dynamic loss scaling "
                   "instead (torch.npu.is_bf16_supported() is False on 910A). Run accelerate with "
                   "mixed_precision='fp16' to match")
        ctx.change("fp16.enabled", True, "910A trains in fp16 (replaces bf16)")
        if _get(cfg, "fp16.loss_scale") is UNSET:
            ctx.change("fp16.loss_scale", 0, "0 = dynamic loss scaling (DeepSpeed fp16 docs), needed for fp16 training")
    elif t.bf16 is False and bf16 == "auto":
        ctx.notes.append("bf16.enabled is 'auto': accelerate sets it from mixed_precision; this SoC (910A) has no "
                         "bf16, so use mixed_precision='fp16'")
    elif t.bf16 is True and _true(fp16):
        ctx.notes.append("fp16 kept as written; this SoC (Atlas A2/A3) has bf16, which needs no loss scaling "
                         "(set bf16.enabled and mixed_precision='bf16' to switch)")
    elif t.bf16 is None and (_true(bf16) or bf16 == "auto"):
        ctx.notes.append("bf16 kept on the assumption that the NPU is an Atlas A2/A3 (910B/910_93); a 910A has "
                         "no bf16: pass soc='910A' (--soc 910A) to get fp16 with loss scaling")


def _rule_communication(ctx: _Ctx):
    cfg, t = ctx.cfg, ctx.target
    if t.backend == "npu" and t.bf16 is False:
        for key in ("communication_data_type", "seq_parallel_communication_data_type"):
            if str(_get(cfg, key, "")).lower() in ("bf16", "bfloat16"):
                ctx.change(key, "fp32", "HCCL on 910A has no bf16 AllReduce (Ascend HCCL docs): reduce in fp32")
    overlap = _get(cfg, "zero_optimization.overlap_comm")
    stage = _stage(cfg)
    if t.backend == "npu" and _true(overlap):
        if ctx.v < _version(OVERLAP_COMM_RACE_FIXED) and stage in (1, 2):
            ctx.change("zero_optimization.overlap_comm", False,
                       f"DeepSpeed {ctx.v} < {OVERLAP_COMM_RACE_FIXED}: ZeRO-1/2 overlap_comm buffer race gave "
                       "different losses on NPU (DeepSpeed PR #5606); upgrade to keep overlap_comm")
        elif ctx.v < _version(ZERO2_OVERLAP_NAN_FIXED) and stage == 2:
            ctx.change("zero_optimization.overlap_comm", False,
                       f"DeepSpeed {ctx.v} < {ZERO2_OVERLAP_NAN_FIXED}: ZeRO-2 overlap_comm buffer lifetime bug "
                       "gives NaN (DeepSpeed PR #7965; NaN / loss 0 reports on 910B, LlamaFactory #5627); "
                       "upgrade to keep overlap_comm")
    for key in SIZE_KEYS:
        path = f"zero_optimization.{key}"
        v = _get(cfg, path)
        if v is UNSET or v == "auto" or isinstance(v, bool):
            continue
        if isinstance(v, int):
            n = v
        else:
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise DeepSpeedConfigError(
                    f"{path} = {v!r} is not a number of elements (e.g. 5e8 or 500000000)") from None
            if f != int(f):
                raise DeepSpeedConfigError(f"{path} = {v!r} must be a whole number of elements")
            n = int(f)
            ctx.change(path, n, "an integer element count: DeepSpeed's pydantic config takes a whole float but "
                       "rejects a string such as '2e8', which is what PyYAML's safe_load makes of 2e8")
        if n <= 0:
            raise DeepSpeedConfigError(f"{path} = {v!r} must be positive")


def _stage(cfg) -> int:
    s = _get(cfg, "zero_optimization.stage", 0)
    try:
        return int(s)
    except (TypeError, ValueError):
        return 0  # 'auto' and the like: DeepSpeed's validation decides


def _offload_device(cfg, which) -> str:
    dev = _get(cfg, f"zero_optimization.{which}.device", "none")
    return "none" if dev is None else str(dev).lower()


def _rule_offload(ctx: _Ctx):
    cfg, t = ctx.cfg, ctx.target
    stage = _stage(cfg)
    if _get(cfg, "zero_optimization.offload_param") is not UNSET and stage < 3:
        dev = _offload_device(cfg, "offload_param")
        if dev != "none" and ctx.strict:
            raise DeepSpeedConfigError(
                f"zero_optimization.offload_param (device {dev!r}) only acts at ZeRO stage 3; at stage {stage} "
                "DeepSpeed accepts and ignores it. Use stage 3, or remove it (offload_optimizer is ZeRO-2's offload)")
        ctx.change("zero_optimization.offload_param", UNSET,
                   f"offload_param is a ZeRO-3 setting: at stage {stage} DeepSpeed {ctx.v} parses it and ignores "
                   "it (checked with DeepSpeedConfig), so parameters were never offloaded; removed so the config "
                   "says what runs. ZeRO-2 offload is offload_optimizer; parameter offload needs stage 3")
    if t.backend == "cpu":
        for which in ("offload_optimizer", "offload_param"):
            if _true(_get(cfg, f"zero_optimization.{which}.pin_memory")):
                ctx.change(f"zero_optimization.{which}.pin_memory", False,
                           "pinned memory needs an accelerator: on a CPU-only torch, Tensor.pin_memory() raises "
                           "'Cannot access accelerator device when none is available'")


def _rule_optimizer(ctx: _Ctx):
    cfg, t = ctx.cfg, ctx.target
    opt = _get(cfg, "optimizer")
    if not isinstance(opt, dict):
        return
    params = opt.get("params") or {}
    if "max_grad_norm" in params:
        mgn = params["max_grad_norm"]
        clip = _get(cfg, "gradient_clipping")
        if clip not in (UNSET, "auto") and float(clip) != float(mgn):
            raise DeepSpeedConfigError(
                f"optimizer.params.max_grad_norm={mgn} and gradient_clipping={clip} disagree; DeepSpeed rejects "
                "max_grad_norm as an optimizer parameter (engine.py): keep only gradient_clipping")
        ctx.change("optimizer.params.max_grad_norm", UNSET, "DeepSpeed raises on max_grad_norm as an optimizer "
                   "parameter ('please switch to using the deepspeed parameter gradient_clipping', engine.py)")
        if clip in (UNSET, "auto"):
            ctx.change("gradient_clipping", float(mgn), "moved from optimizer.params.max_grad_norm")
    name = str(opt.get("type", "")).strip()
    lname = name.lower()
    if not name:
        raise DeepSpeedConfigError("optimizer block without a 'type': name one (AdamW, Adam, Lion, ...) or remove the "
                                   "block to use the optimizer your script builds")
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    if lname not in DEEPSPEED_OPTIMIZERS and not hasattr(torch.optim, name):
        raise DeepSpeedConfigError(
            f"optimizer type {name!r} is neither a DeepSpeed optimizer ({', '.join(DEEPSPEED_OPTIMIZERS)}) nor a "
            f"torch.optim class, so DeepSpeed {ctx.v} fails at initialize (engine.py falls back to "
            "getattr(torch.optim, type)). Use AdamW, or build the optimizer in your script")
    offload = _offload_device(cfg, "offload_optimizer") in ("cpu", "nvme") and _stage(cfg) >= 1
    if lname in ("adam", "adamw") and not _true(params.get("torch_adam")) and not offload:
        reason = None
        if t.backend == "npu" and ctx.v < _version(NPU_FUSED_ADAM_FIXED):
            reason = (f"DeepSpeed {ctx.v} < {NPU_FUSED_ADAM_FIXED}: the NPU FusedAdam had an accuracy bug "
                      "(DeepSpeed PR #5777); torch.optim.AdamW instead")
        elif ctx.has_builder("FusedAdamBuilder") is False:
            reason = f"DeepSpeed's {t.backend} accelerator has no FusedAdam builder: torch.optim.AdamW instead"
        elif t.backend == "cpu":
            reason = ("DeepSpeed's CPU FusedAdam is a C++ extension compiled on first use (op_builder/cpu/"
                      "fused_adam.py); torch.optim.AdamW needs no build and is what runs on CPU")
        if reason:
            ctx.change("optimizer.params.torch_adam", True, reason)
        elif t.backend == "npu":
            ctx.notes.append("optimizer Adam/AdamW runs as DeepSpeed's NPU FusedAdam (torch_npu.npu_apply_adam_w)")
    builder = (_CPU_OFFLOAD_BUILDER if offload else _DEVICE_BUILDER).get(lname)
    torch_adam = lname in ("adam", "adamw") and _true(_get(cfg, "optimizer.params.torch_adam"))
    if builder and ctx.has_builder(builder) is False and not torch_adam:
        fix = ("set zero_optimization.offload_optimizer.device='cpu' (DeepSpeed has a CPU Lion) or " if lname == "lion"
               and not offload else "")
        raise DeepSpeedConfigError(
            f"optimizer {name!r} needs DeepSpeed's {builder}, which DeepSpeed {ctx.v}'s {t.backend} accelerator does "
            f"not have (it resolves to NotImplementedBuilder and fails at initialize; DeepSpeed issue #8626): "
            f"{fix}use AdamW, or build the optimizer in your script")


def _rule_zeropp(ctx: _Ctx):
    cfg, t = ctx.cfg, ctx.target
    used = [k for k in ("zero_quantized_weights", "zero_quantized_gradients")
            if _true(_get(cfg, f"zero_optimization.{k}"))]
    hpz = _get(cfg, "zero_optimization.zero_hpz_partition_size", 1)
    if used and ctx.has_builder("QuantizerBuilder") is False:
        raise DeepSpeedConfigError(
            f"ZeRO++ {', '.join(used)} need DeepSpeed's QuantizerBuilder, which DeepSpeed {ctx.v}'s {t.backend} "
            "accelerator does not have (NotImplementedBuilder at initialize; DeepSpeed issue #8626): set them "
            "false, or upgrade DeepSpeed to a release whose NPU op builders include the quantizer")
    if (used or (isinstance(hpz, int) and hpz > 1)) and _stage(cfg) != 3:
        ctx.notes.append("ZeRO++ (zero_quantized_*, zero_hpz_partition_size) acts only at ZeRO stage 3")


def _rule_clipping(ctx: _Ctx):
    clip = _get(ctx.cfg, "gradient_clipping")
    if clip in (UNSET, "auto", None):
        return
    try:
        value = float(clip)
    except (TypeError, ValueError):
        raise DeepSpeedConfigError(f"gradient_clipping = {clip!r} must be a number (0 disables clipping)") from None
    if value < 0:
        raise DeepSpeedConfigError(f"gradient_clipping = {clip!r} must be >= 0 (0 disables clipping)")


RULES = (
    ("version", _rule_version, "NPU: refuse DeepSpeed 0.17.3-0.17.5 (init_process_group failure, PR #7560)"),
    ("precision", _rule_precision, "bf16 xor fp16; NPU 910A: bf16 -> fp16 + dynamic loss scaling"),
    ("communication", _rule_communication, "NPU: overlap_comm off on DeepSpeed < 0.14.3 (race) / ZeRO-2 < 0.19.0 "
     "(NaN); 910A: bf16 communication -> fp32; bucket sizes -> integers"),
    ("offload", _rule_offload, "offload_param below ZeRO-3 removed (DeepSpeed ignores it); CPU: no pinned memory"),
    ("optimizer", _rule_optimizer, "max_grad_norm -> gradient_clipping; unknown types refused; FusedAdam -> "
     "torch AdamW where the fused one is broken/absent; Lion/Lamb need their builders"),
    ("zero++", _rule_zeropp, "quantized weights/gradients need the accelerator's QuantizerBuilder"),
    ("gradient_clipping", _rule_clipping, "a number >= 0"),
)
