"""The statistics behind a search's answer: mean and 95% confidence interval over seeds
(Student t), paired differences between configs trained on the same seeds, the bootstrap
probability that each config is the best, and Kendall's tau between two rankings.

Plain numpy and scipy; a claim that one config beats another is never made from one seed,
so every interval needs at least two values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

__all__ = ["Summary", "kendall_tau", "p_best", "paired_difference", "summarise_values"]


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and 95% CI (Student t) of n values."""

    mean: float
    std: float
    ci95: tuple[float, float]
    n: int

    @property
    def contains_zero(self) -> bool:
        return self.ci95[0] <= 0.0 <= self.ci95[1]


def summarise_values(values: Sequence[float], level: float = 0.95) -> Summary:
    """Mean ± the Student-t interval of `values`; with one value the interval is unbounded
    (nothing can be claimed from one seed)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"need a non-empty list of values, got {values!r}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"values must be finite, got {values!r}")
    n, mean = len(x), float(x.mean())
    if n == 1:
        return Summary(mean, math.nan, (-math.inf, math.inf), 1)
    std = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return Summary(mean, std, (mean - half, mean + half), n)


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Summary:
    """a - b over paired seeds (a[i] and b[i] trained with the same seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} vs {len(b)} values")
    return summarise_values(np.subtract(a, b), level)


def p_best(
    values: Mapping[str, Sequence[float]], mode: str = "max", n_boot: int = 10_000, seed: int = 0
) -> dict[str, float]:
    """For each config, the fraction of bootstrap resamples of the seeds (the same resampled
    seeds for every config: the values are paired) in which its mean is the best; ties share."""
    names = list(values)
    table = np.asarray([values[k] for k in names], dtype=np.float64)  # configs x seeds
    if table.ndim != 2 or table.shape[1] == 0:
        raise ValueError("every config needs the same, non-zero number of paired values")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be max or min, got {mode!r}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, table.shape[1], size=(n_boot, table.shape[1]))
    means = table[:, idx].mean(axis=2)  # configs x resamples
    best = means.max(axis=0) if mode == "max" else means.min(axis=0)
    winners = np.isclose(means, best[None, :], rtol=0.0, atol=1e-12)
    share = winners / winners.sum(axis=0, keepdims=True)
    return {k: float(share[i].mean()) for i, k in enumerate(names)}


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two scorings of the same items (nan below two items or when
    one side is constant)."""
    if len(x) != len(y):
        raise ValueError(f"two scorings of the same items needed: {len(x)} vs {len(y)}")
    n = len(x)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if dx == 0 and dy == 0:
                continue  # tied in both: counts in neither denominator term below
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    pairs_x = concordant + discordant + ties_y  # pairs not tied in x
    pairs_y = concordant + discordant + ties_x  # pairs not tied in y
    if pairs_x == 0 or pairs_y == 0:
        return math.nan
    return (concordant - discordant) / math.sqrt(pairs_x * pairs_y)
