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
import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ray.tune.search import Searcher

from search.answer.stats import paired_difference, rounding_floor
from search.experiment.folder import Experiment
from search.experiment.phases import BASELINE, CONFIRM, Entry, phase_exists, phase_path, write_rounds
from search.experiment.resume import CsvRows, JsonRows, drop_staged_rows
from search.experiment.trials import TrialRow
from search.phases.console import TrialLines, ray_verbosity
from search.phases.hparams import hparams_callback
from search.phases.schedulers import RecordedFIFO
from search.phases.trial import train_or_report_failure, trial_trainable
from spaces import Space
from trainable.status import RUN_STATUS
from trainable.storage import Storage

if TYPE_CHECKING:
    from ray.tune import ResultGrid

logger = logging.getLogger(__name__)

__all__ = ["SeedRounds", "ablation_plan", "confirm_plan", "racing_decided", "racing_survivors", "run_phase"]


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


# Seeds in rounds -------------------------------------------------------------------------------
ACCURACIES = ("val_acc", "val_acc5")
Scores = dict[str, dict[int, "float | None"]]
"""label -> seed -> the score of that seed's run (None: it failed or diverged)."""


def racing_survivors(scores: Scores, baseline: str, sign: float, floor: float = 0.0) -> list[str]:
    """The configs still in the race: every config but those with a failed or diverged seed
    (unstable) and those whose paired difference to the best has a 95% CI below 0 (its
    spread floored at `floor`, as the verdict floors it); the baseline always stays.
    `sign`: +1 when the metric improves upwards."""
    alive = [k for k, by_seed in scores.items() if k == baseline or all(v is not None for v in by_seed.values())]

    def mean(k: str) -> float:
        vals = [v for v in scores[k].values() if v is not None]
        return sign * sum(vals) / len(vals) if vals else -math.inf

    best = max(alive, key=mean)
    out = []
    for k in alive:
        if k not in (best, baseline):
            seeds = [s for s in scores[k] if s in scores[best] and scores[best][s] is not None]
            if len(seeds) >= 2:
                d = paired_difference([sign * scores[k][s] for s in seeds], [sign * scores[best][s] for s in seeds],
                                      floor=floor)
                if d.ci95[1] < 0:
                    continue
        out.append(k)
    return out


def racing_decided(scores: Scores, alive: list[str], baseline: str, sign: float, floor: float = 0.0) -> bool:
    """Whether more seeds can change nothing: no candidate left, or one whose paired
    difference to the baseline has a 95% CI that excludes 0."""
    candidates = [k for k in alive if k != baseline]
    if not candidates:
        return True
    if len(candidates) > 1 or baseline not in scores:
        return False
    k = candidates[0]
    seeds = [s for s in scores[k] if scores[baseline].get(s) is not None]
    if len(seeds) < 2:
        return False
    d = paired_difference([sign * scores[k][s] for s in seeds], [sign * scores[baseline][s] for s in seeds],
                          floor=floor)
    return not d.contains_zero


class SeedRounds(Searcher):
    """A phase's trials, one per (config, seed), in rounds of seeds: every config's first
    seed, then every config's second, ... With `racing`, the first round has two seeds and
    each later round one more, only for the configs `racing_survivors` keeps, until
    `racing_decided` or the last seed. Without it, every config runs every seed."""

    def __init__(self, entries: list[dict[str, Any]], seeds: list[int], metric: str, mode: str,
                 epochs: int, racing: bool = False, phase_dir: str | None = None) -> None:
        super().__init__(metric=metric, mode=mode)
        self.phase_dir = phase_dir  # where the seeds each config ran are written when the phase ends
        self.entries = {e["label"]: e for e in entries}
        self.seeds, self.epochs, self.racing = list(seeds), epochs, racing
        self.scores: Scores = {e["label"]: {} for e in entries}
        self.queue: list[tuple[str, int]] = []
        self.running: dict[str, tuple[str, int]] = {}
        self.next_seed = 0
        self.finished = False
        self._plan([*self.entries], 2 if racing else len(self.seeds))

    def _plan(self, labels: list[str], n_seeds: int) -> None:
        new = self.seeds[self.next_seed:self.next_seed + n_seeds]
        self.next_seed += len(new)
        self.queue += [(label, seed) for seed in new for label in labels]  # configs vary fastest

    def _advance(self) -> None:
        """At the end of a round: the next round, or the end of the phase (its seeds recorded)."""
        if self.queue or self.running or self.finished:
            return
        sign = 1.0 if self.mode == "max" else -1.0
        floor = self.paired_floor()
        alive = racing_survivors(self.scores, BASELINE, sign, floor) if self.racing else []
        if (not self.racing or self.next_seed >= len(self.seeds)
                or racing_decided(self.scores, alive, BASELINE, sign, floor)):
            self.finished = True
            if self.phase_dir is not None:
                write_rounds(self.phase_dir, {k: sorted(v) for k, v in self.scores.items()})
        else:
            self._plan(alive, 1)

    def paired_floor(self) -> float:
        """The floor on a paired difference's spread, as the verdict floors it
        (`search.answer.decide.paired_gain`): for an accuracy, sqrt(2) times the rounding
        spread of one validation image."""
        values = [v for by_seed in self.scores.values() for v in by_seed.values() if v is not None]
        return math.sqrt(2) * rounding_floor(values) if self.metric in ACCURACIES else 0.0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        self._advance()
        if self.finished:
            return Searcher.FINISHED
        if not self.queue:
            return None  # the round's last trials are still running
        label, seed = self.queue.pop(0)
        self.running[trial_id] = (label, seed)
        return {"entry": self.entries[label], "seed": seed}

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        unit = self.running.pop(trial_id, None)
        if unit is None:
            return
        label, seed = unit
        value = (result or {}).get(self.metric)
        ok = (not error and result is not None and result.get(RUN_STATUS) is None
              and int(result.get("epoch") or 0) >= self.epochs and value is not None and math.isfinite(value))
        self.scores[label][seed] = float(value) if ok else None
        self._advance()

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


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
    seeds: list[int] | None = None,
) -> ResultGrid:
    """Run (or continue, when its state exists) a phase's trials: one per (entry, seed) on
    `seeds` (default: the confirmation seeds), in rounds of seeds (`SeedRounds`)."""
    from ray import tune

    trainable = trial_trainable(run_confirm_trial, space=space, runs_path=exp.runs, phase=phase, launch=launch)
    path = phase_path(exp, phase)
    c = space.experiment.confirm
    seeds = list(seeds or space.confirm_seeds)
    if phase_exists(exp, phase):
        drop_staged_rows(Storage(path))  # the rows kept in the phase's folder stay
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            # one trial per (config, seed): the unit a cluster packs
            tune_config=tune.TuneConfig(
                search_alg=SeedRounds([asdict(e) for e in entries], seeds, space.experiment.metric,
                                      space.experiment.mode, space.train.run.epochs,
                                      racing=bool(c and c.racing and phase == CONFIRM), phase_dir=path),
                num_samples=len(entries) * len(seeds),
                max_concurrent_trials=concurrent,
                scheduler=RecordedFIFO(),  # Tune's state saved at every result
            ),
            run_config=tune.RunConfig(
                name=phase,
                storage_path=exp.path,
                failure_config=tune.FailureConfig(max_failures=space.experiment.max_failures),
                callbacks=[CsvRows(), JsonRows(), TrialLines(space), hparams_callback(space, exp), *(callbacks or [])],
                verbose=ray_verbosity(callbacks),
            ),
        )
    return tuner.fit()


