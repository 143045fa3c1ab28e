"""`--resume` after a driver was killed at any moment: the study and Tune's state brought
to one story before Tune restores, and every trial's result rows kept in the experiment as
they are written, whichever driver (and Ray instance) writes the next ones."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import optuna
import pyarrow.fs
from optuna.trial import TrialState
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.result import EXPR_PROGRESS_FILE, EXPR_RESULT_FILE

from search.experiment.audit import SchedulerState, read_scheduler_state
from search.experiment.ray_private import KeptLoggerFile, fix_search_generator, ot_study, ot_trials, trial_from_json
from search.experiment.study import (
    TUNE_TRIAL_ID,
    StudyBackup,
    StudySearch,
    abandon_orphans,
    load_study,
    make_searcher,
)
from spaces import Space
from trainable.storage import Storage

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

    from search.experiment.folder import Experiment

__all__ = ["CsvRows", "JsonRows", "Reconciliation", "drop_staged_rows", "reconcile"]

logger = logging.getLogger(__name__)

_TUNE_DONE = ("TERMINATED", "ERROR")


# Result rows -------------------------------------------------------------------------------------------
class _KeptRows(KeptLoggerFile):
    """A Tune logger whose file lives in the experiment as it is written. Tune writes a
    trial's files on the driver and copies them to the experiment every ~10 s, and takes
    them back only for a trial resumed from a Tune checkpoint (ours checkpoint their
    training, not Tune): a driver killed and started again in a new Ray instance would start
    the file afresh, and its next copy would replace the rows of the earlier drivers."""

    def _keep(self, trial: Trial, file_name: str) -> None:
        """Copy the driver's file into the experiment (whole: a kill leaves the last copy)."""
        fs, remote = trial.storage.storage_filesystem, f"{trial.storage.trial_fs_path}/{file_name}"
        _write_bytes(fs, remote, Path(trial.local_path, file_name).read_bytes())


class JsonRows(_KeptRows, JsonLoggerCallback):
    """Tune's result.json of every trial, kept in the experiment after every row."""

    def log_trial_result(self, iteration: int, trial: Trial, result: dict) -> None:
        super().log_trial_result(iteration, trial, result)
        self._keep(trial, EXPR_RESULT_FILE)


class CsvRows(_KeptRows, CSVLoggerCallback):
    """Tune's progress.csv of every trial, kept in the experiment after every row."""

    def log_trial_result(self, iteration: int, trial: Trial, result: dict) -> None:
        super().log_trial_result(iteration, trial, result)
        self._keep(trial, EXPR_PROGRESS_FILE)


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _write_bytes(fs: pyarrow.fs.FileSystem, path: str, data: bytes) -> None:
    """All or nothing: a local file through a temporary one and a rename, a remote one in
    one upload."""
    if not isinstance(fs, pyarrow.fs.LocalFileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# Reconciliation ----------------------------------------------------------------------------------------
@dataclass
class Reconciliation:
    """What `reconcile` did: whether Tune saved any state to restore; the study trials
    marked FAIL as orphans (numbers); and as Tune trial ids, the trials given a result
    recovered from their training's checkpoint, those finished in Tune, and those whose end
    was told to the study."""

    tune_state: bool
    abandoned: list[int] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    told: list[str] = field(default_factory=list)


def reconcile(exp: Experiment, space: Space, scheduler: Any | None = None) -> Reconciliation:
    """Make the study and Tune's last snapshot agree before `--resume` restores Tune.

    The study is written as trials start, report and end; Tune's experiment state only every
    ~10 s, and a result travels from a trial's training to Tune after its checkpoint is
    saved. A driver killed in between leaves them apart; this settles it one way:

    - a trial the study holds but Tune never recorded is FAIL in the study (an orphan; Tune
      proposes another in its place);
    - a trial the study finished (COMPLETE or PRUNED) that Tune counts as unfinished is
      finished in Tune as the study recorded it, with its last result row (`JsonRows` keeps
      them in the experiment as they come) as its last result: it is not rerun, and the
      study keeps its verdict;
    - a result whose checkpoint the training saved but which never reached Tune (nor the
      study) is logged as the trial's next row and reported to the study, from Ray Train's
      record of that checkpoint (the resumed training starts after it);
    - a trial unfinished in both whose training already ran all its epochs is finished in
      both with its last row (the resumed training would report nothing more), the study
      told as the searcher would have;
    - a trial Tune finished whose end never reached the study is told now;
    - a trial the scheduler had stopped (its decision is in `scheduler/audit.json`, written before Tune
      acts on it) is finished in both at the epoch it was stopped at, never trained further;
      a result recovered from a training checkpoint is first decided by `scheduler` (the
      search's, reading the same `scheduler/audit.json`), as Tune would have had it arrived.

    A trial the study marked FAIL is retried like any errored trial (`--resume` retries
    those), and the study keeps its FAIL. Tune's corrected state is written as a new
    snapshot beside its last one, which Tune then restores from; nothing is replaced. Safe
    to repeat: a second run finds nothing to do."""
    snap = _TuneSnapshot.load(exp.store)
    out = Reconciliation(tune_state=snap is not None)
    if not os.path.exists(exp.study_db):
        return out
    try:
        study = load_study(exp.study_db, space.experiment.name)
    except KeyError:  # the driver died before the searcher created the study
        return out
    trials = snap.trials if snap else {}
    drop_staged_rows(exp.store, snap)
    decided: SchedulerState = read_scheduler_state(exp)
    out.abandoned = abandon_orphans(study, set(trials))
    by_tid = {t.user_attrs[TUNE_TRIAL_ID]: t for t in study.get_trials(deepcopy=False) if TUNE_TRIAL_ID in t.user_attrs}
    searcher: StudySearch | None = None
    max_t = space.train.run.epochs

    def searcher_for(tid: str, ot: optuna.trial.FrozenTrial) -> StudySearch:
        nonlocal searcher
        searcher = searcher or make_searcher(space, exp.study_db)
        if tid not in ot_trials(searcher):
            ot_trials(searcher)[tid] = optuna.Trial(ot_study(searcher), ot._trial_id)
        return searcher

    def tell(tid: str, ot: optuna.trial.FrozenTrial, result: dict[str, Any], error: bool) -> None:
        searcher_for(tid, ot).on_trial_complete(tid, result=result, error=error)
        out.told.append(tid)

    for tid, trial in trials.items():
        ot = by_tid.get(tid)
        if ot is None:
            continue
        if trial.status in _TUNE_DONE:
            if ot.state == TrialState.RUNNING:
                tell(tid, ot, dict(trial.last_result), trial.status == "ERROR")
            continue
        assert snap is not None
        rows = snap.result_rows(trial)
        if ot.state in (TrialState.COMPLETE, TrialState.PRUNED):
            snap.close(trial, rows[-1] if rows else None)
            out.closed.append(tid)
            continue
        if ot.state != TrialState.RUNNING:
            continue
        stop = decided.stopped_at(tid)
        saved = _saved_metrics(exp, tid)
        if (
            saved is not None and int(saved.get("epoch", 0)) > int(rows[-1].get("epoch", 0) if rows else 0)
            and (stop is None or int(saved.get("epoch", 0)) <= stop)
        ):
            # the scheduler decides first (it repeats a decision it took before a kill), then
            # the study is told, and the row is written last: a kill in between leaves the
            # result to recover again, never a row whose decision or report is missing
            row = snap.next_row(trial, rows, saved, done=int(saved.get("epoch", 0)) >= max_t)
            if int(saved.get("epoch", 0)) < max_t:
                if scheduler is not None:
                    scheduler.on_trial_result(None, SimpleNamespace(trial_id=tid), row)
                    stop = read_scheduler_state(exp).stopped_at(tid)
                searcher_for(tid, ot).on_trial_result(tid, row)
            snap.write_row(trial, row)
            rows.append(row)
            out.recovered.append(tid)
        at_stop = [r for r in rows if stop is not None and int(r.get("epoch", 0)) == stop]
        if at_stop:  # stopped by the scheduler before the kill: it ends there
            snap.close(trial, at_stop[-1])
            out.closed.append(tid)
            tell(tid, ot, at_stop[-1], False)
            continue
        if rows and int(rows[-1].get("epoch", 0)) >= max_t:  # trained to the end: nothing more will come
            snap.close(trial, rows[-1])
            out.closed.append(tid)
            tell(tid, ot, rows[-1], False)
    if snap is not None:
        snap.save(out.closed)
    if (out.abandoned or out.told) and not exp.store.is_local:
        StudyBackup(exp.study_db, exp.store).backup()
    if out.abandoned or out.recovered or out.closed or out.told:
        logger.info(
            "resume: %d orphan trial(s) marked FAIL in the study; %d result(s) recovered from training "
            "checkpoints; %d trial(s) finished in Tune as recorded elsewhere; %d trial end(s) told to the study",
            len(out.abandoned), len(out.recovered), len(out.closed), len(out.told),
        )
    return out


def drop_staged_rows(store: Storage, snap: _TuneSnapshot | None = None) -> None:
    """Before Tune restores the Tune experiment in `store` (the search's, or a phase's):
    `_drop_staged_rows` for each trial of its last snapshot (`snap`, read when None)."""
    snap = snap if snap is not None else _TuneSnapshot.load(store)
    for trial in (snap.trials if snap else {}).values():
        _drop_staged_rows(trial)


def _drop_staged_rows(trial: Trial) -> None:
    """Remove the trial's result files from the driver's staging folder, where a driver
    killed earlier on the same Ray instance left them (a trial keeps the staging folder of
    the driver that started it): Tune syncs that folder into the experiment, over the rows
    kept there (`JsonRows`, `CsvRows`, and the rows recovered here). A trial that trains
    again takes the experiment's rows back (`KeptLoggerFile`)."""
    try:
        local = Path(trial.local_path)
        remote = Path(trial.storage.trial_fs_path) if trial.storage.storage_filesystem.type_name == "local" else None
    except Exception:  # no staging folder here (another Ray instance): nothing stale
        return
    for name in (EXPR_RESULT_FILE, EXPR_PROGRESS_FILE):
        staged = local / name
        if staged.exists() and not (remote is not None and (remote / name).exists() and staged.samefile(remote / name)):
            staged.unlink()


def _saved_metrics(exp: Experiment, tid: str) -> dict[str, Any] | None:
    """The metrics of the search trial's training run's last checkpoint, or None."""
    from search.experiment.folder import RUNS_DIR, TRIAL_NAME_PREFIX

    return run_record_metrics(exp.store, f"{RUNS_DIR}/{TRIAL_NAME_PREFIX}{tid}")


def run_record_metrics(store: Storage, run: str) -> dict[str, Any] | None:
    """The metrics of the last checkpoint of the training run in the folder `run` of `store`
    (Ray Train's own record there, written before the result goes on to Tune), or None."""
    try:
        metrics = json.loads(store.read_text(f"{run}/checkpoint_manager_snapshot.json"))
        metrics = metrics["latest_checkpoint_result"]["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return metrics if isinstance(metrics, dict) and "epoch" in metrics else None


def next_session(now: str, newest: str) -> str:
    """A Tune session name for a new snapshot that sorts after `newest` (Tune restores the
    greatest name), whatever the clock says: `now` when it is later, else `newest` with a
    counter (`<newest>_r001`, `_r002`, ...), so no snapshot ever replaces another."""
    if now > newest:
        return now
    base, _, count = newest.partition("_r")
    number = int(count) + 1 if count.isdigit() else 1
    return f"{base if count.isdigit() else newest}_r{number:03d}"


class _TuneSnapshot:
    """Tune's newest experiment state in an experiment folder (its trials) and the search
    generator's state saved beside it."""

    def __init__(self, store: Storage, name: str, state: dict[str, Any], trials: dict[str, Trial]) -> None:
        self.store, self.name, self.state, self.trials = store, name, state, trials

    @staticmethod
    def _newest(store: Storage, template: str) -> str | None:
        selector = pyarrow.fs.FileSelector(store.fs_path(), allow_not_found=True)
        names = [i.base_name for i in store.fs.get_file_info(selector)]
        matching = sorted(fnmatch.filter(names, template.format("*")))  # Tune's session names sort by time
        return matching[-1] if matching else None

    @classmethod
    def load(cls, store: Storage) -> _TuneSnapshot | None:
        from ray.tune.execution.tune_controller import TuneController

        # the snapshot Tune restores: the greatest name (not the newest file: a resumed Tune
        # copies every earlier snapshot back into the experiment as it syncs its own)
        name = cls._newest(store, TuneController.CKPT_FILE_TMPL)
        if name is None:
            return None
        state = json.loads(store.read_text(name))
        trials = {}
        for trial_json, metadata_json in state["trial_data"]:
            trial = trial_from_json(trial_json, metadata_json)
            trials[trial.trial_id] = trial
        return cls(store, name, state, trials)

    def _lines(self, trial: Trial) -> list[str]:
        rel = f"{trial.storage.trial_dir_name}/{EXPR_RESULT_FILE}"
        lines = self.store.read_text(rel).splitlines() if self.store.exists(rel) else []
        return [line for line in lines if _parses(line)]  # a torn last line is skipped

    def result_rows(self, trial: Trial) -> list[dict[str, Any]]:
        """The trial's result rows as Tune logged them."""
        return [json.loads(line) for line in self._lines(trial)]

    def close(self, trial: Trial, last: dict[str, Any] | None) -> None:
        """Finish the trial in this state, with `last` as its last result."""
        if last is not None:
            trial.update_last_result({"config": trial.config, **last, "done": True})
        trial.set_status("TERMINATED")

    @staticmethod
    def next_row(trial: Trial, rows: list[dict[str, Any]], metrics: dict[str, Any], done: bool) -> dict[str, Any]:
        """The row a result that never reached Tune takes after `rows`."""
        it = int(rows[-1].get("training_iteration", len(rows))) if rows else 0
        return {**metrics, "trial_id": trial.trial_id, "training_iteration": it + 1, "done": done, "config": trial.config}

    def write_row(self, trial: Trial, row: dict[str, Any]) -> None:
        """Log `row` as the trial's next row."""
        text = "".join(line + "\n" for line in [*self._lines(trial), json.dumps(row)])
        rel = f"{trial.storage.trial_dir_name}/{EXPR_RESULT_FILE}"
        _write_bytes(self.store.fs, self.store.fs_path(rel), text.encode())

    def save(self, closed: list[str]) -> None:
        """Write the state with the `closed` trials finished, and the search generator's
        state made to agree with it (its trial count, and the concurrency limiter's live
        trials: exactly Tune's unfinished ones), as a new snapshot named like a Tune session."""
        from ray import cloudpickle
        from ray.tune.execution.tune_controller import TuneController
        from ray.tune.search.search_generator import SearchGenerator

        exp_template, gen_template = TuneController.CKPT_FILE_TMPL, SearchGenerator.CKPT_FILE_TMPL
        head, tail = exp_template.split("{}")
        newest = self._newest(self.store, exp_template)
        session = next_session(datetime.now().strftime("%Y-%m-%d_%H-%M-%S"), newest[len(head) : -len(tail)] if newest else "")
        gen_name = self._newest(self.store, gen_template)
        gen_changed = False
        if gen_name is not None:
            gen = cloudpickle.loads(self._read_bytes(gen_name))
            live = {tid for tid, t in self.trials.items() if t.status not in _TUNE_DONE}
            gen_changed = fix_search_generator(gen, live, len(self.trials))
        if not closed and not gen_changed and newest == self.name:
            return
        if gen_name is not None:  # first: Tune only looks for it once the new state exists
            _write_bytes(self.store.fs, self.store.fs_path(gen_template.format(session)), cloudpickle.dumps(gen))
        data = []
        for t, m in self.state["trial_data"]:
            tid = json.loads(t)["trial_id"]
            data.append(list(self.trials[tid].get_json_state()) if tid in closed else [t, m])
        text = json.dumps({**self.state, "trial_data": data})
        _write_bytes(self.store.fs, self.store.fs_path(exp_template.format(session)), text.encode())

    def _read_bytes(self, rel: str) -> bytes:
        with self.store.fs.open_input_stream(self.store.fs_path(rel)) as f:
            return f.read()
