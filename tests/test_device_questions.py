"""The open torch_npu questions `verify --backend npu` asks a device (issue 17 item 5), run here on
the torch_npu CONTRACT EMULATOR (CPU tensors, strict readings of the docs; never a hardware
answer): every question runs and gives an answer with its float64 comparison, and the verify
report carries them with the command line to send back."""

import pytest
from npu_emulator import record

from flux_npu import device_questions as DQ
from flux_npu import verify as V

pytestmark = pytest.mark.emulator


def test_every_question_is_answered_on_the_emulated_device(npu_emulated):
    record.clear()
    rows = {r["question"]: r for r in DQ.ask(npu_emulated)}
    assert set(rows) == {q for q, _, _ in DQ.QUESTIONS}
    # the emulator takes the strict readings: one dtype for x and cos/sin, gamma in x's dtype
    rope = rows["rope_fp32_cos_sin"]
    assert rope["answer"] == "rejected" and "dtypes differ" in rope["error"]
    assert 0 < rope["detail"]["bf16 cos/sin"]["rel_err"] < 1e-2  # the call flux-npu makes, vs float64
    assert rows["rms_norm_fp32_gamma"]["answer"] == "rejected" and "gamma dtype" in rows["rms_norm_fp32_gamma"]["error"]
    fia = rows["fia_vs_fa"]
    assert fia["answer"] == "ran", fia.get("error")
    d = fia["detail"]
    assert d["fa_rel_err"] < 1e-2 and d["fia_rel_err"] < 1e-2 and d["fia_vs_fa_rel"] < 1e-2
    assert d["fia_mask_true_is_masked_out_rel_err"] < 1e-2 < d["fia_mask_true_is_attend_rel_err"]
    assert "True = masked out" in fia["verdict"]
    assert {c["op"] for c in record.calls()} >= {"npu_rotary_mul", "npu_rms_norm", "npu_fusion_attention",
                                                  "npu_fused_infer_attention_score"}


def test_without_torch_npu_nothing_is_asked():
    from flux_npu.backends import npu as npu_backend

    rows = DQ.ask(npu_backend.BACKEND.with_device_type("cpu"))
    assert all(r["answer"] == "not asked" and "torch_npu not importable" in r["error"] for r in rows)


def test_verify_on_npu_reports_the_questions_and_what_to_send_back(tmp_path, npu_emulated):
    data = V.verify(npu_emulated, out_dir=str(tmp_path / "v"), quick=True,
                    skip=("parity", "ops", "model"), command="flux-npu verify --backend npu")
    rows = data["device_questions"]["rows"]
    assert [r["question"] for r in rows] == [q for q, _, _ in DQ.QUESTIONS]
    md = (tmp_path / "v" / "report.md").read_text()
    assert "## Open device questions" in md and "rope_fp32_cos_sin" in md
    assert "the command line: `flux-npu verify --backend npu`" in md
    assert "not hardware results" in md
    assert data["trajectory"]["status"] == "pass"  # the npu code path trains like the reference (LoRA, --quick)
