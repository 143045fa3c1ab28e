"""The records of the phases after the search (`<experiment>/confirm/`, `<experiment>/ablate/`):
what a phase's configs are (`Entry`) and what their seeds scored (`Measured`), read from
Tune's results of the phase."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from search.experiment.folder import Experiment
from search.experiment.trials import read_results
from spaces import Space
from trainable.cluster import error_line
from trainable.config import ConfigError
from trainable.status import FAILED, RUN_STATUS

__all__ = ["ABLATE", "BASELINE", "CONFIRM", "ROUNDS_FILE", "Entry", "Measured", "ablation_matches", "phase_exists",
           "phase_path", "read_phase", "write_rounds"]

CONFIRM, ABLATE = "confirm", "ablate"
BASELINE = "baseline"
ROUNDS_FILE = "rounds.json"
"""In a phase's folder once it ended: the seeds each config ran (racing stops some early)."""


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
    diverged: list[int] = field(default_factory=list)
    """Seeds whose run diverged (a status, not a number: they are not in `values`)."""
    failed: list[int] = field(default_factory=list)
    """Seeds whose run failed with an error of the config or data (not in `values`)."""
    curves: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    """seed -> [(epoch, metric), ...]."""
    trial_ids: dict[int, str] = field(default_factory=dict)
    """seed -> the Tune trial that trained it."""


def phase_path(exp: Experiment, phase: str) -> str:
    return f"{exp.path}/{phase}"


def phase_exists(exp: Experiment, phase: str) -> bool:
    """Whether Tune started this phase in the experiment (its state can be restored)."""
    from ray.tune import Tuner

    return bool(Tuner.can_restore(phase_path(exp, phase)))


def write_rounds(phase_dir: str, seeds: dict[str, list[int]]) -> None:
    """Record that a phase ended, with the seeds each config ran."""
    Experiment.at(phase_dir).store.write_text(ROUNDS_FILE, json.dumps({"seeds": seeds}, indent=2) + "\n",
                                              overwrite=True)


def _rounds(exp: Experiment, phase: str) -> dict[str, list[int]]:
    """label -> the seeds it ran, for a phase that ended; {} for one still running."""
    try:
        return {str(k): [int(s) for s in v] for k, v in
                json.loads(exp.store.read_text(f"{phase}/{ROUNDS_FILE}"))["seeds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def read_phase(exp: Experiment, phase: str, space: Space, results: Any = None) -> list[Measured]:
    """Every config of a phase with its per-seed scores, in the order of the plan; [] when
    the phase never started. `results`: Tune's ResultGrid when the caller has it."""
    if results is None:
        if not exp.store.exists(f"{phase}/"):
            return []
        try:
            results = read_results(phase_path(exp, phase))
        except ConfigError:
            return []
    metric = space.experiment.metric
    seeds = space.confirm_seeds or [space.train.run.seed]
    epochs = space.train.run.epochs
    by_label: dict[str, Measured] = {}
    scores: dict[str, dict[int, float]] = {}
    for r in results:  # one Tune trial per (config, seed); older phases: one per config, all seeds
        config = r.config or {}
        entry = config.get("entry")
        if not entry:
            continue
        tid = str((r.metrics or {}).get("trial_id") or _trial_id(r))
        m = by_label.setdefault(entry["label"], Measured(Entry(**entry), tid))
        by_seed = scores.setdefault(entry["label"], {})
        df = r.metrics_dataframe
        if df is not None and RUN_STATUS in df and (df[RUN_STATUS] == FAILED).any():
            m.status, m.error = FAILED, str((r.metrics or {}).get("error") or FAILED)
        if df is not None and metric in df and "seed" in df:
            for seed, rows in df[df["seed"].notna()].groupby("seed"):
                # in epoch order; a report repeated for an epoch keeps its latest last (the
                # rows are in the order reported). Not Tune's training_iteration: a trial
                # restored from its checkpoint by a resumed driver counts again from 1
                rows = rows.sort_values("epoch", kind="stable")
                m.curves[int(seed)] = [(int(e), float(v)) for e, v in zip(rows["epoch"], rows[metric])
                                       if not (isinstance(v, float) and math.isnan(v))]
                m.trial_ids[int(seed)] = tid
                last = rows.iloc[-1]
                ended = last.get(RUN_STATUS) if RUN_STATUS in rows else None
                if isinstance(ended, str):  # diverged or failed: a status, not a number
                    (m.failed if ended == FAILED else m.diverged).append(int(seed))
                elif int(last["epoch"]) >= epochs:
                    value = float(last[metric])
                    if math.isfinite(value):
                        by_seed[int(seed)] = value
                    else:
                        m.diverged.append(int(seed))
        if r.error:
            m.status = "error"
            m.error = error_line(r.error)
    ran = _rounds(exp, phase)
    out = []
    for label, m in by_label.items():
        by_seed = scores[label]
        expected = ran.get(label, seeds)
        m.seeds = [s for s in seeds if s in by_seed]
        m.values = [by_seed[s] for s in m.seeds]
        m.diverged = [s for s in seeds if s in m.diverged]
        m.failed = [s for s in seeds if s in m.failed]
        m.trial_id = m.trial_ids.get(m.seeds[0], m.trial_id) if m.seeds else m.trial_id
        if m.status not in (FAILED, "error") and len(m.seeds) + len(m.diverged) + len(m.failed) < len(expected):
            m.status = "unfinished"
        out.append(m)
    out.sort(key=lambda m: _label_key(m.entry.label))
    return out


def ablation_matches(ablation: list[Entry], winner: Entry, space: Space) -> bool:
    """Whether a recorded ablation phase belongs to `winner`: one entry per trick the winner
    changes, each the winner's values with that trick (and the keys under it) at their base
    values. False for an ablation planned for another config (the winner changed since), which
    is then re-planned; True for an empty phase (nothing planned yet)."""
    if not ablation:
        return True
    base = space.base_values
    tricks = space.changed_tricks(winner.values)
    if sorted(e.trick or "" for e in ablation) != sorted(tricks):
        return False
    for e in ablation:
        reset = {e.trick, *space.tricks.get(e.trick or "", ())}
        for k in {*e.values, *winner.values}:
            want = base.get(k) if k in reset else winner.values.get(k, base.get(k))
            if e.values.get(k, base.get(k)) != want:
                return False
    return True


def _trial_id(result: Any) -> str:
    return str(getattr(result, "path", "?")).rstrip("/").rsplit("/", 1)[-1]


def _label_key(label: str) -> tuple[int, int, str]:
    if label.startswith("candidate "):
        return (0, int(label.split()[-1]), label)
    if label == BASELINE:
        return (1, 0, label)
    return (2, 0, label)
