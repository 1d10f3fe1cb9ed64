"""The parity catalogue: every op of `flux_npu.ops` plus a whole diffusers Flux double block and
single block, at named shape sets, in float32 / bfloat16 / float16, forward and backward.

A case is pure data plus two functions: `make(shapes, gen, dtype)` draws its inputs on the CPU
from a seeded generator (so a golden's inputs never depend on the recording device), and
`run(tensors, backend, module)` computes its outputs on a backend. Backward is the same for every
case: stored cotangents (`d_<output>`, drawn with the inputs) are pushed through
`torch.autograd.backward`, and the gradients of the inputs named in `grads` (and, for blocks, of
the parameters) are compared.

Shape sets: the named Flux shapes of `flux_npu.shapes` (tiny, width, flux-mini, flux-dev; `width`
is per-op only: a Flux-width double block is ~340M parameters). Flux-mini and Flux-dev blocks have
the same shape; the sets differ in sequence length, the resolution each model is usually run at.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import ops
from ..ops import reference
from ..shapes import DTYPE_NAMES, DTYPES, SHAPES, FluxShape  # noqa: F401  (DTYPE_NAMES: parity's names too)

# Whole blocks chain ~10 roundings per element (projections, norms, attention, MLP) and
# two devices round differently at each; their errors are judged against the per-dtype table
# times this factor. Single ops are judged against the table as is.
BLOCK_FACTOR = 4.0

# Blocks whose parameters total at most this many elements store them (and all their gradients)
# in the golden. Larger blocks (Flux width) are rebuilt from the seed on the CPU and verified
# against a stored checksum, and only gradients of parameters up to PARAM_GRAD_LIMIT elements
# (biases, norm weights: each the sum of the output gradient flowing through its layer) are kept.
PARAM_STORE_LIMIT = 4_000_000
PARAM_GRAD_LIMIT = 1_000_000


Shapes = FluxShape  # the name parity has always used for a shape set
# parity's shape sets: the table's, less the benchmark-only one
SHAPE_SETS: dict[str, Shapes] = {n: s for n, s in SHAPES.items() if n != "quick"}


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # the catalogue op exercised, or "block"
    make: Callable  # (shapes, gen, dtype) -> dict of CPU input tensors (cotangents included)
    run: Callable  # (tensors, backend, module, stock) -> dict of outputs
    grads: Sequence[str] = ()  # inputs whose gradients are compared
    build: Callable | None = None  # (shapes) -> nn.Module (float32, CPU), blocks only
    factor: float = 1.0
    doc: str = ""
    needs_blocks: bool = False
    float32_only: bool = False  # outputs are float32 whatever the input (RoPE tables)


def case_seed(seed: int, case_id: str) -> int:
    """Each case draws from its own stream, so any subset of cases reproduces the same inputs."""
    return (seed * 1_000_003 + zlib.crc32(case_id.encode())) % (2**63)


def _randn(gen, shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _cot(gen, outs: dict[str, tuple[tuple, torch.dtype]]):
    return {f"d_{n}": _randn(gen, shape, dt) for n, (shape, dt) in outs.items()}


def _positions(s: Shapes) -> torch.Tensor:
    """Flux position ids (txt zeros, then an image grid): (seq, 3) float32."""
    side = max(1, int(round(s.img ** 0.5)))
    img = torch.zeros(s.img, 3)
    idx = torch.arange(s.img)
    img[:, 1] = (idx // side).float()
    img[:, 2] = (idx % side).float()
    return torch.cat([torch.zeros(s.txt, 3), img], dim=0)


def _rope_cos_sin(s: Shapes):
    """diffusers' (cos, sin) pair for the shape set's token positions, from the reference."""
    pos = _positions(s)
    parts = [reference.rope_freqs(pos[:, i], d, 10000.0, "cos_sin") for i, d in enumerate(s.axes)]
    return torch.cat([p[0] for p in parts], dim=-1), torch.cat([p[1] for p in parts], dim=-1)


def _rope_bfl(s: Shapes):
    pos = _positions(s)
    parts = [reference.rope_freqs(pos[:, i], d, 10000.0, "bfl") for i, d in enumerate(s.axes)]
    return torch.cat(parts, dim=-3).unsqueeze(0).unsqueeze(0)  # (1, 1, S, D/2, 2, 2)


# -- op cases ---------------------------------------------------------------------------------


def _head_shape(s: Shapes, layout="BHSD"):
    return (s.batch, s.heads, s.seq, s.head_dim) if layout == "BHSD" else (s.batch, s.seq, s.heads, s.head_dim)


def make_attention(s, g, dt):
    shp = _head_shape(s, "BSHD")  # diffusers hands (B, S, H, D) to the dispatcher
    t = {n: _randn(g, shp, dt) for n in ("q", "k", "v")}
    t.update(_cot(g, {"out": (shp, dt)}))
    return t


def run_attention(t, b, m, stock):
    fn = reference.attention if stock else (lambda *a, **k: ops.attention(*a, **k, backend=b))
    return {"out": fn(t["q"], t["k"], t["v"], None, None, "BSHD")}


def make_attention_masked(s, g, dt):
    shp = _head_shape(s)
    t = {n: _randn(g, shp, dt) for n in ("q", "k", "v")}
    mask = torch.rand(s.batch, 1, s.seq, s.seq, generator=g) > 0.3
    mask[..., 0] = True  # every query attends somewhere
    t["mask"] = mask
    t.update(_cot(g, {"out": (shp, dt)}))
    return t


def run_attention_masked(t, b, m, stock):
    fn = reference.attention if stock else (lambda *a, **k: ops.attention(*a, **k, backend=b))
    return {"out": fn(t["q"], t["k"], t["v"], t["mask"], None, "BHSD")}


def make_attention_bias(s, g, dt):
    """An additive bias mask (ComfyUI Redux's attn_bias, ChromaPipeline's 0/1 mask used additively):
    finite values plus -inf on some keys; served on npu through npu_fusion_attention's pse."""
    shp = _head_shape(s)
    t = {n: _randn(g, shp, dt) for n in ("q", "k", "v")}
    bias = torch.randn(s.batch, 1, s.seq, s.seq, generator=g) * 2
    bias[..., 1::3] = float("-inf")  # masked keys; key 0 always stays
    t["mask"] = bias.to(dt)
    t.update(_cot(g, {"out": (shp, dt)}))
    return t


def make_rope_freqs(s, g, dt):
    return {"pos": _positions(s), "axes": torch.tensor(s.axes, dtype=torch.int64)}


def run_rope_freqs(form):
    def run(t, b, m, stock):
        out = {}
        for i, d in enumerate(int(a) for a in t["axes"].tolist()):
            pos = t["pos"][:, i]
            if stock:
                r = reference.rope_freqs(pos, d, 10000.0, form)
            else:
                r = ops.rope_freqs(pos, d, 10000.0, form, backend=b)
            if form == "bfl":
                out[f"axis{i}"] = r
            else:
                out[f"cos{i}"], out[f"sin{i}"] = r
        return out

    return run


def make_apply_rope_cos_sin(s, g, dt):
    shp = _head_shape(s, "BSHD")
    cos, sin = _rope_cos_sin(s)
    t = {"x": _randn(g, shp, dt), "cos": cos, "sin": sin}
    t.update(_cot(g, {"out": (shp, dt)}))
    return t


def run_apply_rope_cos_sin(t, b, m, stock):
    fn = reference.apply_rope if stock else (lambda *a: ops.apply_rope(*a, backend=b))
    return {"out": fn(t["x"], (t["cos"], t["sin"]), 1)}


def make_apply_rope_bfl(s, g, dt):
    shp = _head_shape(s)
    t = {"x": _randn(g, shp, dt), "freqs": _rope_bfl(s)}
    t.update(_cot(g, {"out": (shp, dt)}))
    return t


def run_apply_rope_bfl(t, b, m, stock):
    fn = reference.apply_rope if stock else (lambda *a: ops.apply_rope(*a, backend=b))
    return {"out": fn(t["x"], t["freqs"], 2)}


def make_rms_norm(s, g, dt):
    shp = _head_shape(s, "BSHD")  # Flux's QK norm: over the head dim
    t = {"x": _randn(g, shp, dt, 3.0), "weight": (1.0 + 0.1 * torch.randn(s.head_dim, generator=g)).to(dt)}
    t.update(_cot(g, {"out": (shp, dt)}))
    return t


def run_rms_norm(t, b, m, stock):
    fn = reference.rms_norm if stock else (lambda *a: ops.rms_norm(*a, backend=b))
    return {"out": fn(t["x"], t["weight"], 1e-6, None)}


def make_layer_norm_modulate(s, g, dt):
    shp = (s.batch, s.hidden_seq, s.hidden)
    t = {
        "x": _randn(g, shp, dt, 2.0),
        "shift": _randn(g, (s.batch, 1, s.hidden), dt, 0.5),
        "scale": _randn(g, (s.batch, 1, s.hidden), dt, 0.5),
    }
    t.update(_cot(g, {"out": (shp, dt)}))
    return t


def run_layer_norm_modulate(t, b, m, stock):
    fn = reference.layer_norm_modulate if stock else (lambda *a: ops.layer_norm_modulate(*a, backend=b))
    return {"out": fn(t["x"], t["shift"], t["scale"], 1e-6)}


def make_gated_residual(s, g, dt):
    shp = (s.batch, s.hidden_seq, s.hidden)
    t = {"x": _randn(g, shp, dt), "gate": _randn(g, (s.batch, 1, s.hidden), dt), "y": _randn(g, shp, dt)}
    t.update(_cot(g, {"out": (shp, dt)}))
    return t


def run_gated_residual(t, b, m, stock):
    fn = reference.gated_residual if stock else (lambda *a: ops.gated_residual(*a, backend=b))
    return {"out": fn(t["x"], t["gate"], t["y"])}


def make_adaln_residual(s, g, dt):
    shp, mod = (s.batch, s.hidden_seq, s.hidden), (s.batch, 1, s.hidden)
    t = {
        "x": _randn(g, shp, dt, 2.0),
        "gate": _randn(g, mod, dt),
        "y": _randn(g, shp, dt),
        "shift": _randn(g, mod, dt, 0.5),
        "scale": _randn(g, mod, dt, 0.5),
    }
    t.update(_cot(g, {"h": (shp, dt), "out": (shp, dt)}))
    return t


def run_adaln_residual(t, b, m, stock):
    args = (t["x"], t["gate"], t["y"], t["shift"], t["scale"], 1e-6)
    h, n = reference.adaln_residual(*args) if stock else ops.adaln_residual(*args, backend=b)
    return {"h": h, "out": n}


def make_qk_norm_rope(s, g, dt):
    shp = _head_shape(s, "BSHD")
    cos, sin = _rope_cos_sin(s)
    w = lambda: (1.0 + 0.1 * torch.randn(s.head_dim, generator=g)).to(dt)  # noqa: E731
    t = {"q": _randn(g, shp, dt, 3.0), "k": _randn(g, shp, dt, 3.0), "q_weight": w(), "k_weight": w(),
         "cos": cos, "sin": sin}
    t.update(_cot(g, {"q_out": (shp, dt), "k_out": (shp, dt)}))
    return t


def run_qk_norm_rope(t, b, m, stock):
    args = (t["q"], t["k"], t["q_weight"], t["k_weight"], (t["cos"], t["sin"]), 1e-6, 1)
    q, k = reference.qk_norm_rope(*args) if stock else ops.qk_norm_rope(*args, backend=b)
    return {"q_out": q, "k_out": k}


# -- block cases ------------------------------------------------------------------------------


def build_double_block(s: Shapes):
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    return FluxTransformerBlock(dim=s.block_dim, num_attention_heads=s.heads, attention_head_dim=s.head_dim)


def build_single_block(s: Shapes):
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    return FluxSingleTransformerBlock(dim=s.block_dim, num_attention_heads=s.heads, attention_head_dim=s.head_dim)


def make_block(s, g, dt):
    d = s.block_dim
    cos, sin = _rope_cos_sin(s)
    t = {
        "hidden_states": _randn(g, (s.batch, s.img, d), dt),
        "encoder_hidden_states": _randn(g, (s.batch, s.txt, d), dt),
        "temb": _randn(g, (s.batch, d), dt),
        "cos": cos,
        "sin": sin,
    }
    t.update(_cot(g, {"encoder_hidden_states_out": ((s.batch, s.txt, d), dt),
                      "hidden_states_out": ((s.batch, s.img, d), dt)}))
    return t


def run_block(t, b, module, stock):
    """The block's forward; unless `stock`, through `flux_npu.patch(backend, model=module)`."""
    import contextlib

    from ..patches import patch

    ctx = contextlib.nullcontext() if stock else patch(backend=b, targets=["diffusers"], model=module)
    with ctx:
        enc, hid = module(
            hidden_states=t["hidden_states"],
            encoder_hidden_states=t["encoder_hidden_states"],
            temb=t["temb"],
            image_rotary_emb=(t["cos"], t["sin"]),
        )
    return {"encoder_hidden_states_out": enc, "hidden_states_out": hid}


_BLOCK_GRADS = ("hidden_states", "encoder_hidden_states", "temb")

CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("attention", "attention", make_attention, run_attention, ("q", "k", "v"),
             doc="SDPA, diffusers layout (B, S, H, D), no mask"),
        Case("attention_masked", "attention", make_attention_masked, run_attention_masked, ("q", "k", "v"),
             doc="SDPA, (B, H, S, D), boolean mask"),
        Case("attention_bias", "attention", make_attention_bias, run_attention_masked, ("q", "k", "v"),
             doc="SDPA, (B, H, S, D), additive bias mask with -inf keys (npu: pse)"),
        Case("rope_freqs_cos_sin", "rope_freqs", make_rope_freqs, run_rope_freqs("cos_sin"), float32_only=True,
             doc="RoPE tables, diffusers (cos, sin) form, per axis"),
        Case("rope_freqs_bfl", "rope_freqs", make_rope_freqs, run_rope_freqs("bfl"), float32_only=True,
             doc="RoPE tables, BFL rotation-matrix form, per axis"),
        Case("apply_rope_cos_sin", "apply_rope", make_apply_rope_cos_sin, run_apply_rope_cos_sin, ("x",),
             doc="RoPE, diffusers form, (B, S, H, D)"),
        Case("apply_rope_bfl", "apply_rope", make_apply_rope_bfl, run_apply_rope_bfl, ("x",),
             doc="RoPE, BFL form, (B, H, S, D)"),
        Case("rms_norm", "rms_norm", make_rms_norm, run_rms_norm, ("x", "weight"), doc="QK RMSNorm over the head dim"),
        Case("layer_norm_modulate", "layer_norm_modulate", make_layer_norm_modulate, run_layer_norm_modulate,
             ("x", "shift", "scale"), doc="AdaLN LayerNorm + modulation at hidden width"),
        Case("gated_residual", "gated_residual", make_gated_residual, run_gated_residual, ("x", "gate", "y"),
             doc="x + gate * y at hidden width"),
        Case("adaln_residual", "adaln_residual", make_adaln_residual, run_adaln_residual,
             ("x", "gate", "y", "shift", "scale"), doc="x + gate * y, then AdaLN of it, at hidden width"),
        Case("qk_norm_rope", "qk_norm_rope", make_qk_norm_rope, run_qk_norm_rope, ("q", "k", "q_weight", "k_weight"),
             doc="QK RMSNorm then RoPE"),
        Case("double_block", "block", make_block, run_block, _BLOCK_GRADS, build=build_double_block,
             factor=BLOCK_FACTOR, needs_blocks=True, doc="diffusers FluxTransformerBlock (random init, seeded)"),
        Case("single_block", "block", make_block, run_block, _BLOCK_GRADS, build=build_single_block,
             factor=BLOCK_FACTOR, needs_blocks=True, doc="diffusers FluxSingleTransformerBlock (random init, seeded)"),
    ]
}


@dataclass(frozen=True)
class CaseSpec:
    """One (shape set, case, dtype) entry: what a golden holds one record of."""

    shapes: Shapes
    case: Case
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"{self.shapes.name}.{self.case.name}.{DTYPE_NAMES[self.dtype]}"

    @property
    def tolerance_factor(self) -> float:
        return self.case.factor


def parse_dtypes(text) -> tuple[torch.dtype, ...]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise ValueError(f"unknown dtype(s) {bad or names!r}; choose from {', '.join(DTYPES)} "
                         "(space or comma separated)")
    return tuple(DTYPES[n] for n in names)


def parse_shape_sets(text) -> tuple[Shapes, ...]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    bad = [n for n in names if n not in SHAPE_SETS]
    if bad or not names:
        raise ValueError(f"unknown shape set(s) {bad or names!r}; choose from {', '.join(SHAPE_SETS)} "
                         "(space or comma separated)")
    return tuple(SHAPE_SETS[n] for n in names)


def select(shape_sets="tiny,width", dtypes="fp32,bf16,fp16", cases: Sequence[str] | None = None):
    """The CaseSpecs of the catalogue for these shape sets, dtypes and (optionally) case names."""
    if cases:
        unknown = [c for c in cases if c not in CASES]
        if unknown:
            raise ValueError(f"unknown parity case(s) {unknown}; cases: {', '.join(CASES)}")
    out = []
    for s in parse_shape_sets(shape_sets):
        for c in CASES.values():
            if cases and c.name not in cases:
                continue
            if c.needs_blocks and not s.blocks:
                continue
            for dt in parse_dtypes(dtypes):
                if c.float32_only and dt != torch.float32:
                    continue
                out.append(CaseSpec(s, c, dt))
    return out


def make_inputs(spec: CaseSpec, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(case_seed(seed, spec.id))
    t = spec.case.make(spec.shapes, g, spec.dtype)
    return {k: v.contiguous() for k, v in t.items()}


def build_module(spec: CaseSpec, seed: int):
    """The block of a block case: random init from the case's seed on the CPU in float32 (so every
    device starts from the same values), then cast to the case dtype."""
    torch.manual_seed(case_seed(seed, spec.id + "/params"))
    return spec.case.build(spec.shapes).to(spec.dtype)


def param_checksum(module) -> str:
    """A float64 fingerprint of every parameter (sum and sum of squares), to verify a block
    rebuilt from the seed is the one the golden was recorded with."""
    s1 = s2 = 0.0
    for _, p in sorted(module.named_parameters()):
        d = p.detach().double()
        s1 += d.sum().item()
        s2 += d.pow(2).sum().item()
    return f"{s1:.10e},{s2:.10e}"
