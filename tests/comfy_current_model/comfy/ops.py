"""comfy.ops layout (ComfyUI 2026-08): `operations.*` layers are torch modules whose `forward`
first runs `run_every_op()` (the interrupt check), then either torch's own forward or, when the
weights must be cast (`comfy_cast_weights`, set by `manual_cast` for fp8 checkpoints and by the
model patcher for low-VRAM loading) or patched on the fly (`weight_function` / `bias_function`,
class-level empty lists that ComfyUI replaces per instance), a functional call on the weights cast
to the input's dtype and device. Ours initialises weights the torch way (ComfyUI leaves them empty
and loads a checkpoint)."""

import torch

import comfy.model_management


def run_every_op():
    if torch.compiler.is_compiling():
        return
    comfy.model_management.throw_exception_if_processing_interrupted()


def cast_to(weight, dtype=None, device=None):
    if weight is None:
        return None
    return weight.to(dtype=dtype if dtype is not None else weight.dtype, device=device or weight.device)


def cast_bias_weight(module, x):
    """(weight, bias) of `module` in x's dtype and on x's device, each through its patch functions."""
    weight = bias = None
    if module is not None:
        weight = cast_to(module.weight, x.dtype, x.device)
        for fn in module.weight_function:
            weight = fn(weight)
        if getattr(module, "bias", None) is not None:
            bias = cast_to(module.bias, x.dtype, x.device)
            for fn in module.bias_function:
                bias = fn(bias)
    return weight, bias


class CastWeightBiasOp:
    comfy_cast_weights = False
    weight_function = []  # noqa: RUF012  (ComfyUI's class-level defaults; instances get their own lists)
    bias_function = []  # noqa: RUF012


def _cast_path(module) -> bool:
    return module.comfy_cast_weights or len(module.weight_function) > 0 or len(module.bias_function) > 0


class disable_weight_init:  # noqa: N801  (ComfyUI's spelling)
    class Linear(torch.nn.Linear, CastWeightBiasOp):
        def forward_comfy_cast_weights(self, input):
            weight, bias = cast_bias_weight(self, input)
            return torch.nn.functional.linear(input, weight, bias)

        def forward(self, *args, **kwargs):
            run_every_op()
            if _cast_path(self):
                return self.forward_comfy_cast_weights(*args, **kwargs)
            return super().forward(*args, **kwargs)

    class LayerNorm(torch.nn.LayerNorm, CastWeightBiasOp):
        def forward_comfy_cast_weights(self, input):
            weight, bias = cast_bias_weight(self if self.weight is not None else None, input)
            return torch.nn.functional.layer_norm(input, self.normalized_shape, weight, bias, self.eps)

        def forward(self, *args, **kwargs):
            run_every_op()
            if _cast_path(self):
                return self.forward_comfy_cast_weights(*args, **kwargs)
            return super().forward(*args, **kwargs)

    class RMSNorm(torch.nn.RMSNorm, CastWeightBiasOp):
        def forward_comfy_cast_weights(self, input):
            weight, _ = cast_bias_weight(self if self.weight is not None else None, input)
            return torch.nn.functional.rms_norm(input, self.normalized_shape, weight, self.eps)

        def forward(self, *args, **kwargs):
            run_every_op()
            if _cast_path(self):
                return self.forward_comfy_cast_weights(*args, **kwargs)
            return super().forward(*args, **kwargs)


class manual_cast(disable_weight_init):  # noqa: N801
    class Linear(disable_weight_init.Linear):
        comfy_cast_weights = True

    class LayerNorm(disable_weight_init.LayerNorm):
        comfy_cast_weights = True

    class RMSNorm(disable_weight_init.RMSNorm):
        comfy_cast_weights = True
