"""The verdict of a confirmation: which config wins, by how much, with what certainty
(`decide`), and the answer in a sentence or two (`verdict_message`).

The rules, in order:
- a config with a diverged or failed seed is unstable (reported with the seed) and never
  the answer; only configs that finished every seed compare, on the same (paired) seeds;
- without a stable baseline result the verdict is "unconfirmed", with the reason;
- with fewer than two seeds the verdict is "unconfirmed" (nothing is claimed from one seed);
- the answer is never a config not shown better than the baseline: the best config by mean
  must beat the baseline with a paired 95% interval above 0, else the verdict is "no gain"
  and the answer is the baseline;
- configs tied with the best (paired interval containing 0) that are themselves shown
  better than the baseline make a tie, answered by the best without the tricks it is not
  shown to need: the tied config with the fewest tricks among those whose every changed trick
  the best changes to the same value (else the best by mean answers);
- intervals never have zero width (an accuracy's spread is floored at the rounding spread of
  its step of one validation image, `spread_floor`) and an accuracy's interval stays inside [0, 1];
- with fewer than 3 seeds the verdict is weak, and says so;
- the gain over the baseline is reported raw (paired mean on the confirmation seeds, which
  also chose the winner) and corrected for having been selected as significant
  (`search.answer.stats.selection_adjusted`), the figure the message states.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from scipy import stats as sps

from search.answer.stats import (MIN_SEEDS_STRONG, p_best, paired_difference, rounding_floor, selection_adjusted,
                                 summarise_values)
from search.experiment.phases import BASELINE, Measured
from search.experiment.trials import TrialRow
from spaces import Space

__all__ = ["NO_GAIN", "TIE", "UNCONFIRMED", "WINNER", "Decision", "decide", "direction", "paired_gain",
           "spread_floor", "unstable_seeds", "value_bounds", "verdict_message"]

WINNER, TIE, NO_GAIN, UNCONFIRMED = "winner", "tie", "no gain over baseline", "unconfirmed"


@dataclass
class Decision:
    """The outcome of a confirmation: the winner, the runner-up, the verdict and the paired
    comparisons (winner minus other, signed so that positive means the winner is better).
    For a tie, `runner_up` is the config the winner is tied with: the best by mean when a
    simpler config answers, else the best-ranked config tied with the best."""

    winner: Measured
    runner_up: Measured | None
    baseline: Measured | None
    verdict: str
    vs_runner_up: dict[str, Any] | None
    vs_baseline: dict[str, Any] | None
    p_best: dict[str, float]
    reason: str | None = None
    """Why the verdict is "unconfirmed" (no baseline result, one seed, ...)."""
    weak: bool = False
    """Fewer than 3 seeds: the interval is wide and the verdict weak."""
    unstable: dict[str, list[int]] = field(default_factory=dict)
    """Label -> the seeds that diverged or failed (such a config is never the answer)."""


def direction(space: Space) -> float:
    """+1 when the metric improves upwards, -1 when it improves downwards."""
    return 1.0 if space.experiment.mode == "max" else -1.0


def _is_accuracy(metric: str) -> bool:
    return metric.startswith("val_acc")


def spread_floor(measured: list[Measured], space: Space) -> float:
    """The floor on a standard deviation of one config's values over seeds: for an accuracy,
    the spread of rounding to its step of one validation image (1/n), a uniform error on one
    step: step / sqrt(12); 0 for a loss. A paired difference of two such values has sqrt(2)
    times it (`paired_gain`)."""
    if not _is_accuracy(space.experiment.metric):
        return 0.0
    return rounding_floor([v for m in measured for v in m.values])


def value_bounds(space: Space) -> tuple[float, float]:
    """Where a metric's values (and so their intervals) can lie."""
    return (0.0, 1.0) if _is_accuracy(space.experiment.metric) else (-math.inf, math.inf)


def unstable_seeds(m: Measured) -> list[int]:
    return sorted({*m.diverged, *m.failed})


def paired_gain(a: Measured, b: Measured, sign: float, floor: float = 0.0) -> dict[str, Any] | None:
    """a - b over their paired seeds (signed: positive means a is better), with its 95% CI
    (the spread floored at sqrt(2) * `floor`, the floor of one config's values; clipped to
    [-1, 1] for a floor from an accuracy); None without two paired seeds."""
    if len(a.values) < 2 or a.seeds != b.seeds:
        return None
    bounds = (-1.0, 1.0) if floor > 0 else (-math.inf, math.inf)
    d = paired_difference([sign * v for v in a.values], [sign * v for v in b.values], floor=math.sqrt(2) * floor,
                          bounds=bounds)
    return {"delta": d.mean, "ci95": list(d.ci95), "std": d.std, "n": d.n}


def _shown_better(diff: dict[str, Any] | None) -> bool:
    return diff is not None and diff["ci95"][0] > 0.0


def _contains_zero(diff: dict[str, Any] | None) -> bool:
    return diff is None or diff["ci95"][0] <= 0.0 <= diff["ci95"][1]


def _trick_values(space: Space, m: Measured) -> frozenset[tuple[str, str]]:
    """The tricks a config changes from the base, each with the values of it and its children."""
    base = space.base_values
    return frozenset((t, json.dumps([m.entry.values.get(k, base[k]) for k in (t, *space.tricks[t])], sort_keys=True))
                     for t in space.changed_tricks(m.entry.values))


def _with_adjusted(diff: dict[str, Any] | None) -> dict[str, Any] | None:
    """The gain over the baseline with its selection-adjusted value (`adjusted`)."""
    if diff is None:
        return None
    n = diff["n"]
    se = diff["std"] / math.sqrt(n) if n > 1 and math.isfinite(diff["std"]) else math.nan
    crit = float(sps.t.ppf(0.975, n - 1)) if n > 1 else math.inf
    return {**diff, "adjusted": selection_adjusted(diff["delta"], se, crit)}


def decide(measured: list[Measured], space: Space) -> Decision | None:
    """The verdict over a confirmation's configs (see the module's rules); None when no
    config finished every seed."""
    unstable = {m.entry.label: unstable_seeds(m) for m in measured if unstable_seeds(m)}
    done = [m for m in measured if m.status == "done" and m.values and m.entry.label not in unstable]
    if not done:
        return None
    sign = direction(space)
    floor = spread_floor(done, space)
    seeds = max((m.seeds for m in done), key=len)
    done = [m for m in done if m.seeds == seeds]  # paired: the same seeds everywhere
    ranked = sorted(done, key=lambda m: -sign * sum(m.values) / len(m.values))
    best = ranked[0]
    baseline = next((m for m in done if m.entry.role == BASELINE), None)
    reason, weak = None, 2 <= len(seeds) < MIN_SEEDS_STRONG

    def gain(a: Measured, b: Measured) -> dict[str, Any] | None:
        return paired_gain(a, b, sign, floor)

    if baseline is None:
        bm = next((m for m in measured if m.entry.role == BASELINE), None)
        if bm is None:
            reason = "the confirmation has no baseline"
        elif bm.entry.label in unstable:
            reason = f"the baseline is unstable (seed {', '.join(map(str, unstable[bm.entry.label]))} " \
                     "diverged or failed), so no gain over it can be shown"
        elif bm.status in ("failed", "error"):
            reason = f"the baseline {bm.status}: {bm.error or 'no result'}"
        else:
            reason = "the baseline has not finished every seed yet"
        verdict, winner = UNCONFIRMED, best
    elif len(seeds) < 2:
        verdict, winner, reason = UNCONFIRMED, best, "one seed"
    elif best is baseline or not _shown_better(gain(best, baseline)):
        verdict, winner = NO_GAIN, baseline
    else:
        tied = [m for m in ranked[1:] if m is not baseline and _contains_zero(gain(best, m))
                and _shown_better(gain(m, baseline))]
        if tied:  # statistically tied with the best, and better than the baseline
            verdict = TIE
            # the best without the tricks it is not shown to need: a tied config whose every
            # changed trick the best changes to the same value; another config tied with the
            # best (another batch, another mix) is no simpler an answer than the best itself
            mine = _trick_values(space, best)
            simpler = [m for m in tied if _trick_values(space, m) < mine]
            winner = min([best, *simpler], key=lambda m: (len(_trick_values(space, m)), ranked.index(m)))
        else:
            verdict, winner = WINNER, best
    others = [m for m in ranked if m is not winner]
    if verdict == TIE:
        runner_up = best if winner is not best else tied[0]
    else:
        runner_up = others[0] if others else None
    pb = p_best({m.entry.label: m.values for m in done}, mode=space.experiment.mode) if len(seeds) >= 2 else {}
    return Decision(
        winner, runner_up, baseline, verdict,
        gain(winner, runner_up) if runner_up else None,
        _with_adjusted(gain(winner, baseline)) if baseline is not None and baseline is not winner else None,
        pb, reason, weak, unstable,
    )


def _fmt(v: float, metric: str) -> str:
    return f"{100 * v:.2f}%" if _is_accuracy(metric) else f"{v:.4f}"


def _pp(v: float, metric: str) -> str:
    return f"{100 * v:+.2f} pp" if _is_accuracy(metric) else f"{v:+.4f}"


def verdict_message(d: Decision | None, space: Space, best_search: TrialRow | None) -> str:
    """The answer in one or two sentences."""
    metric = space.experiment.metric
    if d is None:
        if best_search is None:
            return "No trial has finished all its epochs yet: no answer."
        return (f"Unconfirmed: the best search trial scored {metric} {_fmt(best_search.final, metric)} "
                "on one seed; without a confirmation on several seeds this is not an answer to rely on.")
    w = d.winner
    mean = sum(w.values) / len(w.values)
    tricks = ", ".join(space.changed_tricks(w.entry.values)) or "no trick changed"
    unstable = "".join(f" {label} is unstable (seed {', '.join(map(str, s))} diverged or failed) and is not "
                       "an answer." for label, s in d.unstable.items())
    if d.verdict == UNCONFIRMED:
        if d.reason == "one seed":
            return (f"Unconfirmed: {w.entry.label} ({tricks}) scored {metric} {_fmt(mean, metric)} on one seed; "
                    "set experiment.confirm.seeds >= 2 for an answer with a confidence interval." + unstable)
        return (f"Unconfirmed: {d.reason}; the best confirmed config so far is {w.entry.label} ({tricks}), "
                f"{metric} {_fmt(mean, metric)}. Not an answer to rely on yet." + unstable)
    s = summarise_values(w.values, floor=spread_floor([w], space), bounds=value_bounds(space))
    ci = f"{_fmt(mean, metric)} (95% CI {_fmt(s.ci95[0], metric)} to {_fmt(s.ci95[1], metric)}, {len(w.values)} seeds)"
    weak = (f" Weak: only {len(w.values)} seeds; set experiment.confirm.seeds >= {MIN_SEEDS_STRONG} "
            "for a firmer verdict.") if d.weak else ""
    if d.verdict == NO_GAIN:
        return (f"No trick combination beat the baseline on this data: the baseline scores {metric} {ci}, "
                "and no confirmed config is shown better than it beyond seed noise." + weak + unstable)
    gain = d.vs_baseline
    vs = ""
    if gain:
        vs = (f"; {_pp(gain['adjusted'], metric)} over the baseline (adjusted for having been selected; "
              f"paired mean {_pp(gain['delta'], metric)}, 95% CI {_pp(gain['ci95'][0], metric)} to "
              f"{_pp(gain['ci95'][1], metric)})")
    if d.verdict == TIE and d.runner_up is not None and d.vs_runner_up and d.vs_runner_up["delta"] >= 0:
        r = d.runner_up
        return (f"Tie: {w.entry.label} ({tricks}), the best by mean, is statistically tied with {r.entry.label} "
                f"({_fmt(sum(r.values) / len(r.values), metric)}); both beat the baseline, and no config tied with "
                f"it is {w.entry.label} without some of its tricks, so the best by mean is the answer, "
                f"{metric} {ci}{vs}." + weak + unstable)
    if d.verdict == TIE and d.runner_up is not None:
        r = d.runner_up
        return (f"Tie: {w.entry.label} ({tricks}) is statistically tied with {r.entry.label}, the best by mean "
                f"({_fmt(sum(r.values) / len(r.values), metric)}); both beat the baseline, and as the one with "
                f"fewer tricks {w.entry.label} is the answer, {metric} {ci}{vs}." + weak + unstable)
    return f"Winner: {w.entry.label} ({tricks}), {metric} {ci}{vs}." + weak + unstable
