"""comfy.quant_ops: the comfy-kitchen kernel registry ComfyUI routes RoPE and AdaLN through."""

import comfy_kitchen as ck  # noqa: F401  (the real package)
