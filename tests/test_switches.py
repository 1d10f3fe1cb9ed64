"""Switches that switch (issue 18 item 5): one parser for yes/no and list variables
(flux_npu/utils/env.py) used by `import flux_npu.auto`, the op table and `flux-npu run`; `exclude`
honoured inside the BFL attention replacement; warnings for an empty op set and for re-enabling a
known-bad SDPA backend."""

import os
import subprocess
import sys
import warnings

import pytest

import flux_npu
from flux_npu import ops
from flux_npu.cli import main
from flux_npu.utils.env import env_flag, parse_flag, parse_list

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("value,want", [("1", True), ("true", True), ("YES", True), (" on ", True), ("0", False),
                                        ("false", False), ("No", False), ("off", False), ("", False), (None, False)])
def test_flag_spellings(value, want):
    assert parse_flag(value, "FLUX_NPU_X") is want


def test_unknown_flag_spelling_names_the_variable():
    with pytest.raises(ValueError, match="FLUX_NPU_STRICT='maybe'.*true.*false"):
        env_flag("FLUX_NPU_STRICT", environ={"FLUX_NPU_STRICT": "maybe"})


def test_lists_take_commas_and_spaces():
    assert parse_list(" attention, rms_norm  apply_rope,") == ["attention", "rms_norm", "apply_rope"]
    assert parse_list("  ") is None and parse_list(None) is None


def test_strict_false_means_off(monkeypatch):
    from flux_npu.ops import registry

    monkeypatch.setenv("FLUX_NPU_STRICT", "false")
    assert registry._strict_from_env() is False
    monkeypatch.setenv("FLUX_NPU_STRICT", "on")
    assert registry._strict_from_env() is True


def _auto(env, code="import flux_npu.auto"):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, **env})


def test_report_no_prints_no_report_and_yes_does():
    quiet = _auto({"FLUX_NPU_REPORT": "no", "FLUX_NPU_BACKEND": "cpu"})
    assert quiet.returncode == 0, quiet.stderr
    loud = _auto({"FLUX_NPU_REPORT": "yes", "FLUX_NPU_BACKEND": "cpu"})
    assert loud.returncode == 0, loud.stderr
    assert loud.stderr.strip() and not quiet.stderr.strip()


def test_run_refuses_unknown_op_names_and_spellings_before_starting(tmp_path, monkeypatch, capsys):
    script = tmp_path / "s.py"
    marker = tmp_path / "ran"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    for var, value, words in (("FLUX_NPU_OPS", "bogus", "bogus"), ("FLUX_NPU_EXCLUDE_OPS", "atention", "atention"),
                              ("FLUX_NPU_STRICT", "perhaps", "perhaps")):
        monkeypatch.setenv(var, value)
        assert main(["run", "--backend", "cpu", str(script)]) == 1
        err = capsys.readouterr().err
        assert var in err and words in err
        assert not marker.exists()
        monkeypatch.delenv(var)


def test_run_applies_the_op_switches_in_the_script(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import flux_npu.patches as p\nh = p.live_handles()[0]\nprint('ENABLED', sorted(h.enabled))\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "FLUX_NPU_EXCLUDE_OPS": "attention apply_rope"}
    out = subprocess.run([sys.executable, "-m", "flux_npu", "run", "--backend", "cpu", str(script)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("ENABLED"))
    assert "attention" not in line and "apply_rope" not in line and "rms_norm" in line


def test_empty_op_set_warns_and_bad_types_are_clear():
    with pytest.warns(UserWarning, match="leaves no op to route"):
        flux_npu.patch("cpu", targets=["bfl"], ops=["attention"], exclude=["attention"]).undo()
    with pytest.raises(TypeError, match="op name or a list of op names, got int"):
        flux_npu.patch("cpu", ops=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flux_npu.patch("cpu", targets=["bfl"], exclude=["attention"]).undo()  # not empty: no warning


def test_bfl_attention_honours_exclude_apply_rope():
    from flux_helpers import bfl_inputs, bfl_model, bfl_run

    model = bfl_model(seed=2)
    inputs = bfl_inputs(model, seed=2)
    stock = bfl_run(model, inputs)
    with flux_npu.patch("cpu", targets=["bfl"], exclude=["apply_rope"]):
        ops.reset_dispatch_stats()
        out = bfl_run(model, inputs)
        stats = ops.dispatch_stats()
    assert not any(op in ("apply_rope", "qk_norm_rope") for (op, _, _) in stats["served"]), stats["served"]
    assert stats["served"][("attention", "cpu", "torch.sdpa")] > 0
    for k in stock:
        assert float((out[k] - stock[k]).norm() / stock[k].norm()) < 1e-4, k  # float32, forward and backward


def test_sdpa_override_of_a_known_bad_backend_warns():
    from flux_npu.backends.cuda import sdpa_route

    with pytest.warns(RuntimeWarning, match="cudnn.*known to be broken"):
        route = sdpa_route("2.11.0", (9, 0), training=True, override="cudnn,math")
    assert route.backends == ("cudnn", "math") and "WARNING" in route.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sdpa_route("2.11.0", (9, 0), training=True, override="flash,math").backends == ("flash", "math")
