"""`flux-npu verify` loses nothing (issue 18 item 2): it refuses a directory holding files it did
not write, keeps a partial, honest report when interrupted (Ctrl-C, SIGTERM), never deletes an
earlier report before the new one is complete, and refuses to run with every phase skipped. The
phases are replaced by quick stand-ins here: what is tested is the report directory."""

import json
import os
import signal

import pytest

from flux_npu import verify as V
from flux_npu.cli import main


def _fake_parity(report, b, quick, parity, ops):
    report["parity"].update(status="pass", kernels={"served": [], "fallback": []}, goldens=[
        {"golden": "g.safetensors", "path": "g", "describe": "", "status": "pass", "passed": 3, "total": 3,
         "results": []}])


def _fake_ops(report, b, quick):
    report["ops"]["status"] = "pass"


@pytest.fixture
def quick_phases(monkeypatch):
    monkeypatch.setattr(V, "_parity", _fake_parity)
    monkeypatch.setattr(V, "_ops_bench", _fake_ops)


def test_a_directory_of_user_files_is_refused_and_kept(tmp_path, capsys, quick_phases):
    d = tmp_path / "project"
    d.mkdir()
    (d / "report.md").write_text("my notes")
    (d / "verify.log").write_text("my log")
    assert main(["verify", "--backend", "cpu", "--skip", "model", "-o", str(d)]) == 1
    err = capsys.readouterr().err
    assert "not a verify report directory" in err and "--force" in err
    assert (d / "report.md").read_text() == "my notes" and (d / "verify.log").read_text() == "my log"


def test_dot_in_a_project_root_is_refused(tmp_path, monkeypatch, capsys, quick_phases):
    (tmp_path / "report.md").write_text("README of the project")
    monkeypatch.chdir(tmp_path)
    assert main(["verify", "--backend", "cpu", "--skip", "model", "-o", "."]) == 1
    assert (tmp_path / "report.md").read_text() == "README of the project"


def test_force_writes_into_a_foreign_directory(tmp_path, quick_phases):
    d = tmp_path / "any"
    d.mkdir()
    (d / "keep.txt").write_text("x")
    assert main(["verify", "--backend", "cpu", "--skip", "model", "--force", "-o", str(d)]) == 0
    assert (d / "keep.txt").read_text() == "x" and json.loads((d / "report.json").read_text())["verdict"] == "PASS"


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_run_keeps_an_honest_partial_report(tmp_path, monkeypatch, capsys, quick_phases, how):
    def stop(report, b, quick):
        if how == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(V, "_ops_bench", stop)
    d = tmp_path / "r"
    rc = main(["verify", "--backend", "cpu", "--skip", "model", "-o", str(d)])
    assert rc == (130 if how == "ctrl-c" else 128 + signal.SIGTERM)
    assert str(d / "report.md") in capsys.readouterr().err
    data = json.loads((d / "report.json").read_text())
    assert data["verdict"] == "INTERRUPTED" and data["interrupted"]["phase"] == "ops"
    assert "interrupted during ops" in data["interrupted"]["summary"]
    assert "parity: 3 passed, 0 failed" in data["interrupted"]["summary"]
    assert "# flux-npu verify: INTERRUPTED" in (d / "report.md").read_text()
    log = (d / "verify.log").read_text()
    assert "none crashed" not in log and "interrupted during ops" in log


def test_a_rerun_keeps_the_earlier_report_until_the_new_one_is_complete(tmp_path, monkeypatch, quick_phases):
    d = tmp_path / "r"
    assert main(["verify", "--backend", "cpu", "--skip", "model", "-o", str(d)]) == 0
    first = (d / "report.json").read_text()
    (d / "ops.png").write_bytes(b"old plot")  # a file of the earlier report this run will not make

    def interrupted(report, b, quick):
        raise KeyboardInterrupt

    monkeypatch.setattr(V, "_ops_bench", interrupted)
    assert main(["verify", "--backend", "cpu", "--skip", "model", "-o", str(d)]) == 130
    assert (d / "report.json").read_text() == first  # the earlier report is whole
    partial = [p for p in os.listdir(d) if p.startswith(V.PARTIAL)]
    assert len(partial) == 1
    assert json.loads((d / partial[0] / "report.json").read_text())["verdict"] == "INTERRUPTED"
    monkeypatch.setattr(V, "_ops_bench", _fake_ops)
    assert main(["verify", "--backend", "cpu", "--skip", "model", "-o", str(d)]) == 0  # the partial dir is ours
    assert json.loads((d / "report.json").read_text())["verdict"] == "PASS"
    assert not (d / "ops.png").exists()  # the earlier report's plot went with it, once the new one was complete
    assert len([p for p in os.listdir(d) if p.startswith(V.PARTIAL)]) == 1  # only the interrupted run's


def test_every_phase_skipped_is_nothing_checked(tmp_path, capsys):
    from flux_npu.verify import PHASES  # every phase, the trajectory check included

    assert main(["verify", "--backend", "cpu", "--skip", *PHASES, "-o", str(tmp_path / "x")]) == 1
    assert "nothing would be checked" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
