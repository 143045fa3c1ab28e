"""search.stats on fixed numbers, with scipy's results (and hand values) as the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from search.stats import kendall_tau, p_best, paired_difference, summarise_values


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


def test_one_value_claims_nothing_and_bad_input_is_refused() -> None:
    s = summarise_values([0.9])
    assert s.ci95 == (-math.inf, math.inf) and s.contains_zero and math.isnan(s.std)
    for bad in ([], [float("nan"), 1.0], [[1.0, 2.0]]):
        with pytest.raises(ValueError):
            summarise_values(bad)


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


@pytest.mark.parametrize(
    "x, y",
    [
        ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]),
        ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]),
        ([0.3, 0.1, 0.4, 0.2, 0.5], [0.6, 0.2, 0.5, 0.1, 0.9]),
        ([1, 1, 2, 3, 3], [2, 1, 3, 3, 4]),  # ties on both sides: tau-b
        ([0.2, 0.5, 0.5, 0.9], [0.1, 0.1, 0.7, 0.8]),
    ],
)
def test_kendall_tau_matches_scipy(x: list[float], y: list[float]) -> None:
    assert kendall_tau(x, y) == pytest.approx(sps.kendalltau(x, y).statistic, abs=1e-12)


def test_kendall_tau_degenerate() -> None:
    assert math.isnan(kendall_tau([1.0], [2.0]))
    assert math.isnan(kendall_tau([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError):
        kendall_tau([1.0, 2.0], [1.0])
