"""Reading a DeepSpeed config: dict, JSON/YAML path, OmegaConf DictConfig; duplicate keys,
constants, size caps, `${...}` interpolations and structure checked before any rule runs."""

from __future__ import annotations

import copy
import json
import math
import os
import re

from .ds_facts import (
    UNSET,
    DeepSpeedConfigError,
    _get,
)
from .ds_xflux import _DS_TOP_KEYS

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


def load_config(config) -> tuple[dict, str]:
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
MAX_INTERPOLATED = 10_000

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


_UNRESOLVED = "\x00flux-npu: not yet resolved\x00"  # stands in for a reference OmegaConf must not follow yet


def _resolve_interpolations(data: dict, path: str):
    """OmegaConf `${a.b}` references (training YAMLs use them), resolved by OmegaConf one value at
    a time so the result stays bounded: OmegaConf alone re-expands a reference each time it is
    used, so a chain of `a1: ${a0}${a0}` lines doubles per line. Here a value is resolved only once
    everything it names is resolved (the rest stand in as a placeholder OmegaConf cannot follow) and
    is then kept as plain data: the work is linear, each string is capped at MAX_STRING characters,
    the copies at MAX_NODES entries, and chains that make no progress (circular) or pass MAX_DEPTH
    rounds are refused, naming the key."""
    pending = {}

    def find(node, keys):
        if isinstance(node, str) and "${" in node:
            pending[keys] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                find(v, (*keys, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                find(v, (*keys, i))

    find(data, ())
    if not pending:
        return data
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:
        keys, text = next(iter(pending.items()))
        raise DeepSpeedConfigError(f"{path} uses ${{...}} interpolations ({'.'.join(map(str, keys))}: {_short(text)}),"
                                   " which are resolved with OmegaConf: pip install omegaconf (or flux-npu[deepspeed]),"
                                   " or write the values out") from None

    def placeholders(node, keys):
        if keys in pending:
            return _UNRESOLVED
        if isinstance(node, str):
            return _escape(node)  # a literal `${` (written `\${`) stays literal
        if isinstance(node, dict):
            return {k: placeholders(v, (*keys, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [placeholders(v, (*keys, i)) for i, v in enumerate(node)]
        return node

    cfg = OmegaConf.create(placeholders(data, ()))
    out = copy.deepcopy(data)
    # references copy what they name: bound the copies, not just the file (tighter than the file's
    # cap, since each copy is an OmegaConf node; a real config copies a few dozen)
    budget = [MAX_INTERPOLATED]

    def count(node):
        budget[0] -= 1
        if budget[0] < 0:
            raise DeepSpeedConfigError(f"{path}: interpolations expand to more than {MAX_INTERPOLATED} entries")
        waiting = isinstance(node, str) and _UNRESOLVED in node
        if isinstance(node, dict):
            waiting = any([count(v) for v in node.values()])
        elif isinstance(node, list):
            waiting = any([count(v) for v in node])
        if isinstance(node, str) and len(node) > MAX_STRING:
            raise DeepSpeedConfigError(f"{path}: interpolated string longer than {MAX_STRING} characters")
        return waiting

    for _ in range(MAX_DEPTH + 1):
        progress = False
        for keys, text in list(pending.items()):
            where = ".".join(map(str, keys))
            parent = cfg
            for k in keys[:-1]:
                parent = parent[k]
            try:
                parent[keys[-1]] = text
                value = parent[keys[-1]]
                if isinstance(value, (DictConfig, ListConfig)):
                    value = OmegaConf.to_container(value, resolve=True)
            except OmegaConfBaseException as exc:
                raise DeepSpeedConfigError(_omegaconf_message(exc, path, where, text)) from None
            if count(value):
                parent[keys[-1]] = _UNRESOLVED  # names a value not resolved yet: next round
                continue
            parent[keys[-1]] = _escape_all(value)
            target = out
            for k in keys[:-1]:
                target = target[k]
            target[keys[-1]] = value
            del pending[keys]
            progress = True
        if not pending:
            check_structure(out, path)
            return out
        if not progress:
            break
    keys, text = next(iter(pending.items()))
    raise DeepSpeedConfigError(f"{path}: interpolation {text!r} at {'.'.join(map(str, keys))} is circular or "
                               f"chained more than {MAX_DEPTH} deep")


def _escape(text: str) -> str:
    """A literal string as OmegaConf reads it back unchanged: `${` (with any backslashes before it)
    escaped the way OmegaConf's grammar unescapes it."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text) if "${" in text else text


def _escape_all(node):
    if isinstance(node, str):
        return _escape(node)
    if isinstance(node, dict):
        return {k: _escape_all(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape_all(v) for v in node]
    return node


def _omegaconf_message(exc, path, where, text) -> str:
    """OmegaConf's error, said as ours: the file, the key and the reference."""
    name = type(exc).__name__
    detail = str(exc).splitlines()[0] if str(exc) else name
    if "Recursive" in detail or "recursive" in detail:
        return f"{path}: interpolation {text!r} at {where} is circular ({detail})"
    if name in ("InterpolationKeyError", "ConfigKeyError", "KeyValidationError"):
        return f"{path}: interpolation {text!r} at {where} names no key of the file ({detail})"
    if name == "GrammarParseError":
        return f"{path}: {text!r} at {where} is not a valid ${{...}} interpolation ({detail})"
    return f"{path}: interpolation {text!r} at {where} cannot be resolved ({name}: {detail})"
