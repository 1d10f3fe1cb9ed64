"""bench/gpu_quick.py, the GPU check that fits nine minutes, run end to end on CPU at tiny shapes
(Triton under its interpreter, the cuda backend bound to CPU tensors): every phase writes its
rows, the Triton kernels are what the kernel rows timed, the LoRA step's loss is finite, the
parity commands succeed; and with a budget too small for the phases they are skipped with a row
saying so, not run past the budget. Nothing here asserts a time."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

pytestmark = [pytest.mark.slow, pytest.mark.triton]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_quick.py")
PHASES = ["env", "kernels", "host", "model", "compile", "lora", "parity"]


def _run(out, *args, timeout=900, **env_extra):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO, **env_extra)
    proc = subprocess.run([sys.executable, SCRIPT, str(out), "--device", "cpu", "--tiny", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(out, "rows.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_every_phase_runs_end_to_end_at_tiny_shapes(tmp_path):
    rows = _run(tmp_path / "q", "--compile-backend", "aot_eager")
    errors = [r for r in rows if r.get("status") in ("error", "skipped")]
    assert not errors, errors
    assert [p for p in PHASES if any(r["phase"] == p for r in rows)] == PHASES
    assert [r["phase"] for r in rows] == sorted((r["phase"] for r in rows), key=PHASES.index)  # in order

    kernels = [r for r in rows if r["phase"] == "kernels"]
    ops = ["rms_norm", "apply_rope", "qk_norm_rope", "layer_norm_modulate", "adaln_residual"]
    assert sorted((r["op"], r["direction"]) for r in kernels) == sorted((o, d) for o in ops
                                                                          for d in ("forward", "backward"))
    for r in kernels:
        assert r["served"] and all(s.startswith("triton.") for s in r["served"]), r
        assert r["us"] > 0 and r["copy_us"] > 0 and r["bytes"] > 0, r
        if r["direction"] == "forward":  # checked against the float64 reference at the timed shapes
            assert r["correct"] and 0 < r["rel_err_vs_float64"] < 1e-2, r
    assert {r["op"] for r in rows if r["phase"] == "host"} == set(ops)

    model = [r for r in rows if r["phase"] == "model" and r.get("summary")]
    assert sorted(r["mode"] for r in model) == ["infer", "train"]
    assert all(r["sdpa_routing"] for r in model), model
    (built,) = [r for r in rows if r["phase"] == "model" and r.get("status") == "built"]
    assert built["lora_params"] > 0, built  # the same LoRA adapters on both copies: "train" is a LoRA step
    timed = [r for r in rows if r["phase"] == "model" and "variant" in r]
    assert [r["variant"] for r in timed[:4]] == ["stock", "patched", "patched", "stock"]  # interleaved
    (checked,) = [r for r in rows if r["phase"] == "model" and r.get("status") == "checked"]
    assert checked["rel_err_patched_vs_stock_bf16"] < 3e-2, checked
    assert checked["stock_op_calls"] == 0, checked  # the stock copy is untouched by the patch
    assert {"rms_norm:triton.rms_norm", "layer_norm_modulate:triton.layer_norm_modulate"} <= set(
        checked["patched_op_calls"]), checked

    compiled = [r for r in rows if r["phase"] == "compile"]
    assert [r["variant"] for r in compiled] == ["stock", "patched"]
    assert all(r["graphs"] >= 1 for r in compiled), compiled

    (lora,) = [r for r in rows if r["phase"] == "lora"]
    assert lora["finite"] and lora["lora_params"] > 0, lora
    assert any(s.startswith("attention:") for s in lora["served"]), lora

    parity = [r for r in rows if r["phase"] == "parity"]
    assert [r["rc"] for r in parity] == [0, 0], parity
    assert os.path.exists(tmp_path / "q" / "parity_cpu.safetensors")
    assert "lora step 0: loss" in (tmp_path / "q" / "summary.md").read_text()


def test_a_budget_too_small_skips_phases_and_says_so(tmp_path):
    rows = _run(tmp_path / "b", "--budget", "0", timeout=300)
    assert [r["phase"] for r in rows] == PHASES
    for r in rows:
        assert r["status"] == "skipped" and "budget left" in r["note"], r


def test_a_crashed_or_hung_phase_is_a_row_and_the_next_phase_still_runs(tmp_path):
    """Each phase is its own process: one that dies (os.abort, as a CUDA fault does) or outlives its
    cap (killed with its process group) becomes a row, and the phases after it still run."""
    rows = _run(tmp_path / "f", "--only", "env,host,parity", "--phase-cap", "15", timeout=300,
                GPU_QUICK_FAULT="env=crash,parity=hang")
    by_phase = {}
    for r in rows:
        by_phase.setdefault(r["phase"], []).append(r)
    (env,) = by_phase["env"]
    assert env["status"] == "crashed" and "signal 6" in env["error"], env
    host = by_phase["host"]  # the phase after the crash ran, in a fresh process
    assert {r["op"] for r in host if "op" in r} == {"rms_norm", "apply_rope", "qk_norm_rope", "layer_norm_modulate",
                                                    "adaln_residual"}, host
    (parity,) = by_phase["parity"]
    assert parity["status"] == "timeout" and "cap 15 s" in parity["error"], parity
    summary = (tmp_path / "f" / "summary.md").read_text()
    assert "env: CRASHED" in summary and "parity: TIMEOUT" in summary, summary
    assert "== phase parity" in (tmp_path / "f" / "log.txt").read_text()
