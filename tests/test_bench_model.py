"""The whole-model benchmark runner: tiny runs produce sane tables / JSON / plots, the patched
variant really routes through our ops, and a configuration that does not fit under an imposed
memory limit is reported as OOM while the rest of the run goes on. (No timing is asserted.)"""

import json
import math

import pytest
import torch

from flux_npu import ops
from flux_npu.backends import get_backend
from flux_npu.benchmark import model as M
from flux_npu.benchmark.pipeline import build_transformer
from flux_npu.cli import main


def _lora_params_expected():
    """Independent count: r * (in + out) for every targeted Linear of a fresh tiny model."""
    m = build_transformer("tiny", torch.float32, "cpu")
    n = 0
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in M.LORA_TARGETS):
            n += 16 * (mod.in_features + mod.out_features)
    return n


def test_tiny_infer_and_lora_train_cli(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["bench", "model", "--preset", "tiny", "--mode", "both", "--train", "lora", "--res", "128",
               "--steps", "2", "--train-steps", "1", "--compare", "--no-progress", "-o", str(out), "--plot", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    for head in ("model", "mode", "res", "backend", "variant", "s/img", "peak mem GB", "stock/patched time"):
        assert head in text
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [(r["mode"], r["variant"]) for r in rows] == [
        ("infer", "stock"), ("infer", "patched"), ("train-lora", "stock"), ("train-lora", "patched")]
    n_params = sum(p.numel() for p in build_transformer("tiny", torch.float32, "cpu").parameters())
    for r in rows:
        assert r["status"] == "ok" and r["model"] == "tiny" and r["res"] == 128 and r["backend"] == "cpu"
        assert math.isfinite(r["s_per_img"]) and r["s_per_img"] > 0
        assert 0.05 < r["peak_mem_gb"] < 64  # process RSS in GB: the runtime alone is ~0.3 GB
        assert r["params"] == n_params
    lora = [r for r in rows if r["mode"] == "train-lora"]
    assert all(r["trainable_params"] == _lora_params_expected() for r in lora)
    from importlib.metadata import version

    assert data["meta"]["versions"]["torch"] == version("torch") and data["meta"]["device"]
    assert {(r["mode"]) for r in data["ratios"]} == {"infer", "train-lora"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_patched_variant_routes_through_ops_and_stock_does_not():
    b = get_backend("cpu")
    setup = M._build("tiny", torch.float32, torch.device("cpu"), None, False, 0, b, None)
    ops.reset_dispatch_stats()
    r = M.run_config(setup, b, "infer", None, 64, "stock", 1, warmup=0)
    assert r.status == "ok" and not ops.dispatch_stats()["served"]
    r = M.run_config(setup, b, "infer", None, 64, "patched", 1, warmup=0)
    served = {op for (op, backend, _k) in ops.dispatch_stats()["served"] if backend == "cpu"}
    assert r.status == "ok" and {"attention", "rms_norm", "layer_norm_modulate", "rope_freqs"} <= served


def test_full_finetune_and_full_pipeline_tiny():
    res = M.run_benchmark(presets=("tiny",), modes=("infer", "train"), train_kinds=("full",), resolutions=(64,),
                          backend="cpu", variants=("patched",), dtype="fp32", steps=1, train_steps=1, warmup=0,
                          full_pipeline=True)
    infer, full = res
    assert infer.status == "ok" and infer.full_pipeline and infer.s_per_img > 0
    assert full.status == "ok" and full.mode == "train-full" and full.trainable_params == full.params


_OOM_CHILD = """
import json, torch
from flux_npu.benchmark import model as M
res = M.run_benchmark(presets=("tiny",), modes=("infer", "train"), resolutions=(64, 2048), backend="cpu",
                      variants=("patched",), dtype="fp32", steps=1, train_steps=1, warmup=0, limit_gb=0.02)
after = torch.empty(300_000_000, dtype=torch.uint8).numel()
print(json.dumps({"rows": [[r.mode, r.res, r.status, r.s_per_img, r.message] for r in res],
                  "table": M.table(res), "after": after}))
"""


def test_oom_is_reported_not_raised():
    """Under an imposed 20 MB address-space limit a 2048 px tiny run cannot allocate its
    activations (a real allocator failure), while 64 px fits; the run continues past the OOM.
    float32: CPU bf16 GEMMs go through oneDNN, whose JIT needs fresh address space of its own and
    fails under so tight a cap ("could not create a primitive") depending on what ran before.
    In a fresh interpreter: an address-space cap counts reservations, and the heap arenas that
    earlier tests leave reserved would otherwise absorb the 2048 px run."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _OOM_CHILD], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    by = {(mode, r): (status, s_img, msg) for mode, r, status, s_img, msg in out["rows"]}
    for mode in ("infer", "train-lora"):
        assert by[(mode, 64)][0] == "ok"
        status, s_img, msg = by[(mode, 2048)]
        assert status == "OOM" and s_img is None and "allocate" in msg
    assert "OOM" in out["table"]
    # and after the run the limit is gone: a large allocation works again
    assert out["after"] == 300_000_000


def test_oom_classification():
    assert M.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert M.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes"))
    assert M.is_oom(MemoryError())
    assert not M.is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert M.oom_message(RuntimeError("you tried to allocate 2000000000 bytes")).startswith("tried to allocate 2 GB")


def test_bad_arguments_fail_clearly(capsys):
    assert main(["bench", "model", "--preset", "tiny", "--res", "100", "--no-progress"]) == 1
    assert "multiple of 16" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "model", "--preset", "flux-huge"])
    assert e.value.code == 2


def test_bench_ops_delegates_to_the_ops_module(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "ops", "--help"])
    assert e.value.code == 0
    assert "flux-npu bench ops" in capsys.readouterr().out


def test_flux_text_encoder_and_vae_configs_have_published_sizes():
    """The configs behind --full-pipeline at Flux width, built on the meta device (no memory):
    parameter counts of the released T5-v1.1-XXL encoder, CLIP ViT-L/14 text model and Flux VAE."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flux_npu.benchmark.pipeline import encoder_configs
    from flux_npu.models import preset_config

    cfg = encoder_configs(preset_config("flux-mini"))
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**cfg["t5"]))
        clip = CLIPTextModel(CLIPTextConfig(**cfg["clip"]))
        vae = AutoencoderKL(**cfg["vae"])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(t5) == 4_762_310_656
    assert count(clip) == 123_060_480
    assert count(vae) == 83_819_683
    # the tiny preset gets shrunken encoders whose widths feed it
    tiny = encoder_configs(preset_config("tiny"))
    assert tiny["t5"]["d_model"] == 32 and tiny["clip"]["hidden_size"] == 32 and tiny["vae"]["latent_channels"] == 4
