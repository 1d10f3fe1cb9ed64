"""msprobe-compatible op names (issue 17 item 3), with the real mindstudio-probe package on CPU.

A patched run dumped by msprobe must name flux_npu's ops the same way on every device, so that
`msprobe compare` lines a GPU run and a 910B run up op by op. Here: the cpu backend and the npu
code path (torch_npu CONTRACT EMULATOR, CPU tensors: not a hardware result) dump one step of the
same random-init Flux; msprobe's own compare must pair every flux_npu.* entry of one dump with
the other's."""

import csv
import glob
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import flux_npu
from flux_npu import ops, probe

pytestmark = pytest.mark.skipif(importlib.util.find_spec("msprobe") is None,
                                reason="needs mindstudio-probe; pip install -e '.[all]'")

CHILD = os.environ.get("FLUX_NPU_MSPROBE_CHILD") == "1"


def in_own_process(test):
    """Run `test` in a pytest child process. msprobe patches torch's APIs, dynamo's frame conversion,
    torch.jit.script and Triton's launcher process-wide and keeps them after its debugger stops
    (flux_npu.probe's docstring): in the suite's process a later torch.compile test would fail."""
    if CHILD:
        return test

    def run():
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{test.__name__}"]
        r = subprocess.run(cmd, env={**os.environ, "FLUX_NPU_MSPROBE_CHILD": "1"}, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        assert "1 passed" in r.stdout, r.stdout[-2000:]

    run.__name__ = test.__name__
    run.__doc__ = test.__doc__
    return run


@pytest.fixture
def fresh_debugger():
    """msprobe's PrecisionDebugger is a per-process singleton: each dump here gets its own."""
    from msprobe.pytorch import PrecisionDebugger

    PrecisionDebugger._instance = None
    yield PrecisionDebugger
    probe.unregister_msprobe()
    PrecisionDebugger._instance = None


def _dump(backend, path, PrecisionDebugger):
    PrecisionDebugger._instance = None
    return probe.dump_flux_step(backend, str(path), dtype=torch.float32)


@in_own_process
def test_cpu_and_emulated_npu_dumps_line_up_by_op_name(tmp_path, fresh_debugger, npu_emulated):
    cpu = _dump("cpu", tmp_path / "cpu", fresh_debugger)
    npu = _dump(npu_emulated, tmp_path / "npu", fresh_debugger)
    # our ops ran on each backend (counts), and under the same names in both dumps
    assert any(k.startswith("attention torch.sdpa") for k in cpu["kernels"]), cpu["kernels"]
    assert any(k.startswith("attention torch_npu.npu_fusion_attention") for k in npu["kernels"]), npu["kernels"]
    assert any(k.startswith("rms_norm torch_npu.npu_rms_norm") or k.startswith("qk_norm_rope")
               for k in npu["kernels"]), npu["kernels"]
    for res in (cpu, npu):
        stems = {e.rsplit(".", 2)[0] for e in res["flux_npu_entries"]}
        assert {"flux_npu.attention"} <= stems, stems
        assert any(e.endswith(".backward") for e in res["flux_npu_entries"])
    assert cpu["flux_npu_entries"] == npu["flux_npu_entries"]
    # msprobe's own compare pairs them: no flux_npu.* tensor row without its bench counterpart
    from msprobe.pytorch.compare.pt_compare import pt_compare

    out = tmp_path / "compare"
    out.mkdir()
    pt_compare({"npu_path": npu["dump_json"], "bench_path": cpu["dump_json"], "stack_path": npu["stack_json"],
                "is_print_compare_log": False}, str(out))
    (csv_path,) = glob.glob(str(out / "*.csv"))
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["NPU Name"].startswith("flux_npu.")]
    # tensors only (not the fields of a backend= argument); in the backward, the first gradient (how
    # many more a hook sees follows each path's autograd graph, e.g. the npu RoPE's operand build)
    tensor_rows = [r for r in rows if r["NPU Dtype"].startswith("torch.")
                   and (".forward." in r["NPU Name"] or ".backward.input." in r["NPU Name"]
                        or r["NPU Name"].endswith(".backward.output.0"))]
    assert len(tensor_rows) > 20
    unpaired = [r["NPU Name"] for r in tensor_rows if r["Bench Name"] != r["NPU Name"]]
    assert not unpaired, unpaired[:10]
    # float32 on both: the paired statistics agree (msprobe: difference of each pair's max)
    diffs = [abs(float(r["Max diff"])) for r in tensor_rows if r["Max diff"] not in ("", "N/A", "None")]
    assert diffs and max(diffs) < 1e-3, max(diffs)
    # the ops are ours again afterwards
    assert probe.registered() == [] and ops.attention.__module__ == "flux_npu.ops"


@in_own_process
def test_register_needs_a_debugger_and_restores_identity(fresh_debugger):
    original = ops.rms_norm
    with pytest.raises(RuntimeError, match="create msprobe's PrecisionDebugger"):
        probe.register_msprobe()
    assert ops.rms_norm is original and probe.registered() == []
    with pytest.raises(ValueError, match="unknown op"):
        probe.register_msprobe(op_names=["softmax"])
    fresh_debugger(dump_path="unused-dump", task="statistics", level="L1")
    names = probe.register_msprobe()
    assert names == [f"flux_npu.{op}" for op in ops.OPS]
    wrapped = ops.rms_norm
    assert wrapped is not original
    probe.register_msprobe()  # again: no double wrapping
    assert ops.rms_norm is wrapped
    x = torch.randn(3, 8)
    torch.testing.assert_close(ops.rms_norm(x), original(x))  # the wrapper computes the same
    probe.unregister_msprobe()
    assert ops.rms_norm is original and ops.attention.__module__ == "flux_npu.ops"


@in_own_process
def test_verify_msprobe_writes_a_dump_and_the_compare_command(tmp_path, fresh_debugger):
    from flux_npu.verify import verify

    rep = verify("cpu", out_dir=str(tmp_path / "v"), skip=("parity", "trajectory", "ops", "model"), msprobe=True)
    assert rep["verdict"] == "PASS", rep["failures"]
    m = rep["msprobe"]
    assert os.path.isfile(tmp_path / "v" / m["dump_json"])
    assert m["compare"].startswith("msprobe compare -tp msprobe/")
    md = (tmp_path / "v" / "report.md").read_text()
    assert "## msprobe dump" in md and "`flux_npu.attention`" in md
    assert ops.attention.__module__ == "flux_npu.ops" and flux_npu.ops.registry.OPS == ops.OPS
