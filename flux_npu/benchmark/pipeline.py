"""Random-init Flux pipeline parts of real shapes, built from configs (never from a hub).

- text encoders: transformers T5EncoderModel with T5-v1.1-XXL's config (Flux's T5) and
  CLIPTextModel with CLIP ViT-L/14's text config (Flux's pooled CLIP), or tiny ones matching the
  `tiny` preset's widths;
- the VAE: diffusers AutoencoderKL with Flux's VAE config (16 latent channels), or a tiny one.
All are random-init and built directly on the device without torch's per-layer initialisation
(`fast_build` + `cheap_init`): the benchmark measures cost, not images.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..models import default_dtype

# Flux's published text-encoder and VAE configurations (values, not files).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              layer_norm_epsilon=1e-6, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.3611,
                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)


def encoder_configs(transformer_config: dict) -> dict:
    """T5 / CLIP / VAE configs whose widths feed the given Flux transformer config: Flux's real
    ones for Flux-width presets, shrunken ones otherwise (the tiny preset)."""
    joint, pooled, c_in = (transformer_config[k]
                           for k in ("joint_attention_dim", "pooled_projection_dim", "in_channels"))
    if joint == T5_XXL["d_model"] and pooled == CLIP_L_TEXT["hidden_size"] and c_in == 4 * FLUX_VAE["latent_channels"]:
        return {"t5": dict(T5_XXL), "clip": dict(CLIP_L_TEXT), "vae": dict(FLUX_VAE)}
    t5 = dict(T5_XXL, d_model=joint, d_kv=max(8, joint // 4), num_heads=4, d_ff=2 * joint, num_layers=2,
              vocab_size=1024)
    clip = dict(CLIP_L_TEXT, hidden_size=pooled, intermediate_size=2 * pooled, num_hidden_layers=2,
                num_attention_heads=2,
                projection_dim=pooled, vocab_size=1024)
    vae = dict(FLUX_VAE, latent_channels=c_in // 4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
               norm_num_groups=8)
    return {"t5": t5, "clip": clip, "vae": vae}


@dataclass
class TextAndVae:
    t5: torch.nn.Module
    clip: torch.nn.Module
    vae: torch.nn.Module
    t5_vocab: int
    clip_vocab: int
    clip_len: int
    scaling_factor: float
    shift_factor: float

    @property
    def params(self) -> int:
        return sum(p.numel() for m in (self.t5, self.clip, self.vae.decoder) for p in m.parameters())


@contextlib.contextmanager
def fast_build(device, dtype):
    """Build modules straight on `device` in `dtype` without their random initialisation (a
    benchmark measures cost, not images): T5-XXL's init on a CPU alone took minutes. Parameters
    come out uninitialised; `cheap_init` fills them afterwards, on the device."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    with torch.device(device), default_dtype(dtype), no_init_weights():
        yield


# Random values are drawn once for a pool this long and tiled over every parameter: generating
# billions of normals costs as much as torch's own init (half a minute for Flux-mini on a CPU),
# while tiling is a memory copy. The odd length keeps the repeats from lining up with power-of-two
# row widths, so rows still differ.
_POOL = 2**20 + 3


@torch.no_grad()
def cheap_init(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """One pass of device-side fills, enough for finite, well-scaled activations: matrices and
    kernels ~ N(0, 1/(3 fan_in)) (the spread of torch's default Linear/Conv init; values tiled from
    one seeded pool), biases 0, other vectors (norm weights) 1. Buffers are left as built
    (position ids, RoPE tables are computed, not random)."""
    pools = {}
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = (3 * p[0].numel()) ** -0.5
            if not p.is_contiguous():
                p.normal_(0.0, std)
                continue
            key = (p.device, p.dtype)
            if key not in pools:
                g = torch.Generator().manual_seed(seed)
                pools[key] = torch.randn(_POOL, generator=g).to(device=p.device, dtype=p.dtype)
            pool, flat = pools[key], p.view(-1)
            for start in range(0, flat.numel(), _POOL):
                n = min(_POOL, flat.numel() - start)
                flat[start:start + n].copy_(pool[:n])
            flat.mul_(std)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
    return module


def build_text_and_vae(transformer_config: dict, dtype, device, seed: int = 0) -> TextAndVae:
    """Random-init T5 encoder, CLIP text model and VAE (decoder used), built on `device` in `dtype`."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg = encoder_configs(transformer_config)
    with fast_build(device, dtype):
        t5 = T5EncoderModel(T5Config(**cfg["t5"]))
        clip = CLIPTextModel(CLIPTextConfig(**cfg["clip"]))
        vae = AutoencoderKL(**cfg["vae"])
    vae.encoder = None  # inference decodes only; the encoder would only take memory
    mods = [cheap_init(m, seed + i).eval().requires_grad_(False) for i, m in enumerate((t5, clip, vae))]
    return TextAndVae(*mods, t5_vocab=cfg["t5"]["vocab_size"], clip_vocab=cfg["clip"]["vocab_size"],
                      clip_len=cfg["clip"]["max_position_embeddings"], scaling_factor=cfg["vae"]["scaling_factor"],
                      shift_factor=cfg["vae"]["shift_factor"])


def build_transformer(preset: str, dtype, device, seed: int = 0):
    """A random-init diffusers FluxTransformer2DModel of the preset's shape, built on `device` in
    `dtype` with `cheap_init` (seconds on a GPU for Flux-dev, where a CPU build takes minutes)."""
    from diffusers import FluxTransformer2DModel

    from ..models import preset_config

    with fast_build(device, dtype):
        model = FluxTransformer2DModel(**preset_config(preset))
    return cheap_init(model, seed)


def param_bytes(preset: str, dtype, full_pipeline: bool = False) -> int:
    """Bytes of the weights a benchmark builds (counted on the meta device: no memory, no time)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ..models import preset_config

    cfg = preset_config(preset)
    with torch.device("meta"):
        mods = [FluxTransformer2DModel(**cfg)]
        if full_pipeline:
            enc = encoder_configs(cfg)
            vae = AutoencoderKL(**enc["vae"])
            vae.encoder = None
            mods += [T5EncoderModel(T5Config(**enc["t5"])), CLIPTextModel(CLIPTextConfig(**enc["clip"])), vae]
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for m in mods for p in m.parameters()) * size


def encode_prompt(parts: TextAndVae, text_len: int, batch: int, device, gen: torch.Generator | None = None):
    """Random token ids through T5 (sequence states) and CLIP (pooled), as FluxPipeline does."""
    t5_ids = torch.randint(0, parts.t5_vocab, (batch, text_len), generator=gen).to(device)
    clip_ids = torch.randint(0, parts.clip_vocab, (batch, parts.clip_len), generator=gen).to(device)
    states = parts.t5(input_ids=t5_ids).last_hidden_state
    pooled = parts.clip(input_ids=clip_ids).pooler_output
    return states, pooled


def unpack_latents(latents: torch.Tensor, resolution: int) -> torch.Tensor:
    """Flux packs 2x2 latent patches per token: (B, (H/16)(W/16), 4C) -> (B, C, H/8, W/8)."""
    b, n, c4 = latents.shape
    side = resolution // 16
    x = latents.view(b, side, side, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, side * 2, side * 2)


def decode(parts: TextAndVae, latents: torch.Tensor, resolution: int) -> torch.Tensor:
    z = unpack_latents(latents, resolution) / parts.scaling_factor + parts.shift_factor
    return parts.vae.decode(z.to(parts.vae.dtype)).sample
