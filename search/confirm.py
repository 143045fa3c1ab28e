"""After the search: confirmation and ablation, each a Tune experiment inside the search's
folder (`<experiment>/confirm/`, `<experiment>/ablate/`).

Every config of a phase is one Tune trial that trains it on the confirmation seeds, one
after another (`run.repeats`), at the full budget and without early stopping: the seeds
are the same for every config, so configs compare seed by seed (paired). The confirmation
trains the search's best `top_k` distinct configs and the baseline (every searched key at
its base value); the ablation trains the winner with one trick at a time reset to its
base value. Neither feeds the sampler; both resume with `--resume`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from search.experiment import FAILED, RUN_STATUS, Experiment, TrialRow, worst_value
from spaces import Space

if TYPE_CHECKING:
    from ray.tune import ResultGrid

logger = logging.getLogger(__name__)

__all__ = [
    "ABLATE",
    "CONFIRM",
    "Entry",
    "Measured",
    "ablation_plan",
    "changed_tricks",
    "confirm_plan",
    "full_values",
    "phase_exists",
    "read_phase",
    "run_phase",
]

CONFIRM, ABLATE = "confirm", "ablate"
BASELINE = "baseline"


@dataclass
class Entry:
    """One config of a phase: its label, role ("candidate", "baseline" or "ablation"), its
    values of the searched keys (inactive `when` keys at their base value), and where it
    came from (the search trial and its score; the trick an ablation resets)."""

    label: str
    role: str
    values: dict[str, Any]
    search_trial: str | None = None
    search_score: float | None = None
    trick: str | None = None


@dataclass
class Measured:
    """An entry and what its runs scored: the metric at the last epoch of each seed's run."""

    entry: Entry
    trial_id: str
    seeds: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    status: str = "done"
    """done (every seed), unfinished, failed or error."""
    error: str | None = None
    curves: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    """seed -> [(epoch, metric), ...]."""


# Plans -----------------------------------------------------------------------------------------
def full_values(space: Space, values: dict[str, Any]) -> dict[str, Any]:
    """Every searched key's value in a trial: sampled, or the base value where not sampled."""
    return {**space.base_values, **{k: v for k, v in values.items() if k in space.search}}


def changed_tricks(space: Space, values: dict[str, Any]) -> list[str]:
    """The tricks (searched keys without `when`, with their children) whose value differs
    from the base in `values` (full values)."""
    base = space.base_values
    return [t for t, children in space.tricks.items()
            if any(values.get(k, base[k]) != base[k] for k in (t, *children))]


def confirm_plan(rows: Sequence[TrialRow], space: Space) -> list[Entry]:
    """The best `top_k` distinct configs among the search trials that ran all epochs (audited
    ones included), by score, and the baseline."""
    top_k = space.experiment.confirm.top_k if space.experiment.confirm else 1
    sign = -1.0 if space.experiment.mode == "max" else 1.0
    ranked = sorted((r for r in rows if r.status == "done" and r.final is not None), key=lambda r: sign * r.final)
    base = space.base_values
    entries: list[Entry] = []
    seen: list[dict[str, Any]] = []
    for r in ranked:
        values = full_values(space, r.values)
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
    for trick in changed_tricks(space, winner.values):
        values = dict(winner.values)
        for k in (trick, *space.tricks[trick]):
            values[k] = base[k]
        out.append(Entry(f"without {trick}", "ablation", values, trick=trick))
    return out


# Running -----------------------------------------------------------------------------------------
def phase_path(exp: Experiment, phase: str) -> str:
    return f"{exp.path}/{phase}"


def phase_exists(exp: Experiment, phase: str) -> bool:
    """Whether Tune started this phase in the experiment (its state can be restored)."""
    from ray.tune import Tuner

    return bool(Tuner.can_restore(phase_path(exp, phase)))


def run_confirm_trial(
    config: dict[str, Any], space: Space, runs_path: str, phase: str,
    launch: Callable[[Any, str, str], None] | None = None,
) -> None:
    """One Tune trial of a phase: the entry's values on the base config, trained on the
    confirmation seeds one after another."""
    from ray import tune

    from search.run import train_or_report_failure

    trial_id = tune.get_context().get_trial_id()
    train_or_report_failure(
        lambda: space.confirm_config(config["entry"]["values"]), f"{phase}_{trial_id}", runs_path, space, launch
    )


def run_phase(
    space: Space, exp: Experiment, phase: str, entries: list[Entry], concurrent: int,
    callbacks: list[Any] | None = None, launch: Callable[[Any, str, str], None] | None = None,
) -> ResultGrid:
    """Run (or continue, when its state exists) a phase's trials: one per entry, FIFO."""
    from ray import tune

    from search.console import TrialLines
    from search.resume import CsvRows, JsonRows
    from search.run import DRIVER_MEMORY

    trainable = tune.with_resources(
        tune.with_parameters(run_confirm_trial, space=space, runs_path=exp.runs, phase=phase, launch=launch),
        {"CPU": 0, "memory": DRIVER_MEMORY},
    )
    path = phase_path(exp, phase)
    if phase_exists(exp, phase):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"entry": tune.grid_search([asdict(e) for e in entries])},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(
                name=phase,
                storage_path=exp.path,
                failure_config=tune.FailureConfig(max_failures=space.experiment.max_failures),
                callbacks=[CsvRows(), JsonRows(), TrialLines(space), *(callbacks or [])],
            ),
        )
    return tuner.fit()


# Reading -----------------------------------------------------------------------------------------
def read_phase(exp: Experiment, phase: str, space: Space, results: Any = None) -> list[Measured]:
    """Every config of a phase with its per-seed scores, in the order of the plan; [] when
    the phase never started. `results`: Tune's ResultGrid when the caller has it."""
    if results is None:
        if not exp.store.exists(f"{phase}/"):
            return []
        from search.experiment import read_results
        from trainable.config import ConfigError

        try:
            results = read_results(phase_path(exp, phase))
        except ConfigError:
            return []
    metric = space.experiment.metric
    c = space.experiment.confirm
    seeds = [c.first_seed + i for i in range(c.seeds)] if c else [space.train.run.seed]
    epochs = space.train.run.epochs
    out = []
    for r in results:
        entry = (r.config or {}).get("entry")
        if not entry:
            continue
        m = Measured(Entry(**entry), str((r.metrics or {}).get("trial_id") or _trial_id(r)))
        df = r.metrics_dataframe
        by_seed: dict[int, float] = {}
        if df is not None and metric in df and "seed" in df:
            if RUN_STATUS in df and (df[RUN_STATUS] == FAILED).any():
                m.status, m.error = FAILED, str((r.metrics or {}).get("error") or FAILED)
            for seed, rows in df[df["seed"].notna()].groupby("seed"):
                rows = rows.sort_values("training_iteration") if "training_iteration" in rows else rows
                m.curves[int(seed)] = [(int(e), float(v)) for e, v in zip(rows["epoch"], rows[metric])
                                       if not (isinstance(v, float) and math.isnan(v))]
                last = rows.iloc[-1]
                diverged = RUN_STATUS in rows and isinstance(last.get(RUN_STATUS), str)
                if diverged or int(last["epoch"]) >= epochs:
                    value = float(last[metric]) if not diverged else worst_value(metric)
                    by_seed[int(seed)] = value if math.isfinite(value) else worst_value(metric)
        m.seeds = [s for s in seeds if s in by_seed]
        m.values = [by_seed[s] for s in m.seeds]
        if r.error:
            m.status = "error"
            from trainable.cluster import error_line

            m.error = error_line(r.error)
        elif m.status != FAILED and len(m.seeds) < len(seeds):
            m.status = "unfinished"
        out.append(m)
    out.sort(key=lambda m: _label_key(m.entry.label))
    return out


def _trial_id(result: Any) -> str:
    return str(getattr(result, "path", "?")).rstrip("/").rsplit("/", 1)[-1]


def _label_key(label: str) -> tuple[int, int, str]:
    if label.startswith("candidate "):
        return (0, int(label.split()[-1]), label)
    if label == BASELINE:
        return (1, 0, label)
    return (2, 0, label)
