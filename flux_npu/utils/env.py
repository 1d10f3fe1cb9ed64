"""The one reader of flux-npu's boolean and list environment variables.

Booleans: 1/true/yes/on and 0/false/no/off (any case, surrounding blanks ignored); unset or empty
is the default; anything else is an error naming the variable and the spellings, so that
`FLUX_NPU_STRICT=false` cannot turn strict mode on and `FLUX_NPU_REPORT=no` cannot print a report.
Lists: names separated by commas and/or spaces; unset or empty is None (the caller's default).
Every reader of these variables goes through here: `import flux_npu.auto`, the op table's
FLUX_NPU_STRICT, and `flux-npu run` (which checks them before it starts anything, and whose
bootstrap applies FLUX_NPU_OPS / FLUX_NPU_EXCLUDE_OPS / FLUX_NPU_TARGETS in every process).
"""

from __future__ import annotations

import os

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")

# the switches `patch()` reads through `import flux_npu.auto` and `flux-npu run`
OPS_VAR, EXCLUDE_VAR, TARGETS_VAR = "FLUX_NPU_OPS", "FLUX_NPU_EXCLUDE_OPS", "FLUX_NPU_TARGETS"
FLAG_VARS = ("FLUX_NPU_STRICT", "FLUX_NPU_REPORT", "FLUX_NPU_TRANSFER_TO_NPU")


def parse_flag(value: str | None, name: str, default: bool = False) -> bool:
    if value is None or not value.strip():
        return default
    v = value.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a yes/no value: use one of {', '.join(TRUE)} (on) or "
                     f"{', '.join(FALSE)} (off)")


def env_flag(name: str, default: bool = False, environ=None) -> bool:
    """The boolean variable `name` (see the module doc); ValueError for another spelling."""
    return parse_flag((os.environ if environ is None else environ).get(name), name, default)


def parse_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [t for t in value.replace(",", " ").split() if t]
    return items or None


def env_list(name: str, environ=None) -> list[str] | None:
    """The list variable `name`: its comma- or space-separated names, or None when unset or empty."""
    return parse_list((os.environ if environ is None else environ).get(name))


def patch_switches(environ=None) -> dict:
    """patch() keyword arguments from FLUX_NPU_TARGETS / FLUX_NPU_OPS / FLUX_NPU_EXCLUDE_OPS, checked:
    an unknown op or target name is a ValueError naming the variable and the known names."""
    from ..patches.spec import select_ops

    targets = env_list(TARGETS_VAR, environ)
    ops, exclude = env_list(OPS_VAR, environ), env_list(EXCLUDE_VAR, environ)
    try:
        select_ops(ops, exclude, warn=False)
    except ValueError as exc:
        raise ValueError(f"{OPS_VAR}/{EXCLUDE_VAR}: {exc}") from None
    if targets is not None:
        from ..patches.engine import known_targets

        unknown = sorted(set(targets) - set(known_targets()))
        if unknown:
            raise ValueError(f"{TARGETS_VAR}: unknown target(s) {unknown}; known: {', '.join(known_targets())}")
    return {"targets": targets, "ops": ops, "exclude": exclude}


def check_environment(environ=None) -> None:
    """Refuse (ValueError naming the variable) a yes/no variable with another spelling or a list
    variable with an unknown name: `flux-npu run` calls this before it starts any process."""
    for name in FLAG_VARS:
        env_flag(name, environ=environ)
    patch_switches(environ)
