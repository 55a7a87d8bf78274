"""Always-valid guardrail tests, checked where the truth is known (smaller runs than abtest.simulate)."""

import numpy as np
import pytest

from abtest import sequential as sq
from abtest import stats
from abtest.simulate import first_failure, peeking_wilson_judge, sequential_judge

LEVEL = 0.05


def test_false_rollbacks_stay_below_level_when_judged_after_every_comparison():
    """200 runs x 5,000 comparisons at the guardrail itself (the hardest good variant). The same data
    watched through a fixed-sample Wilson interval shows why the sequential test is needed."""
    rng = np.random.default_rng(5)
    seq = first_failure(0.98, 200, 5000, sequential_judge(0.98, LEVEL), rng)
    assert seq.rollback_rate <= LEVEL
    peek = first_failure(0.98, 200, 5000, peeking_wilson_judge(0.98, LEVEL), np.random.default_rng(5))
    assert peek.rollback_rate > 3 * LEVEL  # peeking inflates false alarms; the test above would catch it


def test_a_variant_three_points_below_is_rolled_back_fast():
    rng = np.random.default_rng(6)
    bad = first_failure(0.95, 200, 5000, sequential_judge(0.98, LEVEL), rng)
    assert bad.rollback_rate > 0.99
    assert bad.median_to_rollback() <= 5000


def test_rate_decision_states_and_interval():
    failing = sq.rate_decision(950, 1000, 0.98, "min", LEVEL)
    assert failing.state == "failing" and failing.high < 0.98 and failing.low <= 0.95 <= failing.high
    assert sq.rate_decision(995, 1000, 0.98, "min", LEVEL).state == "passing"
    assert sq.rate_decision(29, 30, 0.98, "min", LEVEL).state == "inconclusive"  # 0.967 of 30 proves nothing
    # "max" guardrails (an error rate <= 1 %) mirror it
    assert sq.rate_decision(60, 2000, 0.01, "max", LEVEL).state == "failing"
    assert sq.rate_decision(0, 5000, 0.01, "max", LEVEL).state == "passing"
    with pytest.raises(ValueError, match="level"):
        sq.rate_decision(1, 2, 0.5, "min", 0.0)


def test_rate_sequence_interval_is_wider_than_the_fixed_sample_one():
    low, high = sq.rate_sequence_interval(970, 1000, LEVEL)
    w = stats.wilson_interval(970, 1000, 1 - LEVEL)
    assert low < w.low and high > w.high and low < 0.97 < high


def _checkpoints(total, count=20):
    return np.unique(np.geomspace(50, total, count).astype(int))


def test_error_rate_difference_no_false_failures_with_equal_rates_and_catches_a_bad_variant():
    rng = np.random.default_rng(7)
    checks = _checkpoints(20_000)
    false_fails = 0
    for _ in range(80):
        v = np.cumsum(rng.random(20_000) < 0.01)
        c = np.cumsum(rng.random(20_000) < 0.01)
        false_fails += any(
            sq.rate_difference_decision(v[n - 1], n, c[n - 1], n, 0.0, LEVEL).state == "failing"
            for n in checks
        )
    assert false_fails / 80 <= LEVEL
    bad_v = np.cumsum(rng.random(20_000) < 0.03)
    ctrl = np.cumsum(rng.random(20_000) < 0.01)
    states = [
        sq.rate_difference_decision(bad_v[n - 1], n, ctrl[n - 1], n, 0.005, LEVEL).state for n in checks
    ]
    assert states[-1] == "failing" and states[0] == "inconclusive"
    good = sq.rate_difference_decision(ctrl[-1], 20_000, ctrl[-1], 20_000, 0.01, LEVEL)
    assert good.state == "passing" and good.low <= 0 <= good.high


BOUNDS = tuple(np.concatenate([np.geomspace(0.005, 5, 40), [np.inf]]))


def _hist(latencies):
    return stats.BucketCounts(BOUNDS, tuple(float((latencies <= b).sum()) for b in BOUNDS))


def test_latency_ratio_guardrail_holds_for_equal_latencies_and_fails_a_slow_variant():
    rng = np.random.default_rng(8)
    checks = _checkpoints(5000, 8)
    false_fails = 0
    for _ in range(60):
        v, c = rng.lognormal(-3, 0.5, 5000), rng.lognormal(-3, 0.5, 5000)
        false_fails += any(
            sq.quantile_ratio_decision(0.95, _hist(v[:n]), _hist(c[:n]), 1.0, LEVEL).state == "failing"
            for n in checks
        )
    assert false_fails / 60 <= LEVEL
    slow, c = rng.lognormal(-3, 0.5, 5000) * 1.5, rng.lognormal(-3, 0.5, 5000)
    d = sq.quantile_ratio_decision(0.95, _hist(slow), _hist(c), 1.1, LEVEL)
    assert d.state == "failing" and d.low > 1.1 and d.low <= d.estimate <= d.high
    same = sq.quantile_ratio_decision(0.95, _hist(c), _hist(c), 1.2, LEVEL)
    assert same.state == "passing" and same.estimate == pytest.approx(1.0)


def test_quantile_sequence_interval_contains_the_histogram_quantile():
    h = stats.buckets_from_le({"0.05": 10, "0.1": 500, "0.25": 950, "0.5": 990, "+Inf": 1000})
    iv = sq.quantile_sequence_interval(0.95, h, LEVEL)
    fixed = stats.quantile_interval(0.95, h, 1 - LEVEL)
    assert iv.low <= fixed.low <= 0.25 <= fixed.high <= iv.high
