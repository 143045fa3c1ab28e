"""The experiment folder `<storage>/<name>/` (a local folder or a URI) and one reader of its
trials.

The folder holds Tune's state and results, the space the search ran (`space.yaml` and
`search.json`), the Optuna study, TensorBoard's files and every trial's training run.
`summarise` reads trials from a Ray Tune `ResultGrid`: the live one `Tuner.fit()` returns,
or `read_results(path)` for an experiment on disk or object storage, finished or running.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spaces import METRICS, Space, load_space
from trainable.cluster import error_line
from trainable.config import ConfigError
from trainable.storage import Storage, expand_storage, local_mirror

if TYPE_CHECKING:
    from ray.tune import ResultGrid
    from ray.tune.result import Result

logger = logging.getLogger(__name__)

__all__ = [
    "DIVERGED",
    "EXPERIMENT_ID",
    "FAILED",
    "RUNS_DIR",
    "RUN_ERROR",
    "RUN_STATUS",
    "SEARCH_INFO",
    "SPACE_COPY",
    "STUDY_FILE",
    "Experiment",
    "TrialRow",
    "claim_mirror",
    "experiment_for",
    "finished",
    "format_table",
    "read_results",
    "record_space",
    "recorded_space",
    "restore_study",
    "summarise",
    "worst_value",
]

SPACE_COPY = "space.yaml"  # the space file as given
SEARCH_INFO = "search.json"  # where it came from, its hash, the overrides
STUDY_FILE = "optuna.db"  # the Optuna study (SQLite)
EXPERIMENT_ID = "experiment_id"  # in search.json, and a file naming the experiment a local mirror belongs to
RUNS_DIR = "runs"  # one TorchTrainer run per trial


# The folder ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Experiment:
    """Where a search keeps everything: `<storage>/<name>/`."""

    storage: str
    name: str

    @classmethod
    def at(cls, path: str) -> Experiment:
        """The experiment whose folder is `path`."""
        storage, _, name = expand_storage(path).rpartition("/")
        return cls(storage, name)

    @property
    def path(self) -> str:
        return f"{self.storage}/{self.name}"

    @cached_property
    def store(self) -> Storage:
        return Storage(self.path)

    @property
    def local(self) -> str:
        """Where files that must sit on a local disk live (the SQLite study, TensorBoard's
        HParams files while they are written): the experiment itself when it is local, else
        a mirror that is uploaded as the search runs."""
        return self.path if self.store.is_local else str(local_mirror(self.path))

    @property
    def study_db(self) -> str:
        return f"{self.local}/{STUDY_FILE}"

    @property
    def runs(self) -> str:
        return f"{self.path}/{RUNS_DIR}"

    def exists(self) -> bool:
        """Whether a search of this tool was started here."""
        return self.store.exists(SEARCH_INFO)


def experiment_for(space: Space) -> Experiment:
    return Experiment(expand_storage(space.experiment.storage_path), space.experiment.name)


def record_space(exp: Experiment, space: Space, overrides: list[str]) -> None:
    """Keep the space as given (and the overrides) inside the experiment, so `--resume` and
    the export read exactly what the search ran."""
    store = exp.store
    experiment_id = uuid.uuid4().hex
    claim_mirror(exp, experiment_id)
    store.write_text(SPACE_COPY, Path(space.source).read_text())
    info = {"space_file": str(space.source), "sha256": space.sha256, "overrides": overrides,
            EXPERIMENT_ID: experiment_id}
    store.write_text(SEARCH_INFO, json.dumps(info, indent=2) + "\n")


def recorded_space(exp: Experiment, extra: list[str] | None = None) -> tuple[Space, dict[str, Any]]:
    """The space an experiment ran, with its overrides (and `extra` ones), and its
    `search.json`."""
    store = exp.store
    if not store.exists(SEARCH_INFO):
        raise ConfigError(f"{exp.path}: not an experiment of this tool (no {SEARCH_INFO})")
    info = read_info(exp)
    if store.is_local:
        space_file = Path(store.fs_path(SPACE_COPY))
    else:
        space_file = local_mirror(exp.path) / SPACE_COPY
        space_file.write_text(store.read_text(SPACE_COPY))
    space = load_space(space_file, list(info["overrides"]) + list(extra or []))
    return space, info


def read_info(exp: Experiment) -> dict[str, Any]:
    """The experiment's `search.json`, checked: a damaged file is one line, not a traceback."""
    where = f"{exp.path}/{SEARCH_INFO}"
    try:
        info = json.loads(exp.store.read_text(SEARCH_INFO))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{where}: unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if not isinstance(info, dict) or not isinstance(info.get("overrides"), list):
        raise ConfigError(f"{where}: damaged (expected a JSON object with an 'overrides' list)")
    return info


def restore_study(exp: Experiment) -> None:
    """On a remote storage the study's SQLite file lives on this machine and a copy in the
    experiment; a machine without the local file (a new head), or whose local file belongs
    to another experiment of the same name, takes the copy."""
    if exp.store.is_local:
        return
    experiment_id = read_info(exp).get(EXPERIMENT_ID)
    if experiment_id:  # experiments started before identities were recorded keep their mirror
        claim_mirror(exp, experiment_id)
    if not os.path.exists(exp.study_db) and exp.store.exists(STUDY_FILE):
        exp.store.download(STUDY_FILE, exp.study_db)


def claim_mirror(exp: Experiment, experiment_id: str) -> None:
    """Make a remote experiment's local mirror belong to `experiment_id`. A mirror left by
    another experiment of the same name (one deleted and started again) is moved aside,
    never reused or deleted, so its study cannot leak into this one."""
    if exp.store.is_local:
        return
    mirror = local_mirror(exp.path)
    tag = mirror / EXPERIMENT_ID
    owner = tag.read_text().strip() if tag.is_file() else None
    if owner == experiment_id:
        return
    kept = [p.name for p in mirror.iterdir() if p.name not in (SPACE_COPY, EXPERIMENT_ID)]
    if owner is not None or kept:
        aside = mirror.with_name(f"{mirror.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
        mirror.rename(aside)
        logger.warning(
            "%s: the local mirror %s belonged to another experiment of that name; moved it to %s",
            exp.path, mirror, aside,
        )
        mirror.mkdir(parents=True)
    tag.write_text(experiment_id + "\n")


# Its trials --------------------------------------------------------------------------------------------
def read_results(path: str) -> ResultGrid:
    """Tune's results of the experiment at `path` (a folder or a URI), finished or still
    running, as the `ResultGrid` that `Tuner.fit()` returns."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    try:
        return ResultGrid(ExperimentAnalysis(path))
    except ValueError as err:  # Tune has not written its state yet
        reason = str(err).strip().splitlines()[0]
        raise ConfigError(f"{path}: no trial results yet ({reason})") from None


# A trial that ended without a usable score reports one last result with these keys: the
# run's `run_status` ("diverged": by the training loop, `trainable.loop.diverged_metrics`;
# "failed": by `search.run.run_trial` for an error no retry can change), `error` (one line)
# and the metric at its worst. Neither is retried, nor rerun by --resume.
RUN_STATUS, RUN_ERROR = "run_status", "error"
DIVERGED, FAILED = "diverged", "failed"


def worst_value(metric: str) -> float:
    """The worst value a metric can take: 0 for an accuracy, infinity for a loss."""
    return 0.0 if METRICS[metric] == "max" else math.inf


@dataclass
class TrialRow:
    """One trial: its sampled values, its score (`final`: the metric at the last epoch it
    ran, what ASHA compared and Optuna was told), the best value over its epochs (extra
    information only), the epochs it ran and its status: "done" (all epochs), "stopped
    early" (by the scheduler), "diverged" (non-finite loss), "failed" (an error no retry
    changes, e.g. the data), "error" (still failing after its retries), or "unfinished"
    (running, waiting, or cut off with its driver). `error`: the one-line reason of the last
    three. `audited`: ASHA would have stopped it at epoch `audited_at`, and the rung audit
    ran it to the end. `curve`: (epoch, metric) of every epoch it reported."""

    trial_id: str
    values: dict[str, Any]
    best: float | None
    epochs: int
    status: str
    final: float | None = None
    error: str | None = None
    audited: bool = False
    audited_at: int | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)


def summarise(
    results: ResultGrid | Iterable[Result], space: Space, audited: dict[str, int] | None = None
) -> list[TrialRow]:
    """One row per trial, the best first (by the score, the metric at the last epoch;
    trials without one last). `audited`: trial id -> rung epoch of the audited trials."""
    exp = space.experiment
    # Tune's trial states: a ResultGrid keeps them beside its Results (the pinned Ray's layout)
    analysis = getattr(results, "_experiment_analysis", None)
    ended = {t.trial_id for t in analysis.trials if t.status in ("TERMINATED", "ERROR")} if analysis else set()
    rows = [_row(r, space.searched_paths, exp.metric, exp.mode, space.train.run.epochs, ended) for r in results]
    for row in rows:
        if audited and row.trial_id in audited:
            row.audited, row.audited_at = True, audited[row.trial_id]
    sign = -1.0 if exp.mode == "max" else 1.0
    rows.sort(key=lambda t: (t.final is None, sign * (t.final or 0.0)))
    return rows


def _row(r: Result, paths: list[str], metric: str, mode: str, max_t: int, ended_ids: set[str]) -> TrialRow:
    m = r.metrics or {}
    config = r.config or {}
    best = final = None
    df = r.metrics_dataframe
    ended = None if r.error else m.get(RUN_STATUS)
    if ended in (DIVERGED, FAILED) and df is not None:
        # the last result only says how the trial ended; the epochs before it count
        df = df[df[RUN_STATUS].isna()] if RUN_STATUS in df else df.iloc[:-1]
    curve: list[tuple[int, float]] = []
    if df is not None and metric in df:
        col = df[metric].dropna()
        if len(col):
            best = float(col.max() if mode == "max" else col.min())
            final = float(col.iloc[-1])
        if "epoch" in df:
            curve = [(int(e), float(v)) for e, v in zip(df["epoch"], df[metric]) if v == v and e == e]
    epochs = int(m.get("epoch", 0) or 0)
    if ended in (DIVERGED, FAILED):
        status = str(ended)
        epochs = int(df["epoch"].max()) if df is not None and "epoch" in df and df["epoch"].notna().any() else 0
    elif r.error:
        status = "error"
    elif epochs >= max_t:
        status = "done"
    else:  # Tune marks a trial's last result `done` when it ended or the scheduler stopped it
        status = "stopped early" if m.get("done") or m.get("trial_id") in ended_ids else "unfinished"
    values = {p: config[p] for p in paths if p in config}
    error = error_line(r.error) if r.error else None
    if ended in (DIVERGED, FAILED):
        error = str(m.get(RUN_ERROR) or ended)
    return TrialRow(str(m.get("trial_id", "?")), values, best, epochs, status, final, error, curve=curve)


def finished(rows: list[TrialRow]) -> list[TrialRow]:
    """The trials that ran all their epochs, in the order of `rows`."""
    return [r for r in rows if r.status == "done" and r.final is not None]


def format_table(rows: list[TrialRow], space: Space) -> str:
    """The rows as a plain-text table: trial, searched values, score (the metric at the last
    epoch), best over epochs, epochs, status, and, when a trial diverged or failed, a last
    column with each one's one-line reason."""
    paths = list(space.searched_paths)
    m = space.experiment.metric
    head = ["trial", *paths, m, f"best {m}", "epochs", "status"]
    body = [[t.trial_id, *(_fmt(t.values.get(p)) for p in paths), _fmt(t.final), _fmt(t.best), str(t.epochs),
             t.status + (f" (audited: ASHA stopped it at epoch {t.audited_at})" if t.audited else "")]
            for t in rows]
    if any(t.error for t in rows):
        head.append("reason")
        for cells, t in zip(body, rows):
            cells.append(t.error or "")
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
