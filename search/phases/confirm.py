"""After the search: confirmation and ablation, each a Tune experiment inside the search's
folder (`<experiment>/confirm/`, `<experiment>/ablate/`).

Every (config, seed) of a phase is one Tune trial, trained at the full budget without early
stopping, so a cluster packs the seed-runs of all configs at once: the seeds are the same
for every config, so configs compare seed by seed (paired). The confirmation
trains the search's best `top_k` distinct configs and the baseline (every searched key at
its base value); the ablation trains the winner with one trick at a time reset to its
base value. Neither feeds the sampler; both resume with `--resume`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from search.experiment.folder import Experiment
from search.experiment.phases import BASELINE, Entry, phase_exists, phase_path
from search.experiment.resume import CsvRows, JsonRows
from search.experiment.trials import TrialRow
from search.phases.console import TrialLines, ray_verbosity
from search.phases.trial import train_or_report_failure, trial_trainable
from spaces import Space

if TYPE_CHECKING:
    from ray.tune import ResultGrid

logger = logging.getLogger(__name__)

__all__ = ["ablation_plan", "confirm_plan", "run_phase"]


# Plans -----------------------------------------------------------------------------------------
def confirm_plan(rows: Sequence[TrialRow], space: Space) -> list[Entry]:
    """The best `top_k` distinct configs among the search trials that ran all epochs (audited
    ones included), by score, and the baseline."""
    top_k = space.experiment.confirm.top_k if space.experiment.confirm else 1
    sign = -1.0 if space.experiment.mode == "max" else 1.0
    ranked = sorted((r for r in rows if r.finished), key=lambda r: sign * r.final)
    base = space.base_values
    entries: list[Entry] = []
    seen: list[dict[str, Any]] = []
    for r in ranked:
        values = space.full_values(r.values)
        if values in seen:
            continue
        seen.append(values)
        if values == base:
            entries.append(Entry(BASELINE, BASELINE, values, r.trial_id, r.final))
        else:
            entries.append(Entry(f"candidate {len(entries) + 1}", "candidate", values, r.trial_id, r.final))
        if len(entries) >= top_k:
            break
    if not any(e.role == BASELINE for e in entries):
        entries.append(Entry(BASELINE, BASELINE, dict(base)))
    for i, e in enumerate(x for x in entries if x.role == "candidate"):
        e.label = f"candidate {i + 1}"
    return entries


def ablation_plan(winner: Entry, space: Space) -> list[Entry]:
    """The winner with each of its changed tricks, one at a time, reset to the base value."""
    base = space.base_values
    out = []
    for trick in space.changed_tricks(winner.values):
        values = dict(winner.values)
        for k in (trick, *space.tricks[trick]):
            values[k] = base[k]
        out.append(Entry(f"without {trick}", "ablation", values, trick=trick))
    return out


# Running -----------------------------------------------------------------------------------------
def run_confirm_trial(
    config: dict[str, Any], space: Space, runs_path: str, phase: str,
    launch: Callable[[Any, str, str], None] | None = None,
) -> None:
    """One Tune trial of a phase: the entry's values on the base config, trained on one
    confirmation seed."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    train_or_report_failure(
        lambda: space.confirm_config(config["entry"]["values"], config.get("seed")), f"{phase}_{trial_id}",
        runs_path, space, launch,
    )


def run_phase(
    space: Space, exp: Experiment, phase: str, entries: list[Entry], concurrent: int,
    callbacks: list[Any] | None = None, launch: Callable[[Any, str, str], None] | None = None,
) -> ResultGrid:
    """Run (or continue, when its state exists) a phase's trials: one per (entry, seed), FIFO."""
    from ray import tune

    trainable = trial_trainable(run_confirm_trial, space=space, runs_path=exp.runs, phase=phase, launch=launch)
    path = phase_path(exp, phase)
    if phase_exists(exp, phase):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            # one trial per (config, seed), the unit a cluster packs; configs vary fastest,
            # so the trials run in rounds: every config's first seed, then every second...
            param_space={"entry": tune.grid_search([asdict(e) for e in entries]),
                         "seed": tune.grid_search(space.confirm_seeds)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(
                name=phase,
                storage_path=exp.path,
                failure_config=tune.FailureConfig(max_failures=space.experiment.max_failures),
                callbacks=[CsvRows(), JsonRows(), TrialLines(space), *(callbacks or [])],
                verbose=ray_verbosity(callbacks),
            ),
        )
    return tuner.fit()


