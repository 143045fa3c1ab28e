"""The statistics behind a search's answer: mean and 95% confidence interval over seeds
(Student t), paired differences between configs trained on the same seeds, the bootstrap
probability that each config is the best, the prediction interval `--verify` checks fresh
seeds against, and a Kendall tau weighted for the rung audit's sampling.

Plain numpy and scipy; a claim that one config beats another is never made from one seed,
so every interval needs at least two values. Only finite values enter (a diverged or failed
seed is a status, `search.experiment.phases.Measured`), and nothing here raises on them.

No zero-width interval: an accuracy over n validation images moves in steps of 1/n
(`accuracy_step`), so seeds can agree exactly while the truth still varies; the callers floor
the standard deviation at the spread of rounding to that step (`floor`). Intervals of an
accuracy are clipped to [0, 1] (differences to [-1, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

__all__ = [
    "MIN_SEEDS_STRONG", "Summary", "accuracy_step", "p_best", "rounding_floor", "paired_difference", "prediction_interval",
    "selection_adjusted", "summarise_values", "weighted_tau",
]

MIN_SEEDS_STRONG = 3
"""With fewer seeds a verdict is weak (a t interval on 1 degree of freedom is 12.7 sd wide)."""


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


def _finite(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"need a flat list of values, got {values!r}")
    return x[np.isfinite(x)]


def accuracy_step(values: Sequence[float], max_n: int = 100_000, tol: float = 1e-7) -> float | None:
    """The step an accuracy moves in (1/n for n validation images), read from the values: the
    smallest n for which every value is a multiple of 1/n (a divisor of the true n, so the
    step is never finer than the true one); None when no n up to `max_n` fits."""
    x = _finite(values)
    if len(x) == 0 or np.any((x < -tol) | (x > 1 + tol)):
        return None
    n = np.arange(1, max_n + 1, dtype=np.float64)
    ok = np.ones(len(n), dtype=bool)
    for v in np.unique(x):
        k = v * n
        ok &= np.abs(k - np.round(k)) <= tol
        if not ok.any():
            return None
    return float(1.0 / n[np.argmax(ok)])


def rounding_floor(values: Sequence[float]) -> float:
    """The spread of rounding an accuracy to its step (`accuracy_step`): a uniform error on
    one step, step / sqrt(12); 0 when the values have no step (not an accuracy)."""
    step = accuracy_step(values)
    return step / math.sqrt(12) if step else 0.0


def summarise_values(
    values: Sequence[float], level: float = 0.95, floor: float = 0.0,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> Summary:
    """Mean ± the Student-t interval of the finite `values`, the standard deviation floored at
    `floor` and the interval clipped to `bounds`; with one value the interval is unbounded
    (nothing can be claimed from one seed), with none the mean is nan."""
    x = _finite(values)
    n = len(x)
    if n == 0:
        return Summary(math.nan, math.nan, (-math.inf, math.inf), 0)
    mean = float(x.mean())
    if n == 1:
        return Summary(mean, math.nan, (-math.inf, math.inf), 1)
    std = max(float(x.std(ddof=1)), floor)
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return Summary(mean, std, (max(mean - half, bounds[0]), min(mean + half, bounds[1])), n)


def paired_difference(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, floor: float = 0.0,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> Summary:
    """a - b over paired seeds (a[i] and b[i] trained with the same seed); pairs where
    either value is not finite are left out."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} vs {len(b)} values")
    return summarise_values(np.subtract(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)),
                            level, floor, bounds)


def prediction_interval(
    values: Sequence[float], m: int, level: float = 0.95, floor: float = 0.0,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> tuple[float, float]:
    """Where the mean of `m` fresh seeds of the same config falls with probability `level`,
    given the confirmed `values` (n of them): mean ± t(n-1) * s * sqrt(1/n + 1/m). It is the
    two-sample t test of "nothing changed" at 1 - level, so `--verify` fails a config that
    did not change in 1 - level of its runs (normal seeds)."""
    x = _finite(values)
    n = len(x)
    if n < 2 or m < 1:
        return (-math.inf, math.inf)
    mean, std = float(x.mean()), max(float(x.std(ddof=1)), floor)
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * std * math.sqrt(1 / n + 1 / m)
    return (max(mean - half, bounds[0]), min(mean + half, bounds[1]))


def selection_adjusted(delta: float, se: float, threshold: float) -> float:
    """The gain of a config reported only because `delta / se` exceeded `threshold`, corrected
    for that selection: the conditional maximum-likelihood estimate of the true gain mu under
    delta ~ Normal(mu, se) truncated to delta > threshold * se (the winner's curse of a
    significance filter). Equals delta when it is far above the threshold."""
    from scipy.optimize import minimize_scalar

    if not (math.isfinite(delta) and math.isfinite(se)) or se <= 0 or delta <= threshold * se:
        return delta
    cut = threshold * se

    def nll(mu: float) -> float:
        return 0.5 * ((delta - mu) / se) ** 2 + float(sps.norm.logsf((cut - mu) / se))

    res = minimize_scalar(nll, bounds=(delta - 10 * se, delta), method="bounded", options={"xatol": 1e-6 * se})
    return float(res.x)


def weighted_tau(x: Sequence[float], y: Sequence[float], weights: Sequence[float]) -> float:
    """Kendall's tau-a between x and y with a weight per item (a pair counts w_i * w_j): an
    audited trial stands for the 1/audit stopped trials it was sampled from. With equal
    weights and no ties it is scipy's `kendalltau`; nan with fewer than two items."""
    a, b, w = (np.asarray(v, dtype=np.float64) for v in (x, y, weights))
    if len(a) < 2:
        return math.nan
    sx = np.sign(a[:, None] - a[None, :])
    sy = np.sign(b[:, None] - b[None, :])
    ww = w[:, None] * w[None, :]
    np.fill_diagonal(ww, 0.0)
    total = float(ww.sum())
    return float((ww * sx * sy).sum() / total) if total > 0 else math.nan


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
