"""Packaging (issue 12, item 10): pyproject metadata and license, extras given as ranges (so installing
flux-npu never downgrades an existing diffusers / DeepSpeed / accelerate), and package data that
covers the shipped configs and golden. (`pip install .` into a fresh venv was checked by hand; see
the README's install sections.)"""

import glob
import os
import re

import pytest

import flux_npu
from flux_npu.distributed import configs as gen

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(REPO, "pyproject.toml")


@pytest.fixture(scope="module")
def project():
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)


def _name(req):
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower()


def test_metadata_and_license(project):
    meta = project["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    with open(os.path.join(REPO, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0" in text and "END OF TERMS AND CONDITIONS" in text
    assert meta["authors"] == [{"name": "flux-npu developers"}] and meta["readme"] == "README.md"
    assert meta["requires-python"] == ">=3.11" and meta["description"]
    assert any(c.startswith("Programming Language :: Python :: 3.11") for c in meta["classifiers"])
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "flux_npu.__version__"}
    assert meta["scripts"] == {"flux-npu": "flux_npu.cli:main"}
    assert not os.path.exists(os.path.join(REPO, "setup.py"))  # one source of metadata


def test_extras_are_ranges_and_all_covers_the_test_suite(project):
    extras = project["project"]["optional-dependencies"]
    assert {"diffusers", "deepspeed", "triton", "npu", "plot", "test", "all"} <= set(extras)
    for group, reqs in [("dependencies", project["project"]["dependencies"])] + list(extras.items()):
        for req in reqs:
            assert "==" not in req and "~=" not in req, f"{group}: {req} is a pin; give a range"
    for req in extras["diffusers"] + extras["deepspeed"]:
        assert ">=" in req or _name(req) in ("sentencepiece", "packaging"), req
    # torch_npu must be installed by hand to match torch and CANN: an extra would let pip pick a wrong one
    assert not any(_name(r) in ("torch-npu", "torch_npu") for reqs in extras.values() for r in reqs)
    # DeepSpeed's floor is what lets one shipped config serve NPU and CUDA
    ds = next(r for r in extras["deepspeed"] if _name(r) == "deepspeed")
    assert f">={gen.MIN_DEEPSPEED}" in ds
    (everything,) = extras["all"]
    assert set(everything.split("[")[1].rstrip("]").split(",")) == set(extras) - {"all"}


def _floor(reqs, name):
    (req,) = [r for r in reqs if _name(r) == name]
    m = re.search(r">=([0-9.]+)", req)
    assert m, f"{req}: no floor"
    return m.group(1)


def test_torch_triton_numpy_floors_are_the_tested_versions(project):
    """Issue 20 item 3: the floors are the versions the suite passed with (docs/DESIGN.md, "Versions":
    torch 2.11 + triton 3.6 + numpy 2.5, the GPU image's, and torch 2.13 + triton 3.9 + numpy 2.4),
    not older ones that were never run (the old `triton>=3.2` and bare `numpy` let triton 3.6's
    interpreter meet a numpy it breaks with)."""
    deps, extras = project["project"]["dependencies"], project["project"]["optional-dependencies"]
    floors = {"torch": _floor(deps, "torch"), "numpy": _floor(deps, "numpy"),
              "triton": _floor(extras["triton"], "triton")}
    assert floors == {"torch": "2.11", "numpy": "2.4", "triton": "3.6"}
    assert _floor(extras["triton"], "torch") == floors["torch"]
    assert project["project"]["requires-python"] == ">=3.11"
    with open(os.path.join(REPO, "docs", "DESIGN.md"), encoding="utf-8") as f:
        design = f.read()
    versions = design[design.index("**Versions.**"):design.index("The per-op runner")]
    # the section names the floors as pyproject writes them and the two environments that set them
    for stated in ("`torch>=2.11`", "`numpy>=2.4`", "`triton>=3.6`", "Python >= 3.11",
                   "| 2.11.0+cu130 | 3.6.0 | 2.5.2 |", "| 2.13.0+cpu | 3.9.0 | 2.4.6 |"):
        assert stated in versions, stated


def test_package_data_covers_the_configs_and_the_golden(project):
    globs = project["tool"]["setuptools"]["package-data"]["flux_npu"]
    pkg = os.path.dirname(flux_npu.__file__)
    covered = {os.path.relpath(p, pkg) for g in globs for p in glob.glob(os.path.join(pkg, g))}
    shipped = {os.path.join("data", "configs", name) for name in gen.render()}
    assert shipped <= covered
    assert os.path.join("data", "golden", "parity_cpu.safetensors") in covered
    assert "py.typed" in covered  # PEP 561: type checkers read the package's annotations
    # the packaged golden is the tests' golden (a link: one file, two paths), never a stale copy
    assert os.path.samefile(os.path.join(pkg, "data", "golden", "parity_cpu.safetensors"),
                            os.path.join(REPO, "tests", "golden", "parity_cpu.safetensors"))
    assert os.path.samefile(os.path.join(REPO, "configs"), gen.SHIPPED)


def test_readme_installs_from_a_checkout_or_a_wheel():
    """flux-npu is on no package index: the README must not send users to one (issue 19 item 5)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert "pip install flux-npu" not in text and '"flux-npu[' not in text
    assert 'pip install -e ".[diffusers]"' in text and "pip wheel" in text
    for extra in ("diffusers", "deepspeed", "triton", "plot", "npu", "test", "all"):
        assert f"| `[{extra}]` |" in text  # what each extra brings
