"""`flux-npu bench ops`: device time (many calls per synchronisation) and per-call latency are
separate columns with median and IQR; bandwidth, % of copy and the ratio to stock come from
device time; diffusers' _native_npu attention is a row that says why it is skipped off npu; the
CLI convention (-o file, --json to stdout, lists with spaces or commas). No timing is asserted."""

import json

import pytest

from flux_npu.backends import get_backend
from flux_npu.benchmark import ops as B
from flux_npu.cli import main


def test_device_time_issues_many_calls_per_synchronisation():
    calls = {"n": 0}
    syncs = {"n": 0}

    class Utils:
        def synchronize(self):
            syncs["n"] += 1

        def timer(self):
            return get_backend("cpu").utils.timer()

    def fn():
        calls["n"] += 1
        sum(range(2000))  # a few microseconds of work

    # a device backend (npu): the backend's timer around each loop
    times = B.device_times({"f": fn}, Utils(), "npu", repeats=3, min_loop_s=0.005)
    assert len(times["f"]) == 3 and all(t > 0 for t in times["f"])
    per_loop = (calls["n"] - 1) // 3  # one calibration call, then 3 loops of n calls
    assert per_loop > 1 and calls["n"] == 1 + 3 * per_loop
    assert syncs["n"] == 3  # one synchronisation per loop, not per call
    # cpu: each loop is torch.utils.benchmark's Timer.timeit(n), which adds a short warm-up of its own
    calls["n"] = 0
    times = B.device_times({"f": fn}, Utils(), "cpu", repeats=3, min_loop_s=0.005)
    assert len(times["f"]) == 3 and all(t > 0 for t in times["f"])
    assert calls["n"] >= 1 + 3 * max(2, per_loop // 4)  # many calls per timing, not one


def test_rows_report_device_time_and_latency_separately(tmp_path, capsys):
    out = tmp_path / "ops.json"
    rc = main(["bench", "ops", "--quick", "--ops", "gated_residual,rms_norm", "attention", "--dtypes", "bf16",
               "--repeats", "2", "--warmup", "1", "--no-progress", "-o", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for head in ("device us", "latency us", "% copy", "vs stock", "IQR"):
        assert head in text
    data = json.loads(out.read_text())
    env = data["environment"]
    assert "back-to-back" in env["device_time"] and "synchronisation" in env["latency"]
    rows = data["rows"]
    timed = [r for r in rows if r["status"] == "ok"]
    assert {(r["op"], r["impl"]) for r in timed} >= {("gated_residual", "stock"), ("gated_residual", "patched"),
                                                     ("rms_norm", "stock"), ("rms_norm", "patched")}
    for r in timed:
        assert r["device_q1_us"] <= r["device_us"] <= r["device_q3_us"]
        assert r["latency_q1_us"] <= r["latency_us"] <= r["latency_q3_us"]
    case = B.build_case("gated_residual", "quick", "bf16", get_backend("cpu"), "cpu")
    for r in (r for r in timed if r["op"] == "gated_residual"):
        # bandwidth and % of copy are derived from device time, never from latency
        assert r["gbps"] == pytest.approx(case.nbytes / (r["device_us"] * 1e-6) / 1e9)
        assert r["copy_fraction"] == pytest.approx(r["gbps"] / r["copy_gbps"])
        # on CPU (no cache flush) the copy moves the row's own bytes, so cache residency is alike
        assert r["copy_gbps"] != pytest.approx(env["copy_bandwidth_gbps"])
    stock = next(r for r in timed if r["op"] == "rms_norm" and r["impl"] == "stock")
    patched = next(r for r in timed if r["op"] == "rms_norm" and r["impl"] == "patched")
    assert patched["speedup_vs_stock"] == pytest.approx(stock["device_us"] / patched["device_us"])
    native = next(r for r in rows if r["impl"] == "diffusers _native_npu")
    assert native["status"] == "skip" and "npu only" in native["note"] and native["device_us"] is None


def test_json_flag_prints_json_and_old_spelling_still_writes_a_file(tmp_path, capsys):
    assert main(["bench", "ops", "--quick", "--ops", "gated_residual", "--dtypes", "fp32", "--repeats", "1",
                 "--warmup", "0", "--no-progress", "--json"]) == 0
    cap = capsys.readouterr()
    data = json.loads(cap.out)
    assert [r["impl"] for r in data["rows"]] == ["stock", "patched"]
    old = tmp_path / "old.json"
    assert main(["bench", "ops", "--quick", "--ops", "gated_residual", "--dtypes", "fp32", "--repeats", "1",
                 "--warmup", "0", "--no-progress", "--json", str(old)]) == 0
    assert json.loads(old.read_text())["rows"]
    assert "deprecated" in capsys.readouterr().err


def test_unknown_names_fail_clearly(capsys):
    assert main(["bench", "ops", "--quick", "--ops", "conv2d", "--no-progress"]) == 1
    assert "unknown ops ['conv2d']" in capsys.readouterr().err
