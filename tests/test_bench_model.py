"""The whole-model benchmark runner: tiny runs produce sane tables / JSON / plots, the patched
variant really routes through our ops, a configuration that does not fit under an imposed
memory limit is reported as OOM while the rest of the run goes on, an error or a dead process
becomes a row (traceback in the log), rows stream to the JSON, and too-small limits and a
missing matplotlib are refused up front. (No timing is asserted.)"""

import dataclasses
import json
import math
import os
import sys

import pytest
import torch

from flux_npu import ops
from flux_npu.backends import get_backend
from flux_npu.benchmark import model as M
from flux_npu.benchmark.pipeline import build_transformer
from flux_npu.benchmark.stats import compare
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
    rc = main(["bench", "model", "--preset", "tiny", "--mode", "both", "--train", "lora", "--res", "64",
               "--steps", "2", "--train-steps", "1", "--repeats", "3", "--compare", "--no-progress", "-o", str(out),
               "--plot", str(png)])
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
        assert r["status"] == "ok" and r["model"] == "tiny" and r["res"] == 64 and r["backend"] == "cpu"
        assert math.isfinite(r["s_per_img"]) and r["s_per_img"] > 0
        assert 0.05 < r["peak_mem_gb"] < 64  # process RSS in GB: the runtime alone is ~0.3 GB
        assert r["params"] == n_params
        # median and spread over the 3 repeats, all of them kept
        assert r["repeats"] == 3 and len(r["s_per_img_all"]) == 3
        assert r["s_per_img"] == sorted(r["s_per_img_all"])[1]
        assert r["s_per_img_min"] <= r["s_per_img_q1"] <= r["s_per_img"] <= r["s_per_img_q3"] <= r["s_per_img_max"]
    lora = [r for r in rows if r["mode"] == "train-lora"]
    assert all(r["trainable_params"] == _lora_params_expected() for r in lora)
    # the build that ran (2.11.0+cu130 on the GPU image, whose wheel's metadata says a bare 2.11.0)
    assert data["meta"]["versions"]["torch"] == torch.__version__ and data["meta"]["device"]
    assert {(r["mode"]) for r in data["ratios"]} == {"infer", "train-lora"}
    for ratio in data["ratios"]:  # the verdict is benchmark.stats' on the per-repeat times
        s = next(r for r in rows if r["mode"] == ratio["mode"] and r["variant"] == "stock")
        p = next(r for r in rows if r["mode"] == ratio["mode"] and r["variant"] == "patched")
        v = compare(s["s_per_img_all"], p["s_per_img_all"])
        assert (ratio["significant"], ratio["p_value"]) == (v.significant, v.p_value)
        assert not ratio["significant"]  # 3 repeats a side: the exact test's smallest p is 0.1 > 0.05
    assert data["meta"]["complete"] is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_patched_variant_routes_through_ops_and_stock_does_not():
    b = get_backend("cpu")
    setup = M._build_setup("tiny", torch.float32, torch.device("cpu"), None, False, 0, b, False)
    ops.reset_dispatch_stats()
    r = M.run_config(setup, b, "infer", None, 64, "stock", 1, warmup=0)
    assert r.status == "ok" and not ops.dispatch_stats()["served"]
    r = M.run_config(setup, b, "infer", None, 64, "patched", 1, warmup=0)
    served = {op for (op, backend, _k) in ops.dispatch_stats()["served"] if backend == "cpu"}
    assert r.status == "ok" and {"attention", "rms_norm", "layer_norm_modulate", "rope_freqs"} <= served


def test_full_finetune_and_full_pipeline_tiny():
    res = M.run_benchmark(presets=("tiny",), modes=("infer", "train"), train_kinds=("full",), resolutions=(64,),
                          backend="cpu", variants=("patched",), dtype="fp32", steps=1, train_steps=1, warmup=0,
                          full_pipeline=True, repeats=1)
    infer, full = res
    assert infer.status == "ok" and infer.full_pipeline and infer.s_per_img > 0
    assert full.status == "ok" and full.mode == "train-full" and full.trainable_params == full.params


_OOM_CHILD = """
import json, torch
from flux_npu.benchmark import model as M
res = M.run_benchmark(presets=("tiny",), modes=("infer", "train"), resolutions=(64, 2048), backend="cpu",
                      variants=("patched",), dtype="fp32", steps=1, train_steps=1, warmup=0, limit_gb=0.02, repeats=1)
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
    assert main(["bench", "model", "--preset", "flux-huge"]) == 1
    assert "unknown preset(s) ['flux-huge']; choose from tiny, flux-mini, flux-dev" in capsys.readouterr().err
    assert main(["bench", "model", "--backend", "tpu"]) == 1
    assert "unknown flux_npu backend 'tpu'" in capsys.readouterr().err


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


def test_pipeline_parts_built_on_device_without_torch_init():
    """--full-pipeline builds T5 / CLIP / VAE straight in the dtype with torch's per-layer init
    skipped and one cheap device-side fill instead: matrices ~ N(0, 1/(3 fan_in)), biases 0, norm
    weights 1; computed buffers (CLIP position ids) intact."""
    from flux_npu.benchmark import pipeline
    from flux_npu.models import preset_config

    parts = pipeline.build_text_and_vae(preset_config("tiny"), torch.bfloat16, "cpu", seed=3)
    for m in (parts.t5, parts.clip, parts.vae):
        for name, p in m.named_parameters():
            assert p.dtype == torch.bfloat16 and p.device.type == "cpu" and torch.isfinite(p).all(), name
    w = parts.t5.encoder.block[0].layer[0].SelfAttention.q.weight.float()
    want = (3 * w.shape[1]) ** -0.5
    assert abs(w.std().item() - want) < 0.25 * want
    assert torch.equal(parts.clip.text_model.embeddings.position_ids[0] if hasattr(parts.clip, "text_model")
                       else dict(parts.clip.named_buffers())["embeddings.position_ids"][0],
                       torch.arange(parts.clip_len))
    ln = [p for n, p in parts.clip.named_parameters() if "layer_norm" in n and n.endswith("weight")][0]
    assert torch.all(ln == 1)


@pytest.fixture
def failing_patched(monkeypatch):
    """The patched variant raises inside its configuration (a stand-in for a kernel bug)."""
    real = M._variant_ctx

    def ctx(variant, backend):
        if variant == "patched":
            raise RuntimeError("kernel exploded\nsecond line")
        return real(variant, backend)

    monkeypatch.setattr(M, "_variant_ctx", ctx)


def test_error_becomes_a_row_with_its_traceback_in_the_log(tmp_path, capsys, failing_patched):
    out = tmp_path / "b.json"
    rc = main(["bench", "model", "--preset", "tiny", "--mode", "infer", "--res", "64", "--steps", "1",
               "--repeats", "1", "--compare", "--no-progress", "-o", str(out)])
    assert rc == 1
    cap = capsys.readouterr()
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["stock"]["status"] == "ok"
    assert rows["patched"]["status"] == "error" and rows["patched"]["message"] == "RuntimeError: kernel exploded"
    log = tmp_path / "b.log"
    assert rows["patched"]["log"] == str(log)
    text = log.read_text()
    assert "tiny infer 64px patched: error" in text and "Traceback" in text and "kernel exploded" in text
    assert "traceback" not in rows["patched"]  # the JSON names the log, it does not carry the trace
    assert "tiny infer 64px patched: error: RuntimeError: kernel exploded" in cap.out  # printed as it finished
    assert f"traceback: {log}" in cap.err


def test_rows_stream_to_the_json_as_they_finish(tmp_path, monkeypatch):
    snapshots = []
    real = M.write_json_atomic

    def spy(path, data):
        real(path, data)
        on_disk = json.loads(open(path).read())  # what a reader sees at that moment
        snapshots.append((len(on_disk["results"]), on_disk["meta"]["complete"]))

    monkeypatch.setattr(M, "write_json_atomic", spy)
    out = tmp_path / "s.json"
    assert main(["bench", "model", "--preset", "tiny", "--mode", "infer", "--res", "64", "128", "--steps", "1",
                 "--repeats", "1", "--no-progress", "-o", str(out)]) == 0
    assert snapshots == [(1, False), (2, False), (2, True)]
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temporary left behind


_CRASHY_PYTHON = """#!/bin/sh
# a Python that dies by SIGSEGV when asked to run the stock variant (a stand-in for a CUDA fault)
case "$*" in *'"variants": ["stock"]'*) kill -SEGV $$ ;; esac
exec {python} "$@"
"""


def test_isolate_turns_a_dead_process_into_a_row(tmp_path, monkeypatch, capsys):
    crashy = tmp_path / "python"
    crashy.write_text(_CRASHY_PYTHON.format(python=sys.executable))
    crashy.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(crashy))
    out = tmp_path / "iso.json"
    rc = main(["bench", "model", "--preset", "tiny", "--mode", "infer", "--res", "64", "--steps", "1",
               "--repeats", "1", "--compare", "--isolate", "--no-progress", "-o", str(out)])
    assert rc == 1
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["patched"]["status"] == "ok" and rows["patched"]["s_per_img"] > 0  # ran in its own process
    assert rows["stock"]["status"] == "crashed" and "killed by SIGSEGV" in rows["stock"]["message"]
    assert "crashed" in (tmp_path / "iso.log").read_text()


_HANGING_PYTHON = """#!/bin/sh
# a Python that hangs when asked to run the stock variant (a stand-in for a hung device)
case "$*" in *'"variants": ["stock"]'*) exec sleep 60 ;; esac
exec {python} "$@"
"""


def test_isolate_timeout_turns_a_hung_process_into_a_row(tmp_path, monkeypatch):
    hanging = tmp_path / "python"
    hanging.write_text(_HANGING_PYTHON.format(python=sys.executable))
    hanging.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(hanging))
    rows = M.run_benchmark(presets=("tiny",), modes=("infer",), resolutions=(64, 128), backend="cpu",
                           variants=("stock",), dtype="fp32", steps=1, warmup=0, repeats=1, isolate=True, timeout_s=2)
    # both configurations got their row: the run went on past the first hung process
    assert [(r.res, r.status) for r in rows] == [(64, "timeout"), (128, "timeout")]
    assert "killed after 2 s" in rows[0].message


def test_timeout_without_isolate_is_refused(capsys):
    assert main(["bench", "model", "--preset", "tiny", "--timeout-s", "5", "--no-progress"]) == 1
    assert "--timeout-s needs --isolate" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["0.001", "0.003", "0"])
def test_memory_limit_too_small_is_refused_up_front(capsys, limit):
    assert main(["bench", "model", "--preset", "tiny", "--res", "64", "--no-progress", "--memory-limit-gb", limit]) == 1
    err = capsys.readouterr().err
    assert "--memory-limit-gb" in err and ("too small" in err or "must be positive" in err)


def test_memory_limit_below_the_weights_is_refused_on_a_device():
    """On a GPU/NPU the allocator fraction covers the weights: a limit below them cannot build
    the model. Counted on the meta device (no GPU needed): flux-mini's 3.2 B bf16 parameters."""
    from flux_npu.backends import cpu as cpu_backend

    gpu_like = dataclasses.replace(cpu_backend.BACKEND, name="gpu_like", device_type="cuda")
    with pytest.raises(ValueError, match=r"smaller than the weights of preset flux-mini alone \(6\.[0-9]+ GB"):
        M.check_memory_limit(("flux-mini",), torch.bfloat16, 1.0, gpu_like, False)
    M.check_memory_limit(("tiny",), torch.bfloat16, 1.0, gpu_like, False)  # fits


def test_plot_without_matplotlib_fails_before_the_run(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    ran = []
    monkeypatch.setattr(M, "run_benchmark", lambda **kw: ran.append(kw) or [])
    assert main(["bench", "model", "--preset", "tiny", "--no-progress", "--plot", str(tmp_path / "p.png")]) == 1
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and "flux-npu[plot]" in err
    assert not ran


def test_list_options_take_spaces_and_commas(tmp_path):
    out = tmp_path / "l.json"
    assert main(["bench", "model", "--preset", "tiny", "--mode", "infer", "--res", "64,80", "--steps", "1",
                 "--repeats", "1", "--no-progress", "-o", str(out)]) == 0
    assert [r["res"] for r in json.loads(out.read_text())["results"]] == [64, 80]


def test_compile_switch_runs_each_variant_through_its_own_compiled_module():
    """--compile: stock and patched each get a torch.compile wrapper of the same transformer
    (the patched one traces the patched code); without it the transformer runs as is. Only the
    wiring is checked here: compiling a model on CPU takes minutes."""
    b = get_backend("cpu")
    setup = M._build_setup("tiny", torch.float32, torch.device("cpu"), None, False, 0, b, True)
    setup.use("stock")
    stock = setup.active
    setup.use("patched")
    patched = setup.active
    assert stock is not patched and stock is not setup.transformer
    assert stock._orig_mod is setup.transformer and patched._orig_mod is setup.transformer
    setup.use("stock")
    assert setup.active is stock  # built once per variant
    plain = M._build_setup("tiny", torch.float32, torch.device("cpu"), None, False, 0, b, False)
    plain.use("patched")
    assert plain.active is plain.transformer
