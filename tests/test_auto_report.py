"""FLUX_NPU_REPORT=1 under `import flux_npu.auto` prints what the run did (issue 19 item 6): the
patched code it called with served counts, the kernels that served each op (the table `flux-npu
demo` prints), the layouts the script never imported in one line, and no stale "pending" or
import-bookkeeping rows for modules the import hook patched meanwhile."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """\
import flux_npu.auto
from flux_npu import models
m = models.build_diffusers_flux("tiny")
m(**models.make_inputs(models.preset_config("tiny"), resolution=64, text_len=4).as_kwargs())
"""


def test_report_at_exit_is_the_run_summary(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, FLUX_NPU_REPORT="1", FLUX_NPU_BACKEND="cpu", PYTHONPATH=os.pathsep.join(
        [REPO, *filter(None, [os.environ.get("PYTHONPATH")])]))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    err = r.stderr
    assert "flux_npu run summary (backend cpu" in err
    lines = err.splitlines()
    # tiny Flux: 2 double + 2 single blocks; the attention processor served all 4 calls
    assert any("FluxAttnProcessor.__call__" in ln and "4/4 served" in ln for ln in lines)
    assert "kernels that served the patched run" in err
    assert any(ln.split()[:3] == ["attention", "cpu", "torch.sdpa"] and ln.split()[-1] == "4" for ln in lines)
    # transformer_flux was imported after patch(): its "pending" row is stale and not shown, nor the
    # "settled" bookkeeping; targets never imported are one line
    assert not any(" pending " in ln or " settled " in ln for ln in lines), err
    never = next(ln for ln in lines if ln.startswith("not imported by the script"))
    assert "transformers.models.t5.modeling_t5" in never and "transformer_flux" not in never
