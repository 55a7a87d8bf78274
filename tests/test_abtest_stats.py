"""Fixed-sample intervals of abtest.stats: known values, coverage, histogram quantiles as Prometheus does."""

import math

import numpy as np
import pytest

from abtest import stats


def test_wilson_matches_a_textbook_value_and_stays_in_unit_interval():
    # Newcombe (1998), table I: 81/263 -> 0.2553..0.3662 (Wilson score, 95 %)
    iv = stats.wilson_interval(81, 263, 0.95)
    assert iv.low == pytest.approx(0.2553, abs=1e-4) and iv.high == pytest.approx(0.3662, abs=1e-4)
    assert stats.wilson_interval(0, 10).low == 0.0 and stats.wilson_interval(10, 10).high == pytest.approx(
        1.0
    )
    assert stats.wilson_interval(0, 0).estimate is None


def test_clopper_pearson_is_exact_and_wider_than_wilson():
    cp, w = stats.clopper_pearson_interval(970, 1000), stats.wilson_interval(970, 1000)
    assert cp.low <= w.low and cp.high >= w.high
    # Clopper-Pearson of 0/10 at 95 %: upper = 1 - 0.025^(1/10)
    assert stats.clopper_pearson_interval(0, 10).high == pytest.approx(1 - 0.025**0.1)


def test_rate_difference_newcombe_known_value():
    # Newcombe (1998) example: 56/70 - 48/80 = 0.2, method 10 interval 0.0524..0.3339
    iv = stats.rate_difference_interval(56, 70, 48, 80, 0.95)
    assert iv.estimate == pytest.approx(0.2)
    assert iv.low == pytest.approx(0.0524, abs=2e-4) and iv.high == pytest.approx(0.3339, abs=2e-4)


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.1])
def test_confidence_is_checked(bad):
    with pytest.raises(ValueError, match="confidence"):
        stats.wilson_interval(1, 2, bad)


HIST = stats.buckets_from_le({"0.05": 10, "0.1": 500, "0.25": 950, "0.5": 990, "+Inf": 1000})


def test_histogram_quantile_interpolates_like_prometheus():
    # rank 950 is the top of the 0.25 bucket; rank 500 the top of 0.1; rank 255 halfway through 0.05..0.1
    assert stats.histogram_quantile(0.95, HIST) == pytest.approx(0.25)
    assert stats.histogram_quantile(0.5, HIST) == pytest.approx(0.1)
    assert stats.histogram_quantile(0.255, HIST) == pytest.approx(0.075)
    assert stats.histogram_quantile(0.999, HIST) == pytest.approx(0.5)  # +Inf bucket: highest finite bound


def test_buckets_need_inf_and_are_made_monotone():
    with pytest.raises(ValueError, match="Inf"):
        stats.buckets_from_le({"0.1": 3})
    assert stats.buckets_from_le({"0.1": 5, "0.2": 4.9, "+Inf": 6}).counts == (5, 5, 6)


def test_quantile_interval_covers_the_true_quantile_at_its_confidence():
    """Exponential latencies (true p95 known) in fine buckets: the 90 % interval covers it ~90 % of times."""
    rng = np.random.default_rng(1)
    bounds = np.concatenate([np.linspace(0.01, 1.0, 100), [np.inf]])
    true_p95 = -math.log(0.05) * 0.1
    covered = 0
    for _ in range(400):
        x = rng.exponential(0.1, 400)
        counts = [(x <= b).sum() for b in bounds]
        iv = stats.quantile_interval(0.95, stats.BucketCounts(tuple(bounds), tuple(map(float, counts))), 0.9)
        covered += iv.low <= true_p95 <= iv.high
    assert 0.85 <= covered / 400 <= 0.97


def test_quantile_ratio_interval_brackets_the_estimate_and_is_unbounded_in_the_inf_bucket():
    slow = stats.buckets_from_le({"0.05": 5, "0.1": 400, "0.25": 940, "0.5": 990, "+Inf": 1000})
    iv = stats.quantile_ratio_interval(0.95, slow, HIST)
    assert iv.low <= iv.estimate <= iv.high
    tail = stats.buckets_from_le({"0.1": 50, "+Inf": 100})
    assert stats.quantile_interval(0.95, tail).high == math.inf


def test_relative_saving_and_quantile_names():
    assert stats.relative_saving(60, 10, 100, 10) == pytest.approx(0.4)
    assert stats.relative_saving(1, 0, 1, 1) is None
    assert stats.quantile_name(0.95) == "p95" and stats.parse_quantile_name("p99.9") == pytest.approx(0.999)
    with pytest.raises(ValueError):
        stats.parse_quantile_name("95")
