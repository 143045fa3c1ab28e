"""Which searched keys mattered, by Optuna's own importance evaluators (PED-ANOVA and
fANOVA), over the search phase's trials that ran all their epochs.

Pruned trials are left out: their last value comes from a shorter budget than the completed
ones, so with them the evaluators would rank the budget a trial got, not its tricks. Diverged
trials (COMPLETE at the metric's worst value and infeasible, see `search/study.py`) are left
out too: their value is no measurement. The importance is single-seed: one run per config.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence

import optuna
from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator
from optuna.trial import FrozenTrial, TrialState

from search.experiment.study import PHASE
from trainable.status import DIVERGED, RUN_STATUS

logger = logging.getLogger(__name__)

__all__ = ["EVALUATORS", "importance", "search_trials"]

EVALUATORS = ("PedAnovaImportanceEvaluator", "FanovaImportanceEvaluator")
FANOVA_SEED = 0
MIN_TRIALS = 3  # PED-ANOVA needs a top quantile strictly smaller than all the trials


def search_trials(study: optuna.Study) -> tuple[list[FrozenTrial], dict[str, int]]:
    """The search phase's trials that ran all their epochs and gave a measurement, and how
    many of the others were left out, by reason."""
    used: list[FrozenTrial] = []
    left = {"pruned": 0, "diverged": 0, "failed or unfinished": 0}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(PHASE, "search") != "search":
            continue
        if t.state == TrialState.PRUNED:
            left["pruned"] += 1
        elif t.state != TrialState.COMPLETE:
            left["failed or unfinished"] += 1
        elif (
            t.user_attrs.get(RUN_STATUS) == DIVERGED
            or any(v > 0.0 for v in t.constraints.values())
            or t.value is None
            or not math.isfinite(t.value)
        ):
            left["diverged"] += 1
        else:
            used.append(t)
    return used, left


def _copy(study: optuna.Study, trials: Sequence[FrozenTrial]) -> optuna.Study:
    """An in-memory study holding only `trials` (the evaluators read a whole study)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line
    try:
        copy = optuna.create_study(direction=study.direction)
    finally:
        optuna.logging.set_verbosity(verbosity)
    copy.add_trials(trials)
    return copy


def _normalised(raw: dict[str, float]) -> dict[str, float]:
    """Shares summing to 1 (Optuna's convention), highest first; all zeros stay zeros."""
    total = sum(raw.values())
    out = {k: (v / total if total > 0 else 0.0) for k, v in raw.items()}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def importance(study_db: str, study_name: str, keys: list[str]) -> tuple[dict[str, dict[str, float]], str]:
    """Importance of each searched key (normalised to sum to 1) by PED-ANOVA and fANOVA over
    the completed, non-diverged search trials of the study `study_name` in the SQLite file
    `study_db`, and a one-line note on which trials and keys were used. Too few trials, or
    none whose values differ, give empty dicts and a note saying so."""
    empty: dict[str, dict[str, float]] = {name: {} for name in EVALUATORS}
    if not os.path.isfile(study_db):
        return empty, f"not computed: no study yet ({study_db} does not exist)"
    try:
        study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{os.path.abspath(study_db)}")
    except KeyError:
        return empty, f"not computed: no study named {study_name!r} in {study_db}"
    used, left = search_trials(study)
    why = (
        f"{left['pruned']} pruned trials left out because their last value comes from a shorter "
        "budget than the completed ones and would rank the budget, not the tricks"
    )
    others = [f"{n} {reason}" for reason, n in left.items() if reason != "pruned" and n]
    if others:
        why += f"; {' and '.join(others)} left out (no measurement)"
    head = f"over the {len(used)} search trials that ran all their epochs (single seed each); {why}"
    values = {t.value for t in used}
    if len(used) < MIN_TRIALS:
        return empty, f"not computed: {len(used)} usable trials (at least {MIN_TRIALS} needed); {why}"
    if len(values) < 2:
        return empty, f"not computed: all {len(used)} usable trials have the same value; {why}"

    present = {k: sum(k in t.params for t in used) for k in keys}
    anywhere = [k for k in keys if present[k] > 0]
    everywhere = [k for k in anywhere if present[k] == len(used)]
    if not anywhere:
        return empty, f"not computed: none of the searched keys is in the trials; {why}"
    notes = [head]
    conditional = [f"{k} ({present[k]} of {len(used)})" for k in anywhere if k not in everywhere]
    if conditional:
        notes.append(
            "fANOVA leaves out the keys set only when their `when` holds: " + ", ".join(conditional)
            + " (PED-ANOVA scores them within the trials that set them)"
        )
    missing = [k for k in keys if present[k] == 0]
    if missing:
        notes.append("not in any usable trial: " + ", ".join(missing))

    # the top 10% of the trials, at least 5 of them (PED-ANOVA is unstable with fewer), at
    # most the top half (a small search has few trials)
    target = min(0.5, max(0.1, 5 / len(used)))
    copy = _copy(study, used)
    notes.insert(1, f"PED-ANOVA: what it takes to reach the top {target:.0%} of them")
    result: dict[str, dict[str, float]] = {}
    runs = {
        # local: against the trials the search ran (TPE's draws), not a uniform space
        "PedAnovaImportanceEvaluator": (PedAnovaImportanceEvaluator(target_quantile=target, evaluate_on_local=True),
                                        anywhere),
        "FanovaImportanceEvaluator": (FanovaImportanceEvaluator(seed=FANOVA_SEED), everywhere),
    }
    for name, (evaluator, params) in runs.items():
        if not params:
            result[name] = {}
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # small-sample warnings: the note says how many trials
                raw = evaluator.evaluate(copy, params=list(params))
        except (ValueError, RuntimeError) as err:  # e.g. a key whose range changed between trials
            logger.warning("importance by %s not computed: %s", name, err)
            notes.append(f"{name} not computed ({str(err).splitlines()[0]})")
            result[name] = {}
            continue
        result[name] = _normalised({k: float(v) for k, v in raw.items()})
    return result, "; ".join(notes)
