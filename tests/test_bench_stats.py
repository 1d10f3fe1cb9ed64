"""Verdicts only with significance (issue 19 item 1): every benchmark ratio goes through
benchmark.stats.compare; a timer that is pure noise gives "not significant", never a speed-up or
a slow-down, however many times it is run; repeats grow until significant within a budget."""

import random

import pytest
import torch

from flux_npu.benchmark import ops as B
from flux_npu.benchmark.results import BenchResult, ratio_table, ratios
from flux_npu.benchmark.stats import compare, looks_for


def test_compare_verdicts():
    # two repeats a side can never be significant (the old verify --quick decided from two)
    v = compare([2.0, 2.1], [1.0, 1.05])
    assert v.ratio == pytest.approx(2.05 / 1.025) and not v.significant and "p=0.33" in v.note
    v = compare([2.0, 2.1, 2.05, 1.98, 2.2], [1.0, 1.05, 0.99, 1.02, 1.01])
    assert v.significant and v.p_value < 0.01 and v.ratio == pytest.approx(2.05 / 1.01) and v.flag() == ""
    assert v.low == pytest.approx(2.0 / 1.02) and v.high == pytest.approx(2.1 / 1.0)
    # the same clear difference is not significant when the caller looked many times
    assert not compare([2.0, 2.1, 2.05, 1.98, 2.2], [1.0, 1.05, 0.99, 1.02, 1.01], looks=10).significant
    same = compare([1.0] * 5, [1.0] * 5)
    assert same.p_value == 1.0 and not same.significant and same.ratio == 1.0
    one = compare([1.0], [2.0, 2.0])
    assert not one.significant and one.low is None and "ran once" in one.flag()
    for bad in ([float("nan"), 1.0], [0.0, 1.0], []):
        with pytest.raises(ValueError):
            compare(bad, [1.0, 1.0])
    assert looks_for(5, 15) == 3 and looks_for(5, 5) == 1 and looks_for(7, 21, 7) == 3


CALLS = [0]  # calls of the implementations under test, read by the noisy timer


class _NoisyTimer:
    """0.1 ms per call of the implementation it timed, times a wide random factor: whatever ran,
    one distribution per call, so no implementation is faster than another."""

    def __init__(self, rng):
        self.rng = rng

    def start(self):
        self.calls = CALLS[0]

    def stop(self):
        return max(1, CALLS[0] - self.calls) * 1e-4 * self.rng.lognormvariate(0, 0.6)


class _NoisyUtils:
    """The timer (one synchronised call) and the clock (torch.utils.benchmark's, for the loops) of
    a device whose every reading is noise around 0.1 ms per call."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.now, self.seen = 0.0, 0

    def synchronize(self):
        pass

    def timer(self):
        return _NoisyTimer(self.rng)

    def clock(self):
        # virtual seconds: the calls since the last reading at 0.1 ms each, times one random factor
        self.now += (CALLS[0] - self.seen) * 1e-4 * self.rng.lognormvariate(0, 0.6)
        self.seen = CALLS[0]
        return self.now


def _same_kernel_case():
    """Stock and patched are the same kernel (as attention was when `bench ops` read 1.43x)."""
    x = torch.randn(64, 128)

    def kernel():
        CALLS[0] += 1
        return x * 2

    return B.Case("same", "64x128", "fp32", {"stock": kernel, "patched": kernel}, lambda: x * 2, torch.float32,
                  2 * x.numel() * 4)


@pytest.mark.parametrize("seed", range(6))
def test_noisy_timer_gives_not_significant_in_bench_ops(seed):
    """What `bench ops`, `demo` and `verify` print for a row, from a timer that is pure noise: the
    ratio is whatever the noise made it, its verdict is "not significant" (repeats grown to the
    budget trying), the spread is shown, and the table says so."""
    rows = B.run_case(_same_kernel_case(), _NoisyUtils(seed), 0, 5, 1e9, False, "", "cpu", max_repeats=15)
    (r,) = [r for r in rows if r.impl == "patched"]
    assert r.status == "ok" and r.vs_stock_significant is False, (r.speedup_vs_stock, r.vs_stock_p)
    assert r.device_n == 15  # never decided: the whole budget, then "not significant"
    assert r.vs_stock_low <= r.speedup_vs_stock <= r.vs_stock_high
    assert B.vs_stock_text(r)[2] == "not significant"
    table = B.format_rows(rows)
    assert "not significant" in table and "verdict" in table and "faster" not in table and "slower" not in table


def test_a_real_difference_is_found_and_stops_early():
    x = torch.randn(64, 128)

    def slow():
        CALLS[0] += 3  # three times the work of `fast` under the call-counting timer
        return x * 2

    def fast():
        CALLS[0] += 1
        return x * 2

    case = B.Case("diff", "64x128", "fp32", {"stock": slow, "patched": fast}, lambda: x * 2, torch.float32, 4096)
    rows = B.run_case(case, _NoisyUtils(0), 0, 5, 1e9, False, "", "cpu", max_repeats=15)
    (r,) = [r for r in rows if r.impl == "patched"]
    assert r.vs_stock_significant is True and r.speedup_vs_stock > 1.5
    assert r.device_n == 5  # significant at the first look: no more repeats spent
    assert B.vs_stock_text(r)[2].startswith("faster (p=")


def test_cache_resident_copy_fraction_is_not_shown_as_bandwidth():
    rows = B.run_case(_same_kernel_case(), _NoisyUtils(0), 0, 5, 1e9, False, "", "cpu")
    for r in rows:
        assert r.copy_fraction is not None and r.cache_resident is (r.copy_fraction > 1)
        assert ("cache-resident" in B.copy_text(r)) is (r.copy_fraction > 1)
    assert B.copy_text(B.Row("op", "s", "fp32", "patched", copy_fraction=26.24)) == "cache-resident (2624%)"
    assert B.copy_text(B.Row("op", "s", "fp32", "patched", copy_fraction=0.5)) == "50%"
    assert B.copy_text({"copy_fraction": 1.5}) == "cache-resident (150%)"  # report rows are dicts


def test_bench_model_ratios_use_the_same_verdict():
    def row(variant, times):
        r = BenchResult(model="tiny", mode="infer", res=64, backend="cpu", device="cpu", variant=variant,
                        dtype="fp32", steps=2)
        r.status, r.s_per_img, r.s_per_img_all = "ok", sorted(times)[len(times) // 2], list(times)
        r.peak_mem_gb = 1.0
        return r

    noisy = ratios([row("stock", [1.0, 1.4]), row("patched", [0.5, 0.7])])  # 2 repeats: 2x, but noise
    assert len(noisy) == 1 and noisy[0]["significant"] is False and noisy[0]["p_value"] == pytest.approx(1 / 3)
    assert "not significant" in ratio_table(noisy)
    clear = ratios([row("stock", [1.0, 1.01, 1.02, 0.99, 1.03]), row("patched", [0.5, 0.51, 0.49, 0.5, 0.52])])
    assert clear[0]["significant"] is True and clear[0]["speedup_range"][0] > 1.8
    assert f"significant (p={clear[0]['p_value']:.2g})" in ratio_table(clear) and "not" not in ratio_table(clear)
