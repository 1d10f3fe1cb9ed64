"""Random-init Flux models of real shapes, and their inputs. No weights are ever downloaded.

Presets (diffusers `FluxTransformer2DModel` configs):
- flux-dev:  19 double + 38 single blocks, 24 heads x 128 (hidden 3072), T5-XXL width 4096.
- flux-mini: 5 double + 10 single blocks at Flux-dev width (FluxKits' distilled Flux-mini).
- tiny:      2 + 2 blocks, 2 heads x 16, for tests and the README's main job.
- block:     1 + 1 blocks at Flux width (24 x 128): the "Flux-width block" of the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .shapes import SHAPES

# heads, head dim and RoPE axes come from the one shape table (flux_npu.shapes)
_FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=SHAPES["flux-dev"].head_dim,
    num_attention_heads=SHAPES["flux-dev"].heads, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=SHAPES["flux-dev"].axes,
)

PRESETS: dict[str, dict] = {
    "flux-dev": _FLUX_DEV,
    "flux-mini": {**_FLUX_DEV, "num_layers": 5, "num_single_layers": 10},
    # one block of each kind at Flux width; narrow text/pooled inputs keep the embedders small
    "block": {**_FLUX_DEV, "num_layers": 1, "num_single_layers": 1, "joint_attention_dim": 256,
              "pooled_projection_dim": 64},
    "tiny": dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=SHAPES["tiny"].head_dim,
        num_attention_heads=SHAPES["tiny"].heads, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=SHAPES["tiny"].axes,
    ),
}


def preset_config(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown Flux preset {name!r}; presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


class default_dtype:
    """Build modules directly in `dtype` (a Flux-width model built in float32 and then cast needs
    twice its final memory)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.prev = torch.get_default_dtype()
        if self.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.prev)
        return False


def build_diffusers_flux(preset: str = "tiny", dtype=torch.float32, device="cpu", seed: int = 0,
                         build_in_dtype: bool = False, **overrides):
    """A random-init diffusers FluxTransformer2DModel of the preset's shape.

    By default it is built in float32 and then cast, so that a bf16 model is the rounded twin of
    the float32 one with the same seed (the tests compare the two); that needs float32 +
    target-dtype memory briefly. `build_in_dtype=True` builds straight in `dtype` instead (half the
    peak memory for Flux-width benchmarks; the random values differ from the float32 build)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import logging as dlogging

    cfg = preset_config(preset)
    cfg.update(overrides)
    torch.manual_seed(seed)
    if build_in_dtype:
        with default_dtype(dtype):
            return FluxTransformer2DModel(**cfg).to(device=device)
    model = FluxTransformer2DModel(**cfg)
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # random init: the "keep in float32 / from_pretrained" hint does not apply
    try:
        return model.to(device=device, dtype=dtype)
    finally:
        dlogging.set_verbosity(level)


@dataclass
class FluxInputs:
    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor
    pooled_projections: torch.Tensor
    timestep: torch.Tensor
    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    guidance: torch.Tensor | None

    def as_kwargs(self) -> dict:
        d = dict(self.__dict__)
        if d["guidance"] is None:
            d.pop("guidance")
        return d


# the attention projections a diffusers Flux LoRA adapts (what the benchmark and the trajectory check train)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def trainable_params(model: torch.nn.Module, kind: str) -> list[torch.nn.Parameter]:
    """Set what trains for `kind` ('lora': the adapters only; anything else: every parameter) and
    return those parameters, in the model's order (what the optimiser takes)."""
    if kind == "lora":
        model.requires_grad_(False)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
    else:
        model.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def image_tokens(resolution: int) -> int:
    """Latent tokens for a square image: VAE downsamples 8x, Flux packs 2x2 latents per token."""
    side = resolution // 16
    return side * side


def image_ids(resolution: int, device="cpu") -> torch.Tensor:
    side = resolution // 16
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return ids.reshape(side * side, 3).to(device)


def make_inputs(config: dict, resolution: int = 256, text_len: int = 16, batch: int = 1, dtype=torch.float32,
                device="cpu", seed: int = 0, requires_grad: bool = False) -> FluxInputs:
    """Random inputs of the right shapes for a diffusers Flux config (latent tokens from the
    resolution; text length `text_len`: 512 for T5 in Flux-dev training, less in tests)."""
    g = torch.Generator().manual_seed(seed)
    n_img = image_tokens(resolution)
    c_in = config["in_channels"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    hs = rnd(batch, n_img, c_in).requires_grad_(requires_grad)
    ehs = rnd(batch, text_len, config["joint_attention_dim"]).requires_grad_(requires_grad)
    return FluxInputs(
        hidden_states=hs,
        encoder_hidden_states=ehs,
        pooled_projections=rnd(batch, config["pooled_projection_dim"]),
        timestep=torch.rand(batch, generator=g).to(device=device, dtype=dtype),
        img_ids=image_ids(resolution, device),
        txt_ids=torch.zeros(text_len, 3, device=device),
        guidance=torch.full((batch,), 3.5, device=device, dtype=dtype) if config.get("guidance_embeds") else None,
    )


# -- the other Flux-family models of diffusers (random init; for tests and benchmarks) -----------

FLUX2_PRESETS: dict[str, dict] = {
    # FLUX.2 [dev]: 8 double + 48 single blocks, 48 heads x 128, Mistral-width text input
    "flux2-dev": dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                      num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256,
                      mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32)),
    "tiny": dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32, mlp_ratio=2.0,
                 axes_dims_rope=(4, 4, 4, 4)),
}

CHROMA_PRESETS: dict[str, dict] = {
    "chroma": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56)),
    "tiny": dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
                 approximator_hidden_dim=32, approximator_layers=1),
}


def _build_random(cls_name: str, presets: dict[str, dict], preset: str, dtype, device, seed: int, overrides):
    import diffusers
    from diffusers.utils import logging as dlogging

    if preset not in presets:
        raise ValueError(f"unknown {cls_name} preset {preset!r}; presets: {', '.join(presets)}")
    cfg = {**presets[preset], **overrides}
    torch.manual_seed(seed)
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # random init: the "keep in float32 / from_pretrained" hint does not apply
    try:
        return getattr(diffusers, cls_name)(**cfg).to(device=device, dtype=dtype)
    finally:
        dlogging.set_verbosity(level)


def build_diffusers_flux2(preset: str = "tiny", dtype=torch.float32, device="cpu", seed: int = 0, **overrides):
    """A random-init diffusers Flux2Transformer2DModel (FLUX.2) of the preset's shape."""
    return _build_random("Flux2Transformer2DModel", FLUX2_PRESETS, preset, dtype, device, seed, overrides)


def build_diffusers_chroma(preset: str = "tiny", dtype=torch.float32, device="cpu", seed: int = 0, **overrides):
    """A random-init diffusers ChromaTransformer2DModel of the preset's shape."""
    return _build_random("ChromaTransformer2DModel", CHROMA_PRESETS, preset, dtype, device, seed, overrides)
