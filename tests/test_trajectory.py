"""Training-trajectory check (issue 17 item 2): a short deterministic LoRA and full fine-tune of a
small Flux-width model on synthetic data, judged against the shipped CPU float32 reference with a
tolerance of 2x the measured bf16 run-to-run spread. It passes on cpu and on the npu code path
(torch_npu CONTRACT EMULATOR: CPU tensors, not hardware), and fails when an op is perturbed."""

import dataclasses
import math

import pytest
import torch

from flux_npu import trajectory as T
from flux_npu.backends import cpu as cpu_backend
from flux_npu.backends import register_backend, unregister_backend
from flux_npu.ops import reference, registry


def test_shipped_reference_and_its_measured_tolerance():
    ref = T.load_reference()
    assert ref["config"] == json_roundtrip(T.CONFIG) and ref["run"] == T.RUN and ref["rule"] == T.RULE
    assert "stochastically" in ref["how"]
    for mode in T.MODES:
        m = ref["modes"][mode]
        for k in ("loss", "grad_norm"):
            assert len(m["reference"][k]) == T.RUN["steps"] and all(math.isfinite(v) for v in m["reference"][k])
            assert len(m["spread_runs"][k]) == len(T.SPREAD_SEEDS)
            assert m["spread"][k] == max(m["spread_runs"][k]) > 0  # measured, and bf16 does differ
            assert m["tolerance"][k] == pytest.approx(max(T.RULE * m["spread"][k], T.FLOOR))


def json_roundtrip(d):
    import json

    return json.loads(json.dumps(d))


def test_cpu_float32_rerun_reproduces_the_reference():
    ref = T.load_reference()
    got = T.run("cpu", "lora", torch.float32, patched=False)
    for k in ("loss", "grad_norm"):
        assert max(T._rel_dev(got[k], ref["modes"]["lora"]["reference"][k])) <= T.FLOOR


def test_patched_bf16_on_cpu_follows_the_reference(tmp_path):
    res = T.check("cpu")
    assert res["dtype"] == "bfloat16" and res["ok"], {m: e["worst"] for m, e in res["modes"].items()}
    T.plot(res, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 10_000


@pytest.mark.emulator
def test_npu_code_path_follows_the_reference(npu_emulated):
    from flux_npu.ops import dispatch_stats, reset_dispatch_stats

    reset_dispatch_stats()
    res = T.check(npu_emulated, modes=("lora",))
    assert res["ok"], res["modes"]["lora"]["worst"]
    served = {(op, k) for (op, b, k), n in dispatch_stats()["served"].items() if b == "npu" and n}
    assert ("attention", "torch_npu.npu_fusion_attention") in served  # training: FA, not FIA
    assert any(op == "qk_norm_rope" or k == "torch_npu.npu_rms_norm" for op, k in served), served


@pytest.fixture
def perturbed_backend(monkeypatch):
    """cpu, except that attention's softmax scale is 5% off (the size of bug a wrong default scale
    or a mis-rounded constant makes): op-level it is a 'small' error, in training it must show."""
    b = dataclasses.replace(cpu_backend.BACKEND, name="traj_perturbed", kernel_modules=(), priority=999)
    register_backend(b, replace=True)

    def off_scale(backend, q, k, v, mask, scale, layout):
        s = (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale) * 1.05
        return reference.attention(q, k, v, mask, s, layout)

    monkeypatch.setitem(registry._TABLE, ("attention", "traj_perturbed"),
                        [registry.Kernel("attention", "traj_perturbed", "off_scale", off_scale)])
    registry.invalidate_plans()
    yield b
    unregister_backend("traj_perturbed")


def test_a_perturbed_op_fails_the_trajectory(perturbed_backend):
    res = T.check(perturbed_backend, modes=("lora",))
    assert not res["ok"]
    worst = res["modes"]["lora"]["worst"]
    assert any(w["deviation"] > w["tolerance"] for w in worst.values()), worst
