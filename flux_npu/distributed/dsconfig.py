"""Rewrite a DeepSpeed config for the backend it will run on, explaining every change.

`deepspeed_config(config, backend)` takes a DeepSpeed dict, a JSON/YAML path, an OmegaConf
DictConfig, the `deepspeed:` section of an x-flux / FluxKits training YAML, or such a whole YAML,
and returns `(new_config, changes)`, each change a `Change(path, old, new, reason)`. Rules:

- never drop a user's setting silently: keys we do not know pass through untouched (DeepSpeed's own
  config class then judges them); whatever we change or remove is a Change with its reason; a
  combination that cannot work raises `DeepSpeedConfigError` naming the problem and the fix;
- every rule cites where its reason comes from (DeepSpeed source or issue, Ascend documentation,
  /work/shared/torch_npu/DISTRIBUTED.md). Where a documented fact and the installed DeepSpeed
  disagree, the installed code wins: op support is probed from the installed op builders;
- the result is validated with DeepSpeed's own `DeepSpeedConfig` (see `validate`).
"""

from __future__ import annotations

import copy
import logging

# The parts live in ds_facts / ds_load / ds_xflux / ds_rules; their public names are names of this
# module too (`from flux_npu.distributed.dsconfig import load_config` keeps working).
from .ds_facts import (  # noqa: F401
    NPU_FUSED_ADAM_FIXED,
    NPU_INIT_BROKEN,
    OVERLAP_COMM_RACE_FIXED,
    SIZE_KEYS,
    UNSET,
    ZERO2_OVERLAP_NAN_FIXED,
    Change,
    DeepSpeedConfigError,
    Target,
    _get,
    accelerator_op_builders,
    installed_deepspeed_version,
    soc_supports_bf16,
)
from .ds_load import MAX_CONFIG_BYTES, MAX_DEPTH, MAX_NODES, MAX_STRING, check_structure, load_config  # noqa: F401
from .ds_rules import RULES, Result, _Ctx
from .ds_types import check_types
from .ds_xflux import _DS_TOP_KEYS, convert_xflux, is_xflux_section

logger = logging.getLogger("flux_npu")


def rewrite(config, backend=None, *, deepspeed_version=None, bf16=None, soc=None, strict=False,
            validate_result=True, world_size=None, op_builders=None) -> Result:
    """The full form of `deepspeed_config`: returns a Result with config, changes, notes, target."""
    data, source = load_config(config)
    changes: list[Change] = []
    notes: list[str] = []
    if is_accelerate_config(data):
        data, source = _from_accelerate(data, source, config, notes)
    if isinstance(data.get("deepspeed"), dict) and not (_DS_TOP_KEYS & set(data)):
        top = {k: v for k, v in data.items() if k != "deepspeed"}
        data = convert_xflux(data["deepspeed"], top, changes)
        source += " (training YAML, deepspeed: section)"
    elif is_xflux_section(data):
        data = convert_xflux(data, None, changes)
        source += " (x-flux-style deepspeed section)"
    check_types(data, source)
    target = Target.resolve(backend, deepspeed_version, bf16, soc, op_builders)
    ctx = _Ctx(data, target, strict)
    for _, rule, _ in RULES:
        rule(ctx)
    result = Result(ctx.cfg, changes + ctx.changes, notes + ctx.notes, target, source)
    if validate_result:
        validate(result.config, world_size=world_size)
        unread = unread_top_level_keys(result.config)
        if unread and strict:
            raise DeepSpeedConfigError(f"DeepSpeed {installed_deepspeed_version()} does not read top-level key(s) "
                                       f"{', '.join(unread)} of {source} (strict): a typo? Remove or fix them")
        if unread:
            result.notes.append(f"DeepSpeed {installed_deepspeed_version()} does not read top-level key(s) "
                                f"{', '.join(unread)} and ignores them: a typo? (kept as written)")
    return result


# keys only an accelerate config file (`accelerate config` / `accelerate launch --config_file`) has
_ACCELERATE_KEYS = {"compute_environment", "distributed_type", "deepspeed_config", "num_processes", "machine_rank",
                    "main_training_function", "downcast_bf16", "use_cpu", "rdzv_backend"}


def is_accelerate_config(data: dict) -> bool:
    return len(_ACCELERATE_KEYS & set(data)) >= 2 and not (_DS_TOP_KEYS & set(data))


def _from_accelerate(data: dict, source: str, config, notes: list[str]):
    """The DeepSpeed config an accelerate config file points to (its deepspeed_config_file, read
    relative to the working directory as accelerate does, else to the YAML's directory); an
    accelerate file without one is refused with the fix."""
    import os

    ds = data.get("deepspeed_config") if isinstance(data.get("deepspeed_config"), dict) else {}
    ref = ds.get("deepspeed_config_file")
    if not isinstance(ref, str) or not ref.strip():
        raise DeepSpeedConfigError(
            f"{source} is an accelerate config file (accelerate launch --config_file), not a DeepSpeed config, and "
            "its deepspeed_config names no deepspeed_config_file: pass the DeepSpeed JSON itself (e.g. "
            "configs/ds_zero2_bf16_full.json), or add deepspeed_config_file to the accelerate file")
    candidates = [ref]
    if isinstance(config, (str, os.PathLike)) and not os.path.isabs(ref):
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(os.fspath(config))), ref))
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        raise DeepSpeedConfigError(f"{source} is an accelerate config file whose deepspeed_config_file {ref!r} does "
                                   f"not exist (looked in {', '.join(dict.fromkeys(candidates))}): run from the "
                                   "directory accelerate would, or pass the DeepSpeed JSON itself")
    inner, inner_source = load_config(path)
    if is_accelerate_config(inner):
        raise DeepSpeedConfigError(f"{inner_source}, named by {source}, is an accelerate config file too")
    notes.append(f"{source} is an accelerate config file: rewrote the DeepSpeed config it names, {inner_source} "
                 "(its other settings are accelerate's, kept in that file)")
    mp = data.get("mixed_precision")
    if isinstance(mp, str) and mp.lower() in ("bf16", "fp16"):
        for key in ("bf16", "fp16"):
            enabled = _get(inner, f"{key}.enabled")
            if enabled is UNSET or enabled == "auto":
                notes.append(f"{key}.enabled is {'unset' if enabled is UNSET else 'auto'} in {inner_source}: "
                             f"accelerate sets it from mixed_precision={mp!r} at launch")
                break
    return inner, f"{inner_source} (via accelerate config {source})"


def deepspeed_config(config, backend=None, **kwargs) -> tuple[dict, list[Change]]:
    """Rewrite a DeepSpeed config (dict, JSON/YAML path, DictConfig, x-flux section) for `backend`.

    Returns (new_config, changes), each change a Change(path, old, new, reason). Notes (things
    kept but worth knowing) are logged as warnings; `rewrite()` returns them. Keyword options:
    deepspeed_version (of the target; default installed), bf16 / soc (target bf16 support),
    strict (raise instead of removing settings DeepSpeed ignores), world_size (check batch
    arithmetic), validate_result (default True).
    """
    result = rewrite(config, backend, **kwargs)
    for note in result.notes:
        logger.warning("deepspeed_config: %s", note)
    return result.config, result.changes


def validate(config: dict, world_size: int | None = None):
    """Validate with DeepSpeed's own `DeepSpeedConfig`; returns it.

    Without an initialized process group DeepSpeedConfig takes world size 1 (its constructor
    catches the failing dist.get_rank()), so the batch arithmetic train_batch_size =
    micro_batch x grad_accum x world_size is checked here for `world_size` and DeepSpeed checks
    the rest. 'auto' values (filled later by accelerate) are replaced by DeepSpeed's defaults on a
    copy: micro-batch and accumulation 1, other 'auto' keys removed.
    """
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError as exc:
        raise DeepSpeedConfigError(f"cannot validate: DeepSpeed does not import ({exc}); "
                                   "pip install 'flux-npu[deepspeed]'") from None
    probe = copy.deepcopy(config)
    tb, mb, gas = (probe.get(k, UNSET) for k in
                   ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))
    if world_size is not None and all(isinstance(x, int) for x in (tb, mb, gas)) and tb != mb * gas * world_size:
        raise DeepSpeedConfigError(
            f"train_batch_size {tb} != train_micro_batch_size_per_gpu {mb} x gradient_accumulation_steps {gas} x "
            f"world size {world_size}: fix one, or set train_batch_size to 'auto'")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if probe.get(key, UNSET) in (UNSET, "auto"):
            probe[key] = 1
    probe.pop("train_batch_size", None)  # checked above for the real world size; DeepSpeed derives it
    _drop_auto(probe)
    try:
        return DeepSpeedConfig(probe)
    except Exception as exc:
        from importlib.metadata import version

        raise DeepSpeedConfigError(f"DeepSpeed {version('deepspeed')} rejects the config: "
                                   f"{type(exc).__name__}: {exc}") from None


def unread_top_level_keys(config: dict) -> list[str]:
    """Top-level keys DeepSpeed's config class never looks at (it ignores unknown top-level keys
    without a word, so a misspelt `zero_optimisation` silently runs without ZeRO). Found by
    recording which keys DeepSpeedConfig reads while parsing a copy."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen = set()

    class _Recording(dict):
        def __getitem__(self, k):
            seen.add(k)
            return dict.__getitem__(self, k)

        def get(self, k, default=None):
            seen.add(k)
            return dict.get(self, k, default)

        def __contains__(self, k):
            seen.add(k)
            return dict.__contains__(self, k)

    probe = copy.deepcopy(config)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if probe.get(key, UNSET) in (UNSET, "auto"):
            probe[key] = 1
    probe.pop("train_batch_size", None)
    _drop_auto(probe)
    try:
        DeepSpeedConfig(_Recording(probe))
    except Exception:
        return []  # validate() reports why
    # accelerate's own top-level keys are read by accelerate, not DeepSpeed
    return sorted(k for k in probe if k not in seen and k not in ("train_batch_size",))


def _drop_auto(d):
    for k in list(d):
        if d[k] == "auto":
            del d[k]
        elif isinstance(d[k], dict):
            _drop_auto(d[k])
