"""Always-valid guardrail tests: passing, failing or inconclusive, however often they are evaluated.

The building block is the beta-binomial confidence sequence for a Bernoulli rate p (Robbins' mixture;
Howard, Ramdas, McAuliffe and Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence sequences",
Ann. Statist. 2021). For a candidate rate p, after n observations with S successes,

    M_n(p) = integral of L(r) / L(p) over r ~ Beta(a, b) = B(a + S, b + n - S) / B(a, b) / (p^S (1-p)^(n-S))

is a nonnegative martingale with mean 1 when p is the true rate, so by Ville's inequality the chance that
it ever reaches 1/level is at most `level`. The set {p : M_n(p) < 1/level} is therefore a confidence
sequence: it holds the true rate at every n at once with probability >= 1 - level. A guardrail read from
it may be evaluated after every observation, or at any times a judge chooses (each Prometheus poll), and
its chance of a false alarm stays <= level; no fixed sample size is needed. The same holds with the counts
of any subset of times, so it does not matter that the judge sees the counts only at its polls.

Why this and not a fixed-sample interval checked repeatedly: watching a 95 % Wilson interval after every
comparison declares a variant at its threshold bad far more often than 5 % of the time (the simulation in
`abtest.simulate` prints how often). Why a beta mixture: it has a closed form (log-Beta functions from
scipy) for any n, so the judge and the vectorised simulation evaluate it exactly, with no grid.

Three guardrail kinds are built on it:
- a rate against a threshold (shadow agreement >= 0.98, top-1 accuracy >= x, error rate <= x);
- a rate difference against a margin (error rate <= control + 0.5 points): a sequence per arm at level / 2,
  their extremes bound the difference (union bound);
- a latency quantile ratio against a bound (p95 ratio <= 1.1): the count of observations below the true
  q-quantile is a Bernoulli(q) sum, so a sequence on it bounds the quantile by two ranks of the histogram
  (Howard and Ramdas, "Sequential estimation of quantiles with applications to A/B-testing", Bernoulli
  2022); one per arm at level / 2, their extremes bound the ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import betaln, xlog1py, xlogy

from abtest.stats import BucketCounts, Interval, histogram_quantile, value_at_rank

State = Literal["passing", "failing", "inconclusive"]
STATES: tuple[State, ...] = ("passing", "failing", "inconclusive")
PASSING, FAILING, INCONCLUSIVE = 0, 1, 2  # codes of the vectorised `rate_states`

# Prior weight (in observations) of the mixture centred on the value under test. Small enough that data
# dominates quickly, large enough that the mixture puts its mass on rates near the threshold, where the
# alternatives that matter lie. Tuned with abtest.simulate (3 points below 0.98 at level 0.05).
DEFAULT_PRIOR_STRENGTH = 10.0
BISECTION_STEPS = 60


@dataclass(frozen=True)
class Decision:
    """A guardrail's state, its estimate and the always-valid interval of the guarded figure."""

    state: State
    estimate: float | None
    low: float
    high: float
    level: float
    samples: float

    def as_dict(self) -> dict[str, object]:
        return {
            "state": self.state,
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "level": self.level,
            "samples": self.samples,
        }


def check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level (false-alarm probability) must be in (0, 1), e.g. 0.05; got {level!r}")
    return float(level)


def prior_around(center: float, strength: float = DEFAULT_PRIOR_STRENGTH) -> tuple[float, float]:
    """Beta(a, b) with mean `center` and a + b = `strength`."""
    if not 0.0 < center < 1.0:
        raise ValueError(f"a prior centre must be in (0, 1), got {center}")
    if strength <= 0:
        raise ValueError(f"prior strength must be > 0, got {strength}")
    return center * strength, (1 - center) * strength


JEFFREYS = (0.5, 0.5)


def log_evidence(successes, trials, p, prior: tuple[float, float]):
    """log M_n(p): the evidence against rate p (vectorised over numpy arrays)."""
    a, b = prior
    s = np.asarray(successes, dtype=float)
    n = np.asarray(trials, dtype=float)
    return betaln(a + s, b + n - s) - betaln(a, b) - xlogy(s, p) - xlog1py(n - s, -np.asarray(p, dtype=float))


def rate_states(
    successes,
    trials,
    threshold: float,
    kind: Literal["min", "max"],
    level: float,
    prior_strength: float = DEFAULT_PRIOR_STRENGTH,
):
    """PASSING / FAILING / INCONCLUSIVE codes of "rate >= threshold" (kind min) or "rate <= threshold"
    (kind max), vectorised: the confidence sequence excludes the threshold on the good or the bad side."""
    check_level(level)
    s = np.asarray(successes, dtype=float)
    n = np.asarray(trials, dtype=float)
    crossed = log_evidence(s, n, threshold, prior_around(threshold, prior_strength)) >= math.log(1 / level)
    above = s > threshold * n  # the mixture never crosses at the observed rate, so this picks the side
    good = above if kind == "min" else ~above
    return np.where(crossed, np.where(good, PASSING, FAILING), INCONCLUSIVE)


def _bisect(below: Callable[[float], bool], inside: float, outside: float) -> float:
    """The point between `inside` (where `below` holds: evidence under its threshold) and `outside` where
    the evidence reaches the threshold; `outside` itself when the evidence stays below all the way."""
    if below(outside):
        return outside
    for _ in range(BISECTION_STEPS):
        mid = (inside + outside) / 2
        if below(mid):
            inside = mid
        else:
            outside = mid
    return (inside + outside) / 2


def rate_sequence_interval(
    successes: float, trials: float, level: float, prior: tuple[float, float] = JEFFREYS
) -> tuple[float, float]:
    """The confidence sequence {p : M_n(p) < 1/level} at this n: an interval, as log M_n(p) is convex in p
    with its minimum (<= 0) at the observed rate."""
    check_level(level)
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes}, {trials}")
    if trials == 0:
        return 0.0, 1.0
    threshold = math.log(1 / level)
    p_hat = successes / trials

    def rate_below(rate: float) -> bool:
        return log_evidence(successes, trials, rate, prior) < threshold

    return _bisect(rate_below, p_hat, 0.0), _bisect(rate_below, p_hat, 1.0)


def rate_decision(
    successes: float,
    trials: float,
    threshold: float,
    kind: Literal["min", "max"],
    level: float,
    prior_strength: float = DEFAULT_PRIOR_STRENGTH,
) -> Decision:
    """Guardrail "rate >= threshold" (min) or "rate <= threshold" (max), e.g. shadow agreement >= 0.98."""
    if kind not in ("min", "max"):
        raise ValueError(f"kind must be 'min' or 'max', got {kind!r}")
    state = STATES[int(rate_states(successes, trials, threshold, kind, level, prior_strength))]
    low, high = rate_sequence_interval(successes, trials, level, prior_around(threshold, prior_strength))
    estimate = successes / trials if trials > 0 else None
    return Decision(state, estimate, low, high, level, trials)


def rate_difference_decision(
    successes: float,
    trials: float,
    control_successes: float,
    control_trials: float,
    margin: float,
    level: float,
) -> Decision:
    """Guardrail "rate - control rate <= margin" (e.g. error rate <= control + 0.005): failing when the
    difference is surely above the margin, passing when surely at or below it."""
    check_level(level)
    v_low, v_high = rate_sequence_interval(successes, trials, level / 2)
    c_low, c_high = rate_sequence_interval(control_successes, control_trials, level / 2)
    low, high = v_low - c_high, v_high - c_low
    state: State = "failing" if low > margin else "passing" if high <= margin else "inconclusive"
    estimate = (
        successes / trials - control_successes / control_trials if trials > 0 and control_trials > 0 else None
    )
    return Decision(state, estimate, low, high, level, min(trials, control_trials))


def quantile_sequence_interval(
    q: float, hist: BucketCounts, level: float, prior_strength: float = DEFAULT_PRIOR_STRENGTH
) -> Interval:
    """Always-valid interval of the q-quantile of a histogram's distribution.

    The number of observations at or below the true quantile is a Bernoulli(q) sum; the counts S that the
    sequence for rate q accepts form an interval [S_lo, S_hi] (log M is convex in S), so the quantile lies
    between the values at ranks S_lo and S_hi + 1 of the bucket CDF (interpolated inside a bucket, as
    `histogram_quantile` does; +inf when the upper rank is in the +Inf bucket).
    """
    check_level(level)
    n = hist.total
    if n <= 0:
        return Interval(None, 0.0, math.inf, 1 - level)
    prior = prior_around(q, prior_strength)
    threshold = math.log(1 / level)
    center = q * n  # near the minimum of log M over S; log M there is about -log(prior spread) < threshold
    def count_below(count: float) -> bool:
        return log_evidence(count, n, q, prior) < threshold

    s_lo = _bisect(count_below, center, 0.0)
    s_hi = _bisect(count_below, center, n)
    low = value_at_rank(hist, s_lo) if s_lo > 0 else min(0.0, hist.bounds[0])
    high = value_at_rank(hist, s_hi + 1, beyond_last_bound=math.inf) if s_hi + 1 <= n else math.inf
    estimate = histogram_quantile(q, hist)
    return Interval(estimate, min(low, estimate), max(high, estimate), 1 - level)


def quantile_ratio_decision(
    q: float, variant: BucketCounts, control: BucketCounts, bound: float, level: float
) -> Decision:
    """Guardrail "q-quantile(variant) / q-quantile(control) <= bound" (e.g. p95 latency ratio <= 1.1)."""
    check_level(level)
    v = quantile_sequence_interval(q, variant, level / 2)
    c = quantile_sequence_interval(q, control, level / 2)
    if v.estimate is None or c.estimate is None:
        return Decision("inconclusive", None, 0.0, math.inf, level, min(variant.total, control.total))
    low = v.low / c.high if c.high > 0 else 0.0
    high = v.high / c.low if c.low > 0 else math.inf
    estimate = v.estimate / c.estimate if c.estimate > 0 else math.inf
    state: State = "failing" if low > bound else "passing" if high <= bound else "inconclusive"
    return Decision(state, estimate, low, high, level, min(variant.total, control.total))
