"""The flux-npu command line: info, demo, conventions (help, version, exit codes, errors on stderr)."""

import json
import os
import subprocess
import sys

from flux_npu.cli import main


def test_info_lists_backends_reasons_and_routing(capsys):
    assert main(["info", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "torch_npu not importable" in out  # why npu is unavailable here
    assert "selected: cpu" in out
    assert "op routing on backend cpu" in out and "torch.sdpa" in out
    for pkg in ("torch", "diffusers", "transformers", "deepspeed", "triton", "torch_npu"):
        assert pkg in out


def test_info_json_and_patches(capsys):
    assert main(["info", "--json", "--patches", "--backend", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = {b["name"]: b for b in data["backends"]}
    assert set(names) >= {"cpu", "cuda", "npu"}
    assert names["cpu"]["available"] and not names["npu"]["available"]
    assert names["npu"]["dist_backend"] == "hccl" and names["npu"]["float64"] is False
    statuses = {(p["target"], p["symbol"]): p["status"] for p in data["patches"]}
    assert statuses[("diffusers.models.transformers.transformer_flux", "FluxAttnProcessor.__call__")] == "patched"
    from flux_npu.patches import live_handles

    assert not live_handles()  # the dry run undid itself


def test_demo_checks_tiny_flux(capsys):
    assert main(["demo", "--no-bench", "--res", "128"]) == 0
    out = capsys.readouterr().out
    assert "patched model matches stock" in out
    # every row of the patched-vs-stock table passed ("FAIL" alone also matches backend notes such as
    # CUBLAS_STATUS_EXECUTION_FAILED, so look at the table's result column)
    table = out.split("patched vs stock, forward and backward\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert len(table) >= 4 and all(row.rstrip().endswith(" ok") for row in table), table
    assert "torch.complex_mul" in out  # the kernel table shows what served


def test_unknown_backend_exits_1_with_message_on_stderr():
    env = dict(os.environ, FLUX_NPU_BACKEND="")
    res = subprocess.run([sys.executable, "-m", "flux_npu", "demo", "--backend", "tpu", "--no-bench"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1
    assert "unknown flux_npu backend 'tpu'" in res.stderr and "known backends" in res.stderr
    assert res.stdout == ""


def test_help_and_version(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "flux-npu 0.1.0" in capsys.readouterr().out


def test_info_refuses_an_unknown_backend_and_writes_json_with_output(tmp_path, capsys):
    assert main(["info", "--backend", "tpu"]) == 1
    err = capsys.readouterr().err
    assert "unknown backend 'tpu'" in err and "npu" in err and "cuda" in err and "cpu" in err
    out = tmp_path / "info.json"
    assert main(["info", "--backend", "cpu", "-o", str(out)]) == 0
    assert "op routing on backend cpu" in capsys.readouterr().out  # tables on stdout, JSON in the file
    data = json.loads(out.read_text())
    assert {b["name"] for b in data["backends"]} >= {"cpu", "npu"}
    assert main(["info", "-o", str(tmp_path / "missing" / "info.json")]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_help_states_the_conventions_and_exit_codes(capsys):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    assert "-o/--output" in out and "Exit status" in out


def test_info_routing_covers_every_op_on_every_backend():
    """Every op of the catalogue gets representative inputs in the report; no kernel check crashes on them."""
    from flux_npu.backends import cpu, cuda, npu
    from flux_npu.ops import registry
    from flux_npu.report import op_routing

    for backend in (cpu.BACKEND, cuda.BACKEND, npu.BACKEND):
        rows = op_routing(backend)
        assert {op for op, *_ in rows} == set(registry.OPS), backend.name
        broken = [(op, preset, why) for op, preset, _, why in rows if "check failed" in why]
        assert not broken, f"{backend.name}: {broken}"
