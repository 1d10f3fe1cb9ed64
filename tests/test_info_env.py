"""`flux-npu info` reads like `accelerate env` / `diffusers-cli env` for the environment part, with
CANN and NPU driver versions where Ascend software is installed and the host's load (issue 19
item 4); verify's report carries the same list."""

import sys
import types
from importlib.metadata import version

import torch

from flux_npu.cli import main
from flux_npu.utils import versions


def test_info_starts_with_a_pasteable_environment(capsys):
    assert main(["info", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "Copy-and-paste the text below in your GitHub issue"
    assert f"- PyTorch version: {torch.__version__} (" in out
    assert f"- accelerate version: {version('accelerate')}" in out
    assert f"- diffusers version: {version('diffusers')}" in out
    load = next(ln for ln in lines if ln.startswith("- Host load (1/5/15 min): "))
    assert load.endswith("cores") and len(load.split(":")[1].split("/")) == 3
    assert any(ln.startswith("- System RAM: ") and ln.endswith(" GB") for ln in lines)


def test_cann_and_driver_versions_from_the_install_files(tmp_path, monkeypatch):
    toolkit = tmp_path / "ascend-toolkit" / "latest"
    (toolkit / "x86_64-linux").mkdir(parents=True)
    (toolkit / "x86_64-linux" / "ascend_toolkit_install.info").write_text("package_name=Ascend-cann-toolkit\n"
                                                                          "version=8.3.RC1\n")
    driver = tmp_path / "version.info"
    driver.write_text("Version=25.2.0\nascendhal_version=7.35.23\n")
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(toolkit))
    monkeypatch.setattr(versions, "DRIVER_INFO", str(driver))
    assert versions.ascend_versions() == {"CANN": "8.3.RC1", "NPU driver": "25.2.0"}
    env = versions.environment()
    assert env["CANN version"] == "8.3.RC1" and env["NPU driver version"] == "25.2.0"
    assert "- CANN version: 8.3.RC1" in versions.render_environment(env)
    line = versions.system_line(env)  # what verify's report.md adds under the versions
    assert "CANN version 8.3.RC1" in line and "NPU driver version 25.2.0" in line and "Host load" in line
    # nothing installed: no lines at all, not "unknown" ones
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(tmp_path / "none"))
    monkeypatch.setattr(versions, "DRIVER_INFO", str(tmp_path / "none.info"))
    assert versions.ascend_versions() == {}


def test_transfer_to_npu_is_named_because_it_turns_triton_off_for_compile(monkeypatch):
    assert "transfer_to_npu" not in versions.environment()
    # importing torch_npu.contrib.transfer_to_npu is what a user's script does; only its presence is read
    monkeypatch.setitem(sys.modules, versions.TRANSFER_TO_NPU, types.ModuleType(versions.TRANSFER_TO_NPU))
    env = versions.environment()
    assert "has_triton() to False" in env["transfer_to_npu"]
    assert "transfer_to_npu imported" in versions.system_line(env)


def test_torch_version_is_the_imported_builds_own(monkeypatch):
    """PyPI's CUDA wheels record a bare "2.11.0" in their metadata while torch.__version__ is
    "2.11.0+cu130" (the GPU image's build): reports (verify, parity, benchmarks) name the build that ran."""
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    assert versions.versions()["torch"] == "2.11.0+cu130"
    assert versions.package_version("torch") == "2.11.0+cu130"
    assert versions.package_version("no-such-package-xyz") == "not installed"
