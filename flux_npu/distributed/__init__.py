"""The distributed layer: NPU-safe DeepSpeed configs, environment translation, the launcher.

- `deepspeed_config(config, backend)` -> (new_config, changes): rewrite a DeepSpeed config (dict,
  JSON/YAML path, OmegaConf DictConfig, x-flux / FluxKits `deepspeed:` section) for a backend,
  explaining each change; `rewrite()` is the full form (notes, target); `validate()` runs
  DeepSpeed's own config class.
- `translate_env(env, backend)`: CUDA/NCCL variables -> HCCL/Ascend ones, plus DS_ACCELERATOR.
- `launcher.build_launch(...)` / `flux-npu run`: run an unchanged script with flux_npu.patch()
  in every process (`bootstrap`), through torchrun for several processes (`torchrun`: torchrun
  exiting with the failing rank's own code); stop signals reach every worker.
- `configs`: the generator of the shipped files in flux_npu/data/configs (configs/ in the repository).
"""

from .dsconfig import (
    UNSET,
    Change,
    DeepSpeedConfigError,
    Result,
    Target,
    deepspeed_config,
    rewrite,
    validate,
)
from .env import translate_env

__all__ = [
    "UNSET",
    "Change",
    "DeepSpeedConfigError",
    "Result",
    "Target",
    "deepspeed_config",
    "rewrite",
    "translate_env",
    "validate",
]
