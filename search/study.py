"""The Optuna side of the search: a study in SQLite inside the experiment folder, and a
searcher that tells Optuna the truth about trials the scheduler stopped early."""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import time
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from search.experiment import STUDY_FILE
from search.sampling import define_by_run, make_sampler
from spaces import Space
from trainable.storage import Storage

logger = logging.getLogger(__name__)

TUNE_TRIAL_ID = "tune_trial_id"


def study_url(db_path: str) -> str:
    return f"sqlite:///{os.path.abspath(db_path)}"


def study_storage(db_path: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(study_url(db_path), engine_kwargs={"connect_args": {"timeout": 30}})


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch with three differences:

    - intermediate values are reported at the trial's `epoch`, not Tune's iteration;
    - a trial that ends without error before `max_t` epochs was stopped by the scheduler,
      and reaches Optuna as PRUNED (the stock searcher records it as COMPLETE with its
      truncated accuracy, which TPE then takes for a finished result);
    - each Optuna trial carries the Tune trial id, so the study can be read beside Tune's.
    """

    def __init__(self, *args: Any, time_attr: str = "epoch", max_t: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._time_attr = time_attr
        self._max_t = max_t

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials[trial_id]
        if TUNE_TRIAL_ID not in ot_trial.user_attrs:
            ot_trial.set_user_attr(TUNE_TRIAL_ID, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value, step = result.get(self.metric), result.get(self._time_attr)
        if value is None or step is None:
            return
        ot_trial = self._ot_trials[trial_id]
        if int(step) not in ot_trial.storage.get_trial(ot_trial._trial_id).intermediate_values:
            ot_trial.report(float(value), int(step))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if result:  # Tune hands a trial's last result to on_trial_complete only
            self.on_trial_result(trial_id, result)
        epochs = (result or {}).get(self._time_attr)
        if not error and epochs is not None and int(epochs) < self._max_t:
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)

    def abandon_orphans(self) -> int:
        """After a driver was killed, trials Optuna handed out but Tune never recorded stay
        RUNNING in the database; mark them FAIL so the study counts each trial once."""
        known = {t._trial_id for t in self._ot_trials.values()}
        n = 0
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t._trial_id not in known:
                self._ot_study.tell(t.number, state=TrialState.FAIL)
                n += 1
        return n


def make_searcher(space: Space, db_path: str) -> StudySearch:
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    exp = space.experiment
    return StudySearch(
        space=define_by_run(space),
        metric=exp.metric,
        mode=exp.mode,
        sampler=make_sampler(space),
        study_name=exp.name,
        storage=study_storage(db_path),
        max_t=space.train.run.epochs,
    )


def load_study(db_path: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=study_url(db_path))


class StudyBackup(Callback):
    """Copies the study's SQLite file into a remote experiment (SQLite cannot live on object
    storage): after every finished trial, at most every `every_s` seconds while results
    arrive, and at the end. `--resume` on a machine without the local file starts from it."""

    def __init__(self, db_path: str, store: Storage, every_s: float = 60.0) -> None:
        self.db_path, self.store, self.every_s = db_path, store, every_s
        self._last = 0.0

    def backup(self) -> None:
        if not os.path.exists(self.db_path):
            return
        with tempfile.TemporaryDirectory() as d:
            copy = os.path.join(d, STUDY_FILE)
            src, dst = sqlite3.connect(self.db_path), sqlite3.connect(copy)
            try:
                src.backup(dst)  # a consistent snapshot while the study is being written
            finally:
                dst.close()
                src.close()
            self.store.upload(copy, STUDY_FILE)
        self._last = time.monotonic()

    def on_trial_result(self, *args: Any, **kwargs: Any) -> None:
        if time.monotonic() - self._last > self.every_s:
            self.backup()

    def on_trial_complete(self, *args: Any, **kwargs: Any) -> None:
        self.backup()

    def on_trial_error(self, *args: Any, **kwargs: Any) -> None:
        self.backup()

    def on_experiment_end(self, *args: Any, **kwargs: Any) -> None:
        self.backup()
