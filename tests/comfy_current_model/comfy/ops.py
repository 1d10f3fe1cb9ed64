"""comfy.ops layout: `operations.*` layers whose weights may be stored in another dtype (fp8
checkpoints) and are cast to the input's dtype and device on the fly (`comfy_cast_weights`), and
may carry on-the-fly weight patches (`weight_function`)."""

import torch


def cast_to(weight, dtype=None, device=None):
    if weight is None:
        return None
    return weight.to(dtype=dtype if dtype is not None else weight.dtype, device=device or weight.device)


class CastWeightBiasOp:
    comfy_cast_weights = False

    def _init_patches(self):
        self.weight_function = []
        self.bias_function = []

    def _weight(self, x):
        w = cast_to(self.weight, x.dtype, x.device)
        for fn in self.weight_function:
            w = fn(w)
        return w


class disable_weight_init:  # noqa: N801  (ComfyUI's spelling)
    class Linear(torch.nn.Linear, CastWeightBiasOp):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_patches()

        def forward(self, x):
            if self.comfy_cast_weights or self.weight_function:
                return torch.nn.functional.linear(x, self._weight(x), cast_to(self.bias, x.dtype, x.device))
            return super().forward(x)

    class RMSNorm(torch.nn.RMSNorm, CastWeightBiasOp):
        def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None):
            super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device,
                             dtype=dtype)
            self._init_patches()

        def forward(self, x):
            if self.comfy_cast_weights or self.weight_function:
                return torch.nn.functional.rms_norm(x, self.normalized_shape, self._weight(x), self.eps)
            return super().forward(x)


class manual_cast(disable_weight_init):  # noqa: N801
    class Linear(disable_weight_init.Linear):
        comfy_cast_weights = True

    class RMSNorm(disable_weight_init.RMSNorm):
        comfy_cast_weights = True
