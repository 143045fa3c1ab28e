"""The trials of a Tune experiment as rows: one reader of Ray Tune's `ResultGrid`, the live
one `Tuner.fit()` returns or `read_results(path)` for an experiment on disk or object
storage, finished or running.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spaces import Space
from trainable.cluster import error_line
from trainable.config import ConfigError
from trainable.status import DIVERGED, FAILED, RUN_ERROR, RUN_STATUS

if TYPE_CHECKING:
    from ray.tune import ResultGrid
    from ray.tune.result import Result

logger = logging.getLogger(__name__)

__all__ = ["DONE", "TrialRow", "finished", "format_table", "read_results", "summarise"]

DONE = "done"
"""A trial's status when it ran all its epochs."""


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

    @property
    def finished(self) -> bool:
        """Ran all its epochs and has a score (audited trials included)."""
        return self.status == DONE and self.final is not None


def summarise(
    results: ResultGrid | Iterable[Result], space: Space, audited: dict[str, int] | None = None
) -> list[TrialRow]:
    """One row per trial, the best first (by the score, the metric at the last epoch;
    trials without one last). `audited`: trial id -> rung epoch of the audited trials."""
    from search.experiment.ray_private import experiment_analysis

    exp = space.experiment
    # Tune's trial states: a ResultGrid keeps them beside its Results (a private part of Ray)
    analysis = experiment_analysis(results)
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
        status = DONE
    else:  # Tune marks a trial's last result `done` when it ended or the scheduler stopped it
        status = "stopped early" if m.get("done") or m.get("trial_id") in ended_ids else "unfinished"
    values = {p: config[p] for p in paths if p in config}
    error = error_line(r.error) if r.error else None
    if ended in (DIVERGED, FAILED):
        error = str(m.get(RUN_ERROR) or ended)
    return TrialRow(str(m.get("trial_id", "?")), values, best, epochs, status, final, error, curve=curve)


def finished(rows: list[TrialRow]) -> list[TrialRow]:
    """The trials that ran all their epochs, in the order of `rows`."""
    return [r for r in rows if r.finished]


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
