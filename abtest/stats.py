"""Fixed-sample intervals for an experiment's report: rates, rate differences, latency quantiles and ratios.

Pure functions over counts, the figures a fleet's summed Prometheus series give: successes and trials of a
rate, cumulative `le` bucket counts of a histogram. These intervals are right for one look at the data (a
report, a dashboard); a decision taken by watching them repeatedly must use `abtest.sequential` instead,
whose intervals stay valid under continuous monitoring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval at `confidence` (None estimate: no data)."""

    estimate: float | None
    low: float
    high: float
    confidence: float

    def as_dict(self) -> dict[str, float | None]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "confidence": self.confidence}


def check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}")
    return float(confidence)


def _check_counts(successes: float, trials: float) -> None:
    if trials < 0 or successes < 0 or successes > trials:
        raise ValueError(f"need 0 <= successes <= trials, got successes={successes}, trials={trials}")


def normal_quantile(confidence: float) -> float:
    """z of a two-sided interval: 1.96 at 0.95."""
    return float(sps.norm.ppf(0.5 + check_confidence(confidence) / 2))


def wilson_interval(successes: float, trials: float, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a binomial rate: close to nominal coverage even near 0 or 1 and for small
    samples (where the Wald interval collapses), and it never leaves [0, 1]."""
    _check_counts(successes, trials)
    if trials == 0:
        return Interval(None, 0.0, 1.0, check_confidence(confidence))
    z = normal_quantile(confidence)
    p = successes / trials
    denom = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return Interval(p, max(0.0, center - half), min(1.0, center + half), confidence)


def clopper_pearson_interval(successes: int, trials: int, confidence: float = 0.95) -> Interval:
    """Exact (Clopper-Pearson) interval: coverage at least `confidence` for every rate, at the price of
    being wider than Wilson. For integer counts."""
    _check_counts(successes, trials)
    alpha = 1 - check_confidence(confidence)
    if trials == 0:
        return Interval(None, 0.0, 1.0, confidence)
    low = 0.0 if successes == 0 else float(sps.beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = (
        1.0 if successes == trials else float(sps.beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    )
    return Interval(successes / trials, low, high, confidence)


def rate_difference_interval(
    successes: float, trials: float, control_successes: float, control_trials: float, confidence: float = 0.95
) -> Interval:
    """Interval of p - p_control (e.g. a variant's error rate minus the control's).

    Newcombe's hybrid score interval (his method 10): built from the two Wilson intervals, so it keeps
    their good behaviour for rates near 0 (error rates) where the Wald difference interval undercovers.
    """
    a = wilson_interval(successes, trials, confidence)
    b = wilson_interval(control_successes, control_trials, confidence)
    if a.estimate is None or b.estimate is None:
        return Interval(None, -1.0, 1.0, confidence)
    d = a.estimate - b.estimate
    low = d - math.sqrt((a.estimate - a.low) ** 2 + (b.high - b.estimate) ** 2)
    high = d + math.sqrt((a.high - a.estimate) ** 2 + (b.estimate - b.low) ** 2)
    return Interval(d, max(-1.0, low), min(1.0, high), confidence)


# ------------------------------------------------------------------------------------------ histograms


@dataclass(frozen=True)
class BucketCounts:
    """A Prometheus histogram as cumulative counts: `counts[i]` observations <= `bounds[i]`; the last bound
    is +Inf, so `counts[-1]` is the total."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]

    @property
    def total(self) -> float:
        return self.counts[-1] if self.counts else 0.0


def buckets_from_le(le_counts: Mapping[str | float, float]) -> BucketCounts:
    """{le: cumulative count} (le as Prometheus writes it: "0.5", "+Inf") -> BucketCounts.

    Summed `increase()` series of a fleet can be slightly non-monotone (each series is extrapolated on
    its own); like `histogram_quantile`, counts are made monotone by a running maximum.
    """
    if not le_counts:
        raise ValueError("a histogram needs at least the +Inf bucket")
    pairs = sorted((float(le), float(c)) for le, c in le_counts.items())
    if not math.isinf(pairs[-1][0]):
        raise ValueError(f"a histogram's last bucket must be le=+Inf, got {pairs[-1][0]}")
    if any(c < 0 or math.isnan(c) for _, c in pairs):
        raise ValueError(f"bucket counts must be >= 0: {pairs}")
    counts = np.maximum.accumulate([c for _, c in pairs])
    return BucketCounts(tuple(b for b, _ in pairs), tuple(float(c) for c in counts))


def value_at_rank(hist: BucketCounts, rank: float, *, beyond_last_bound: float | None = None) -> float:
    """The value below which `rank` of the observations lie, interpolated linearly inside its bucket as
    Prometheus' `histogram_quantile` does (the first bucket starts at 0 when its bound is positive).

    A rank that falls into the +Inf bucket gives the highest finite bound (Prometheus' answer), or
    `beyond_last_bound` when given (an upper confidence bound there is unknown: pass math.inf).
    """
    total = hist.total
    if total <= 0:
        raise ValueError("no observations in the histogram")
    rank = min(max(rank, 0.0), total)
    i = int(np.searchsorted(np.asarray(hist.counts), rank, side="left"))
    if math.isinf(hist.bounds[i]):
        if beyond_last_bound is not None:
            return beyond_last_bound
        return float(hist.bounds[-2]) if len(hist.bounds) > 1 else math.inf
    upper, below = hist.bounds[i], (hist.counts[i - 1] if i > 0 else 0.0)
    lower = hist.bounds[i - 1] if i > 0 else min(0.0, upper)
    in_bucket = hist.counts[i] - below
    if in_bucket <= 0:
        return float(upper)
    return float(lower + (upper - lower) * (rank - below) / in_bucket)


def histogram_quantile(q: float, hist: BucketCounts) -> float | None:
    """Prometheus' `histogram_quantile(q, ...)` on bucket counts; None without observations."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    if hist.total <= 0:
        return None
    return value_at_rank(hist, q * hist.total)


def quantile_interval(q: float, hist: BucketCounts, confidence: float = 0.95) -> Interval:
    """Distribution-free interval of the q-quantile: the order statistics X_(l) and X_(u) whose ranks are
    the binomial(n, q) quantiles at (1 -/+ confidence) / 2, read from the bucket CDF.

    Why order statistics rather than a bucket-level bootstrap: the count of observations below the true
    quantile is exactly binomial(n, q) whatever the latency distribution, so the ranks are exact, the answer
    is deterministic (a judge must not flip on a resampling seed) and costs nothing. The one approximation is
    the bucket: a rank is turned into a value by linear interpolation inside its bucket, as
    `histogram_quantile` does, so the interval is as fine as the buckets are. An upper rank in the +Inf bucket
    gives +inf: nothing bounds it.
    """
    alpha = 1 - check_confidence(confidence)
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    n = hist.total
    if n <= 0:
        return Interval(None, 0.0, math.inf, confidence)
    trials = max(round(n), 1)
    low_rank = float(sps.binom.ppf(alpha / 2, trials, q))
    high_rank = float(sps.binom.ppf(1 - alpha / 2, trials, q)) + 1
    scale = n / trials  # counts from increase() are not integers
    low = value_at_rank(hist, low_rank * scale) if low_rank >= 1 else min(0.0, hist.bounds[0])
    high = (
        value_at_rank(hist, high_rank * scale, beyond_last_bound=math.inf)
        if high_rank <= trials
        else math.inf
    )
    estimate = histogram_quantile(q, hist)
    return Interval(estimate, min(low, estimate), max(high, estimate), confidence)


def ratio_of_intervals(variant: Interval, control: Interval, confidence: float) -> Interval:
    """Interval of variant / control from two independent intervals (all values >= 0)."""
    if variant.estimate is None or control.estimate is None:
        return Interval(None, 0.0, math.inf, confidence)
    estimate = variant.estimate / control.estimate if control.estimate > 0 else math.inf
    low = variant.low / control.high if control.high > 0 else 0.0
    high = variant.high / control.low if control.low > 0 else math.inf
    return Interval(estimate, low, high, confidence)


def quantile_ratio_interval(
    q: float, variant: BucketCounts, control: BucketCounts, confidence: float = 0.95
) -> Interval:
    """Interval of a variant's q-quantile over the control's (e.g. the p95 latency ratio).

    Each quantile gets an interval at 1 - (1 - confidence) / 2 and the ratio takes their extremes: by the
    union bound both hold together with probability >= confidence (the arms are independent samples), so
    the ratio interval is valid, if a little conservative.
    """
    per_arm = 1 - (1 - check_confidence(confidence)) / 2
    return ratio_of_intervals(
        quantile_interval(q, variant, per_arm), quantile_interval(q, control, per_arm), confidence
    )


def relative_saving(
    variant_sum: float, variant_count: float, control_sum: float, control_count: float
) -> float | None:
    """1 - mean(variant) / mean(control): the share of GFLOPs or tokens a variant saves (None: no data)."""
    if variant_count <= 0 or control_count <= 0 or control_sum <= 0:
        return None
    return 1 - (variant_sum / variant_count) / (control_sum / control_count)


def quantile_name(q: float) -> str:
    """0.95 -> "p95", 0.999 -> "p99.9"."""
    return "p" + f"{q * 100:.6g}"


def parse_quantile_name(name: str) -> float:
    """ "p95" -> 0.95; raises ValueError for anything else."""
    if not name.startswith("p"):
        raise ValueError(f"a quantile is written p<percent>, e.g. p95; got {name!r}")
    try:
        q = float(name[1:]) / 100
    except ValueError:
        raise ValueError(f"a quantile is written p<percent>, e.g. p95; got {name!r}") from None
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile {name!r} is not between p0 and p100")
    return q
