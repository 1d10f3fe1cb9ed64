"""The one place a benchmark ratio gets its spread and its verdict (`bench ops`, `bench model`,
`demo` and `verify` all print what `compare` returns).

A ratio is median(baseline) / median(candidate) (> 1: the candidate is faster). Its spread is the
range the interquartile ranges allow, q1(baseline)/q3(candidate) .. q3(baseline)/q1(candidate). It
is *significant* only when the two samples differ by a two-sided Mann-Whitney U test (scipy) at the
stated confidence, divided among the looks a caller takes at growing samples (Bonferroni), so that
repeating until significant does not manufacture a verdict. Two repeats a side can never be
significant (the exact test's smallest p-value is 1/3); three a side reach p = 0.1, five p = 0.008.
No normality is assumed: timings on a shared machine are skewed and have outliers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Verdict:
    ratio: float  # median(baseline) / median(candidate)
    low: float | None  # spread of the ratio from the interquartile ranges (None: a side ran once)
    high: float | None
    n_baseline: int
    n_candidate: int
    p_value: float | None
    confidence: float
    significant: bool
    note: str  # why it is not significant ("" when it is)

    def flag(self) -> str:
        return "" if self.significant else f"not significant ({self.note})"

    def spread(self) -> str:
        return "" if self.low is None else f"{self.low:.2f}-{self.high:.2f}x"

    def as_dict(self) -> dict:
        return asdict(self)


def quartiles(ts: Sequence[float]):
    """(q1, median, q3) of a sample (all three the value itself for one measurement)."""
    ts = list(ts)
    if len(ts) < 2:
        return ts[0], ts[0], ts[0]
    q = statistics.quantiles(ts, n=4, method="inclusive")
    return q[0], statistics.median(ts), q[2]


def _mann_whitney_p(a: Sequence[float], b: Sequence[float]) -> float:
    try:
        from scipy.stats import mannwhitneyu
    except ImportError as exc:  # scipy is a dependency; a broken install must not fake a verdict
        raise ImportError(f"benchmark verdicts need scipy ({exc}): pip install scipy") from None
    if len(set(a) | set(b)) == 1:
        return 1.0  # identical samples: no difference (scipy warns and returns nan)
    return float(mannwhitneyu(a, b, alternative="two-sided").pvalue)


def compare(baseline: Sequence[float], candidate: Sequence[float], confidence: float = CONFIDENCE,
            looks: int = 1) -> Verdict:
    """Ratio, spread and significance of `baseline` over `candidate` (times: lower is better).
    `looks`: how many times the caller may test growing samples of the same pair (see module doc)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must be in (0, 1)")
    baseline, candidate = [float(t) for t in baseline], [float(t) for t in candidate]
    if not baseline or not candidate:
        raise ValueError("compare needs at least one measurement on each side")
    if not all(math.isfinite(t) and t > 0 for t in baseline + candidate):
        raise ValueError("timings must be finite and positive")
    bq1, bmed, bq3 = quartiles(baseline)
    cq1, cmed, cq3 = quartiles(candidate)
    ratio = bmed / cmed
    low, high = (bq1 / cq3, bq3 / cq1) if len(baseline) > 1 and len(candidate) > 1 else (None, None)
    alpha = (1 - confidence) / max(1, looks)
    if len(baseline) < 2 or len(candidate) < 2:
        return Verdict(ratio, low, high, len(baseline), len(candidate), None, confidence, False,
                       "a side ran once: no spread")
    p = _mann_whitney_p(baseline, candidate)
    if p < alpha:
        return Verdict(ratio, low, high, len(baseline), len(candidate), p, confidence, True, "")
    return Verdict(ratio, low, high, len(baseline), len(candidate), p, confidence, False,
                   f"p={p:.2g} at n={len(baseline)}/{len(candidate)}, needs < {alpha:.2g}")


def looks_for(min_n: int, max_n: int, step: int | None = None) -> int:
    """How many times a caller growing a sample may test it: at min_n, then every `step` up to max_n
    (bench ops' run_case grows its repeats this way)."""
    step = step or min_n
    if max_n <= min_n:
        return 1
    return 1 + math.ceil((max_n - min_n) / step)
