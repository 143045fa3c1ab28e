"""search.stats on fixed numbers, with scipy's results (and hand values) as the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from search.answer.stats import (accuracy_step, p_best, paired_difference, prediction_interval, selection_adjusted,
                                 summarise_values, weighted_tau)


def test_mean_std_and_student_t_interval_by_hand() -> None:
    s = summarise_values([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 dof)
    assert s.ci95 == pytest.approx((2.0 - half, 2.0 + half), abs=1e-9)


@pytest.mark.parametrize("values", [[0.91, 0.93, 0.92], [0.5, 0.7], [0.1, 0.4, 0.35, 0.2, 0.3]])
def test_interval_matches_scipy(values: list[float]) -> None:
    s = summarise_values(values)
    ref = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    assert s.ci95 == pytest.approx(ref, abs=1e-12)
    assert s.std == pytest.approx(np.std(values, ddof=1), abs=1e-15)


def test_one_value_claims_nothing_and_only_finite_values_count() -> None:
    s = summarise_values([0.9])
    assert s.ci95 == (-math.inf, math.inf) and s.contains_zero and math.isnan(s.std)
    # a diverged seed (nan, inf) is a status, not a number: left out, never raised on
    assert summarise_values([float("nan"), 0.9, float("inf"), 0.7]) == summarise_values([0.9, 0.7])
    empty = summarise_values([])
    assert empty.n == 0 and math.isnan(empty.mean) and empty.contains_zero
    assert summarise_values([math.inf, -math.inf]).n == 0
    with pytest.raises(ValueError):
        summarise_values([[1.0, 2.0]])


def test_accuracy_step_is_one_validation_image() -> None:
    assert accuracy_step([352 / 360, 350 / 360, 351 / 360, 1.0]) == pytest.approx(1 / 360)
    assert accuracy_step([0.95, 0.96, 0.97, 0.975]) == pytest.approx(1 / 200)
    assert accuracy_step([0.5]) == pytest.approx(1 / 2)  # a divisor of n: never finer than the truth
    assert accuracy_step([math.pi / 4]) is None and accuracy_step([1.5]) is None


def test_equal_differences_are_not_certainty_and_accuracy_intervals_stay_in_0_1() -> None:
    # every seed agrees to the image: without a floor the interval has width 0
    b = [0.95, 0.96, 0.97]
    a = [x + 0.01 for x in b]
    assert paired_difference(a, b).ci95[1] - paired_difference(a, b).ci95[0] == pytest.approx(0.0, abs=1e-12)
    d = paired_difference(a, b, floor=0.005)
    half = 4.302652729911275 * 0.005 / math.sqrt(3)
    assert d.std == 0.005 and d.ci95 == pytest.approx((0.01 - half, 0.01 + half), abs=1e-12)
    s = summarise_values([0.9, 1.0, 1.0], bounds=(0.0, 1.0))
    assert s.ci95[1] == 1.0 and s.ci95[0] == pytest.approx(
        sps.t.interval(0.95, 2, loc=np.mean([0.9, 1.0, 1.0]), scale=sps.sem([0.9, 1.0, 1.0]))[0])


def test_prediction_interval_is_the_two_sample_t_test_and_fails_5_percent_when_nothing_changed() -> None:
    x = [0.91, 0.93, 0.92, 0.95]
    lo, hi = prediction_interval(x, 2)
    # mean of 2 fresh seeds at the edge of the interval: the pooled-free two-sample t test of
    # "same mean" (variance from the confirmed values) has p = 0.05 there
    t = (hi - np.mean(x)) / (np.std(x, ddof=1) * math.sqrt(1 / 4 + 1 / 2))
    assert 2 * sps.t.sf(t, 3) == pytest.approx(0.05, abs=1e-12)
    rng = np.random.default_rng(0)
    fails = 0
    runs = 20_000
    for _ in range(runs):
        conf, fresh = rng.normal(0.9, 0.01, 3), rng.normal(0.9, 0.01, 2)
        lo, hi = prediction_interval(conf, 2)
        fails += not (lo <= fresh.mean() <= hi)
    assert abs(fails / runs - 0.05) < 0.006  # binomial sd 0.0015


def test_selection_adjusted_gain_removes_the_significance_filters_bias() -> None:
    assert selection_adjusted(0.5, 0.01, 2.0) == pytest.approx(0.5, abs=1e-6)  # far above: unchanged
    assert selection_adjusted(0.021, 0.01, 2.0) < 0.021
    rng = np.random.default_rng(1)
    mu, se = 0.02, 0.01
    d = rng.normal(mu, se, 40_000)
    kept = d[d > 2 * se]
    raw_bias = kept.mean() - mu
    adj = np.array([selection_adjusted(float(v), se, 2.0) for v in kept[:4000]])
    assert raw_bias > 0.004 and abs(np.median(adj) - mu) < abs(np.median(kept) - mu)


def test_weighted_tau_is_scipys_with_equal_weights_and_counts_a_heavy_item_more() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=12), rng.normal(size=12)
    assert weighted_tau(x, y, np.ones(12)) == pytest.approx(sps.kendalltau(x, y).statistic, abs=1e-12)
    # item 0 disagrees with everyone: weighting it up lowers tau
    x2, y2 = np.arange(6.0), np.array([5.0, 1, 2, 3, 4, 5.5])
    assert weighted_tau(x2, y2, [4, 1, 1, 1, 1, 1]) < weighted_tau(x2, y2, np.ones(6))
    assert math.isnan(weighted_tau([1.0], [1.0], [1.0]))


def test_paired_difference_uses_the_pairs() -> None:
    # a beats b by exactly 0.01 on every seed, although the seeds differ by far more:
    # paired, the difference is certain; unpaired, it would be lost in seed noise
    b = [0.60, 0.80, 0.70]
    a = [x + 0.01 for x in b]
    d = paired_difference(a, b)
    assert d.mean == pytest.approx(0.01) and d.std == pytest.approx(0.0, abs=1e-12)
    assert not d.contains_zero
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [1.0])


def test_paired_difference_interval_matches_scipy() -> None:
    a, b = [0.92, 0.95, 0.91, 0.94], [0.90, 0.96, 0.90, 0.91]
    d = paired_difference(a, b)
    diff = np.subtract(a, b)
    ref = sps.t.interval(0.95, 3, loc=diff.mean(), scale=sps.sem(diff))
    assert d.ci95 == pytest.approx(ref, abs=1e-12)
    assert d.contains_zero  # a mixed record: a tie


def test_p_best_sums_to_one_and_follows_the_evidence() -> None:
    clear = p_best({"a": [0.9, 0.91, 0.92], "b": [0.5, 0.51, 0.52], "c": [0.6, 0.6, 0.6]})
    assert clear == pytest.approx({"a": 1.0, "b": 0.0, "c": 0.0})
    close = p_best({"a": [0.90, 0.80, 0.85], "b": [0.85, 0.85, 0.86]}, n_boot=4000, seed=1)
    assert sum(close.values()) == pytest.approx(1.0)
    assert 0.05 < close["a"] < 0.95  # neither is certain
    low = p_best({"a": [0.3, 0.31], "b": [0.5, 0.52]}, mode="min")
    assert low == pytest.approx({"a": 1.0, "b": 0.0})
    same = p_best({"a": [0.5, 0.6], "b": [0.5, 0.6]})
    assert same == pytest.approx({"a": 0.5, "b": 0.5})  # ties share


def test_p_best_is_a_bootstrap_over_paired_seeds() -> None:
    """Against a direct reference: resample seed indices, compare the configs' means."""
    values = {"a": [0.90, 0.80, 0.85, 0.88], "b": [0.85, 0.86, 0.84, 0.87]}
    rng = np.random.default_rng(7)
    wins = 0
    for _ in range(20000):
        idx = rng.integers(0, 4, size=4)
        ma, mb = np.mean(np.take(values["a"], idx)), np.mean(np.take(values["b"], idx))
        wins += 1.0 if ma > mb else 0.5 if ma == mb else 0.0
    assert p_best(values, n_boot=20000, seed=3)["a"] == pytest.approx(wins / 20000, abs=0.015)


@pytest.mark.parametrize("seed", range(20))
def test_paired_difference_is_scipys_paired_t_interval(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    a, b = rng.normal(0.9, 0.02, n), rng.normal(0.9, 0.02, n)
    got = paired_difference(a, b)
    want = sps.ttest_rel(a, b).confidence_interval(0.95)
    assert got.ci95 == pytest.approx((want.low, want.high), abs=1e-12)
