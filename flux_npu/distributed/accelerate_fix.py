"""Make accelerate apply a DeepSpeed block it would silently ignore.

Flux training scripts built on x-flux / FluxKits load their YAML with OmegaConf and hand the
`deepspeed:` block to `accelerate.DeepSpeedPlugin(cfg.deepspeed)` (FluxKits
flux-npu/train_flux_lora.py). DeepSpeedPlugin only takes a dict, a JSON path or an HfDeepSpeedConfig:
an OmegaConf DictConfig is none of these, so accelerate (checked with 1.15) falls back to its
defaults and trains without the user's stage, offload and bucket settings, without a word; and the
block's keys are Lightning DeepSpeedStrategy names, not DeepSpeed's. Under `flux-npu run`, the
bootstrap wraps `DeepSpeedPlugin.__post_init__` so that such a config (a non-dict mapping, or an
x-flux-style section) goes through `flux_npu.distributed.rewrite` for the active backend first; the
changes are printed once (rank 0). The wrap is recorded on the patch handle and undone with it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from .dsconfig import is_xflux_section, rewrite


def _needs_conversion(cfg) -> bool:
    if cfg is None or isinstance(cfg, str):
        return False
    if type(cfg).__module__.startswith("omegaconf"):
        return True
    if isinstance(cfg, dict):
        return is_xflux_section(cfg)
    return isinstance(cfg, Mapping)


def install(handle) -> None:
    """Wrap accelerate's DeepSpeedPlugin.__post_init__ (recorded on `handle`)."""
    target = "accelerate.utils.dataclasses"
    try:
        from accelerate.utils import dataclasses as adc
    except ImportError as exc:
        handle.add_row(target, "DeepSpeedPlugin.__post_init__", "not-found", f"accelerate does not import: {exc}")
        return
    cls = adc.DeepSpeedPlugin
    original = cls.__dict__["__post_init__"]
    backend = handle.backend.name

    def __post_init__(self):
        if _needs_conversion(self.hf_ds_config):
            result = rewrite(self.hf_ds_config, backend)
            self.hf_ds_config = result.config
            if int(os.environ.get("RANK", "0") or 0) == 0:
                from ..cli.ds_config import render_result

                print(f"flux-npu: accelerate.DeepSpeedPlugin was given: {result.source}; applied as:\n"
                      + render_result(result), file=sys.stderr, flush=True)
        return original(self)

    __post_init__.__wrapped__ = original
    __post_init__.__module__ = __name__
    reason = handle.set_attr(cls, "__post_init__", __post_init__)
    if reason:
        handle.add_row(target, "DeepSpeedPlugin.__post_init__", "skipped", reason)
    else:
        handle.add_row(target, "DeepSpeedPlugin.__post_init__", "patched",
                       "an OmegaConf DictConfig / x-flux deepspeed: section is converted and applied for the "
                       "backend instead of being silently replaced by accelerate's defaults")
