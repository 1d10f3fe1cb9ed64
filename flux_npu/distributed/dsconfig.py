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
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

logger = logging.getLogger("flux_npu")


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config that cannot work on the target (or that DeepSpeed rejects)."""


class _Unset:
    def __repr__(self):
        return "<unset>"

    def __bool__(self):
        return False


UNSET = _Unset()  # the `old` (or `new`) of a Change for a key that was (or is now) absent


class Change(NamedTuple):
    path: str
    old: Any
    new: Any
    reason: str


# -- facts the rules rest on ------------------------------------------------------------------
# (version, why) pairs: DeepSpeed NPU fixes, from DISTRIBUTED.md and the PRs it cites.
OVERLAP_COMM_RACE_FIXED = "0.14.3"  # PR #5606: ZeRO-1/2 overlap_comm buffer race (losses differ on NPU)
NPU_FUSED_ADAM_FIXED = "0.14.5"  # PR #5777: NPU FusedAdam accuracy
NPU_INIT_BROKEN = ("0.17.3", "0.17.5")  # PR #7560: init_process_group "'device' object has no attribute 'index'"
ZERO2_OVERLAP_NAN_FIXED = "0.19.0"  # PR #7965: overlap-comm buffer lifetime NaN in ZeRO-2

SIZE_KEYS = (
    "reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
    "sub_group_size",
)

# Optimizer type -> the op builder DeepSpeed loads for it on the device (engine.py
# `_configure_basic_optimizer`; deepspeed/ops/{adam,lamb,lion}).
_DEVICE_BUILDER = {"adam": "FusedAdamBuilder", "adamw": "FusedAdamBuilder", "lamb": "FusedLambBuilder",
                   "lion": "FusedLionBuilder"}
_CPU_OFFLOAD_BUILDER = {"adam": "CPUAdamBuilder", "adamw": "CPUAdamBuilder", "adagrad": "CPUAdagradBuilder",
                        "lion": "CPULionBuilder"}


def _version(v):
    from packaging.version import Version

    return v if isinstance(v, Version) else Version(str(v))


def installed_deepspeed_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("deepspeed")
    except Exception:
        return None


def accelerator_op_builders(backend: str) -> Optional[frozenset]:
    """The op builders the installed DeepSpeed ships for `backend`'s accelerator (DeepSpeed's
    `get_op_builder` falls back to NotImplementedBuilder for any other name, which raises at
    engine initialization: DeepSpeed issue #8626). None when unknown (cuda: the full set, built
    from source; or DeepSpeed missing)."""
    module = {"npu": "deepspeed.ops.op_builder.npu", "cpu": "deepspeed.ops.op_builder.cpu"}.get(backend)
    if module is None:
        return None
    try:
        import importlib

        mod = importlib.import_module(module)
    except Exception:
        return None
    return frozenset(n for n in dir(mod) if n.endswith("Builder") and n not in ("NotImplementedBuilder",)
                     and not n.startswith(("NPUOp", "CPUOp")))


def soc_supports_bf16(soc: str) -> bool:
    """Ascend SoC name -> bf16 support: Atlas A2/A3 training series (910B*, 910_93*) yes; the first
    910 (910A / 910ProA / 910PremiumA) no (CONTRACTS.md; DISTRIBUTED.md)."""
    s = soc.strip().lower().replace("ascend", "")
    if "910b" in s or "910_93" in s or "910c" in s:
        return True
    if s in ("910", "910a", "910proa", "910prob", "910premiuma") or s.startswith("910a"):
        return False
    raise DeepSpeedConfigError(
        f"unknown Ascend SoC {soc!r}: give one like 910A (no bf16) or 910B / Ascend910B3 / Ascend910_9391 (bf16)")


@dataclass(frozen=True)
class Target:
    """What the config will run on: backend name, DeepSpeed version there, bf16 support (None:
    unknown), op builders of DeepSpeed's accelerator for that backend (None: unknown)."""

    backend: str
    deepspeed_version: str
    bf16: Optional[bool] = None
    op_builders: Optional[frozenset] = None

    @classmethod
    def resolve(cls, backend=None, deepspeed_version=None, bf16=None, soc=None, op_builders=None) -> "Target":
        name = _backend_name(backend)
        version = deepspeed_version or installed_deepspeed_version()
        if version is None:
            raise DeepSpeedConfigError(
                "DeepSpeed is not installed and no target version was given: pip install 'flux-npu[deepspeed]' "
                "or pass deepspeed_version=")
        if soc is not None:
            bf16 = soc_supports_bf16(soc)
        if bf16 is None and name == "npu":
            bf16 = _probe_npu_bf16()
        if bf16 is None and name == "cpu":
            bf16 = True  # DeepSpeed's CPU accelerator: is_bf16_supported() is True
        if op_builders is None:
            op_builders = accelerator_op_builders(name)
        return cls(name, str(version), bf16, op_builders)


def _backend_name(backend) -> str:
    from ..backends import Backend, get_backend, registered_backends

    if isinstance(backend, Backend):
        return backend.name
    if backend is None:
        return get_backend().name
    name = str(backend).strip().lower()
    known = [b.name for b in registered_backends()]
    if name not in known:
        raise DeepSpeedConfigError(f"unknown backend {backend!r}; known: {', '.join(known)}")
    return name  # availability is not required: configs are often written for another machine


def _probe_npu_bf16() -> Optional[bool]:
    import torch

    try:
        import torch_npu  # noqa: F401  (torch.npu exists once torch_npu is imported)
    except Exception:
        return None
    npu = getattr(torch, "npu", None)
    try:
        if npu is not None and npu.is_available():
            return bool(npu.is_bf16_supported())
    except Exception:
        return None
    return None


# -- loading ----------------------------------------------------------------------------------

def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise DeepSpeedConfigError(f"duplicate key {k!r} in DeepSpeed config (DeepSpeed rejects it too)")
        d[k] = v
    return d


def _reject_constant(name, path):
    raise DeepSpeedConfigError(f"{path}: {name} is not a number DeepSpeed can use (JSON has no NaN or infinity): "
                               "write a finite number")


def load_config(config) -> Tuple[dict, str]:
    """Any accepted input -> (plain dict, description of where it came from).

    Files are read with caps (size, nesting, node count), YAML without anchors or aliases, and every
    number must be finite: a bad file gives one DeepSpeedConfigError naming the problem."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.exists(path):
            raise FileNotFoundError(f"DeepSpeed config {path!r} does not exist")
        if os.path.isdir(path):
            raise DeepSpeedConfigError(f"DeepSpeed config {path!r} is a directory: name a JSON or YAML file")
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise DeepSpeedConfigError(f"{path} is {size} bytes; a DeepSpeed config or training YAML is far "
                                       f"smaller (limit {MAX_CONFIG_BYTES}): is it the right file?")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise DeepSpeedConfigError(f"{path} is not UTF-8 text: name a JSON or YAML file") from None
        if path.endswith((".yaml", ".yml")):
            data = _load_yaml(text, path)
        else:
            try:
                data = json.loads(text, object_pairs_hook=_no_duplicates,
                                  parse_constant=lambda c: _reject_constant(c, path))
            except json.JSONDecodeError as exc:
                raise DeepSpeedConfigError(f"{path} is not valid JSON: {exc}") from None
            except RecursionError:
                raise DeepSpeedConfigError(f"{path} nests deeper than any DeepSpeed config") from None
        if not isinstance(data, dict):
            raise DeepSpeedConfigError(f"{path} must hold a mapping, got {type(data).__name__}")
        check_structure(data, path)
        return data, path
    if type(config).__module__.startswith("omegaconf"):
        # accelerate's DeepSpeedPlugin only takes a dict / path / HfDeepSpeedConfig: a DictConfig
        # is none of these and older accelerate then used defaults, ignoring the block.
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(config, resolve=True)
        check_structure(data, "OmegaConf DictConfig")
        return data, "OmegaConf DictConfig"
    if isinstance(config, dict):
        check_structure(config, "dict")
        return copy.deepcopy(config), "dict"
    from collections.abc import Mapping

    if isinstance(config, Mapping):
        data = dict(config)
        check_structure(data, type(config).__name__)
        return copy.deepcopy(data), type(config).__name__
    raise TypeError(f"DeepSpeed config must be a dict, a JSON/YAML path or an OmegaConf DictConfig, "
                    f"got {type(config).__name__}")


# Caps for reading a config: real DeepSpeed configs and training YAMLs are a few KB, a few levels
# deep and have well under a thousand entries; the caps only stop crafted or wrong files early.
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 100_000
MAX_STRING = 4096

# Keys whose value DeepSpeed (or the x-flux section) reads as a mapping: a list or a scalar there
# would otherwise fail deep inside the rules or DeepSpeed with a bare AttributeError.
_MAPPING_KEYS = ("zero_optimization", "bf16", "fp16", "amp", "optimizer", "optimizer.params", "scheduler",
                 "scheduler.params", "zero_optimization.offload_optimizer", "zero_optimization.offload_param",
                 "activation_checkpointing", "flops_profiler", "comms_logger", "data_types")


def check_structure(data: dict, source: str) -> None:
    """Finite numbers, bounded size and depth, mappings where DeepSpeed expects mappings."""
    budget = [MAX_NODES]

    def walk(node, where, depth):
        budget[0] -= 1
        if budget[0] < 0:
            raise DeepSpeedConfigError(f"{source} has more than {MAX_NODES} entries; a DeepSpeed config has far "
                                       "fewer: is it the right file?")
        if depth > MAX_DEPTH:
            raise DeepSpeedConfigError(f"{source} nests deeper than {MAX_DEPTH} levels at {where}")
        if isinstance(node, float) and not math.isfinite(node):
            raise DeepSpeedConfigError(f"{where} = {node!r} in {source} is not a finite number (too large, or NaN): "
                                       "DeepSpeed configs are JSON, which has neither; write a finite number")
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise DeepSpeedConfigError(f"key {k!r} under {where or 'the top level'} in {source} is not a "
                                               "string: DeepSpeed config keys are names")
                walk(v, f"{where}.{k}" if where else k, depth + 1)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]", depth + 1)

    walk(data, "", 0)
    ds = data.get("deepspeed", UNSET)
    if ds is not UNSET and ds is not None and not isinstance(ds, dict) and not (_DS_TOP_KEYS & set(data)):
        raise DeepSpeedConfigError(f"deepspeed: in {source} must be a mapping of DeepSpeed settings, got "
                                   f"{type(ds).__name__} {_short(ds)}")
    for prefix, section in [("", data)] + ([("deepspeed.", ds)] if isinstance(ds, dict) else []):
        for key in _MAPPING_KEYS:
            value = _get(section, key)
            if value is not UNSET and value is not None and not isinstance(value, dict):
                raise DeepSpeedConfigError(
                    f"{prefix}{key} in {source} must be a mapping of settings, got {type(value).__name__} "
                    f"{_short(value)}: write it as `{key.split('.')[-1]}: {{...}}` (DeepSpeed's config layout)")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")
_INTERPOLATION = re.compile(r"\$\{([^${}]*)\}")


def _yaml_loader():
    """A yaml.SafeLoader subclass that refuses anchors and aliases (an alias bomb expands a few
    hundred bytes into gigabytes; configs have no need of them) and, like OmegaConf, reads 2e7 as a
    float (PyYAML's YAML 1.1 resolver wants a dot)."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise DeepSpeedConfigError(
                    f"{self.name}, line {event.start_mark.line + 1}: YAML anchors and aliases (&{event.anchor} / "
                    f"*{event.anchor}) are not accepted in a DeepSpeed config or training YAML: write the values out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            # PyYAML keeps the last of two equal keys without a word; the JSON reader refuses them too
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    continue  # check_structure refuses non-string keys with a clear message
                if key in seen:
                    raise DeepSpeedConfigError(f"{self.name}, line {key_node.start_mark.line + 1}: duplicate key "
                                               f"{key!r}; keep one")
                seen.add(key)
            return super().construct_mapping(node, deep)

    NoAliasLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT, list("-+0123456789"))
    return NoAliasLoader


def _load_yaml(text, path):
    try:
        import yaml
    except ImportError:
        raise DeepSpeedConfigError(f"reading {path} needs PyYAML: pip install pyyaml") from None
    loader = _yaml_loader()(text)
    loader.name = path
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise DeepSpeedConfigError(f"{path} is not valid YAML: {exc}") from None
    except RecursionError:
        raise DeepSpeedConfigError(f"{path} nests deeper than any DeepSpeed config") from None
    finally:
        loader.dispose()
    if isinstance(data, dict):
        check_structure(data, path)  # bounded before interpolations are looked at
        data = _resolve_interpolations(data, path)
    return data


def _resolve_interpolations(data: dict, path: str):
    """OmegaConf-style `${a.b}` references (training YAMLs use them), resolved here so the result
    stays bounded (OmegaConf would expand `${a}${a}` chains without limit): a whole-value reference
    takes the referenced value, one inside a string is substituted as text up to MAX_STRING
    characters; chains are followed at most MAX_DEPTH deep."""

    def lookup(ref, depth):
        if depth > MAX_DEPTH:
            raise DeepSpeedConfigError(f"{path}: interpolation ${{{ref}}} is circular or chained too deep")
        cur = data
        for part in ref.strip().split("."):
            if not isinstance(cur, dict) or part not in cur:
                raise DeepSpeedConfigError(f"{path}: interpolation ${{{ref}}} names no key of the file")
            cur = cur[part]
        return resolve(cur, depth + 1)

    budget = [MAX_NODES]  # references copy what they name: bound the copies, not just the file

    def resolve(node, depth):
        budget[0] -= 1
        if budget[0] < 0:
            raise DeepSpeedConfigError(f"{path}: interpolations expand to more than {MAX_NODES} entries")
        if isinstance(node, str) and "${" in node:
            whole = _INTERPOLATION.fullmatch(node)
            if whole:
                return lookup(whole.group(1), depth)
            text = _INTERPOLATION.sub(lambda m: _scalar_text(lookup(m.group(1), depth), path, m.group(0)), node)
            if len(text) > MAX_STRING:
                raise DeepSpeedConfigError(f"{path}: interpolated string longer than {MAX_STRING} characters")
            return text
        if isinstance(node, dict):
            return {k: resolve(v, depth) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, depth) for v in node]
        return node

    out = resolve(data, 0)
    check_structure(out, path)
    return out


def _scalar_text(value, path, ref) -> str:
    if isinstance(value, (dict, list)):
        raise DeepSpeedConfigError(f"{path}: {ref} inside a string names a {type(value).__name__}, not a value")
    return str(value)


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


def _precision_flags(p) -> Tuple[bool, bool]:
    s = str(p).lower()
    if s in ("bf16", "bf16-mixed", "bf16-true", "bfloat16"):
        return False, True
    if s in ("16", "fp16", "16-mixed", "16-true", "float16", "half"):
        return True, False
    if s in ("32", "fp32", "32-true", "float32", "no"):
        return False, False
    raise DeepSpeedConfigError(f"deepspeed.precision {p!r} is not one of bf16, fp16 (16), fp32 (32)")


def convert_xflux(section: dict, top: Optional[dict], changes: List[Change]) -> dict:
    """The x-flux / FluxKits `deepspeed:` section (+ the training YAML's top level, when given:
    gradient_accumulation_steps, max_grad_norm, mixed_precision) -> a DeepSpeed dict."""
    unknown = sorted(set(section) - _XFLUX_KEYS)
    if unknown:
        raise DeepSpeedConfigError(
            f"unknown key(s) {unknown} in the x-flux-style deepspeed section; known: {sorted(_XFLUX_KEYS)}. "
            "Write a DeepSpeed JSON instead, or remove them")
    why = ("x-flux/FluxKits `deepspeed:` key (a Lightning DeepSpeedStrategy name) written as DeepSpeed's key; "
           "accelerate's DeepSpeedPlugin would not read it")
    out: Dict[str, Any] = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    zero: Dict[str, Any] = {}

    def put(src, dst_path, value):
        _set(out, dst_path, value)
        changes.append(Change(dst_path, UNSET, value, f"from deepspeed.{src}={section[src]!r}: {why}"))

    changes.append(Change("train_micro_batch_size_per_gpu", UNSET, "auto",
                          "accelerate fills 'auto' from the prepared DataLoader (accelerate/accelerator.py)"))
    out["zero_optimization"] = zero
    if "stage" in section:
        put("stage", "zero_optimization.stage", int(section["stage"]))
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
            out["gradient_accumulation_steps"] = int(top["gradient_accumulation_steps"])
        if top.get("max_grad_norm") is not None:
            out["gradient_clipping"] = float(top["max_grad_norm"])
            changes.append(Change("gradient_clipping", UNSET, out["gradient_clipping"],
                                  "taken from the training YAML's max_grad_norm"))
        mp = top.get("mixed_precision")
        if mp is not None and "precision" in section:
            want = _precision_flags(mp)
            if want != _precision_flags(section["precision"]):
                raise DeepSpeedConfigError(
                    f"mixed_precision {mp!r} and deepspeed.precision {section['precision']!r} disagree; accelerate "
                    "raises on this mismatch (DeepSpeedPlugin.set_mixed_precision): make them the same")
    changes.append(Change("gradient_accumulation_steps", UNSET, out["gradient_accumulation_steps"], gas_from))
    return out


# -- path helpers -----------------------------------------------------------------------------

def _get(d, path, default=UNSET):
    cur = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _set(d, path, value):
    parts = path.split(".")
    cur = d
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value


def _delete(d, path):
    parts = path.split(".")
    cur = _get(d, ".".join(parts[:-1])) if len(parts) > 1 else d
    if isinstance(cur, dict):
        cur.pop(parts[-1], None)


def _true(v) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")


@dataclass
class Result:
    config: dict
    changes: List[Change] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    target: Optional[Target] = None
    source: str = ""


class _Ctx:
    def __init__(self, cfg, target, strict):
        self.cfg, self.target, self.strict = cfg, target, strict
        self.changes: List[Change] = []
        self.notes: List[str] = []
        self.v = _version(target.deepspeed_version)

    def change(self, path, new, reason):
        old = _get(self.cfg, path)
        if new is UNSET:
            _delete(self.cfg, path)
        else:
            _set(self.cfg, path, new)
        self.changes.append(Change(path, old, new, reason))

    def has_builder(self, name) -> Optional[bool]:
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


def rewrite(config, backend=None, *, deepspeed_version=None, bf16=None, soc=None, strict=False,
            validate_result=True, world_size=None, op_builders=None) -> Result:
    """The full form of `deepspeed_config`: returns a Result with config, changes, notes, target."""
    data, source = load_config(config)
    changes: List[Change] = []
    if isinstance(data.get("deepspeed"), dict) and not (_DS_TOP_KEYS & set(data)):
        top = {k: v for k, v in data.items() if k != "deepspeed"}
        data = convert_xflux(data["deepspeed"], top, changes)
        source += " (training YAML, deepspeed: section)"
    elif is_xflux_section(data):
        data = convert_xflux(data, None, changes)
        source += " (x-flux-style deepspeed section)"
    target = Target.resolve(backend, deepspeed_version, bf16, soc, op_builders)
    ctx = _Ctx(data, target, strict)
    for _, rule, _ in RULES:
        rule(ctx)
    result = Result(ctx.cfg, changes + ctx.changes, ctx.notes, target, source)
    if validate_result:
        validate(result.config, world_size=world_size)
        unread = unread_top_level_keys(result.config)
        if unread:
            result.notes.append(f"DeepSpeed {installed_deepspeed_version()} does not read top-level key(s) "
                                f"{', '.join(unread)} and ignores them: a typo? (kept as written)")
    return result


def deepspeed_config(config, backend=None, **kwargs) -> Tuple[dict, List[Change]]:
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


def validate(config: dict, world_size: Optional[int] = None):
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


def unread_top_level_keys(config: dict) -> List[str]:
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
