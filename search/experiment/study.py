"""The Optuna side of the search: a study in SQLite inside the experiment folder, a
searcher that tells Optuna the truth about trials the scheduler stopped early (and ignores
late news of trials the study has finished), and the study's backup on a remote storage."""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Collection
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from search.experiment.folder import STUDY_FILE
from search.experiment.ray_private import completed_trials, ot_study, ot_trials, reseed_sampler
from search.experiment.sampling import define_by_run, make_sampler
from spaces import Space
from trainable.status import DIVERGED, FAILED, RUN_ERROR, RUN_STATUS, worst_value
from trainable.storage import Storage

logger = logging.getLogger(__name__)

TUNE_TRIAL_ID = "tune_trial_id"
AUDITED = "audited_at_rung"  # user attr of a trial the rung audit ran to the end
PHASE = "phase"  # user attr of a study trial run outside the search (confirmation, ablation)
DUPLICATE_OF = "duplicate_of"  # user attr of a proposal identical to an earlier search trial (FAIL, not trained)
DUPLICATES = "duplicate_proposals"  # study user attr: how many proposals were duplicates
DUPLICATE_RETRIES = 16  # proposals of the study's sampler refused as duplicates before ...
RANDOM_RETRIES = 16  # ... a uniform random sampler proposes, for a config no trial has trained
_TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def _searched(t: optuna.trial.FrozenTrial) -> bool:
    """A trial of the search that Tune runs (not a duplicate proposal, not an orphan)."""
    return TUNE_TRIAL_ID in t.user_attrs and not t.user_attrs.get(ABANDONED)


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
    - a trial that ended with `run_status` "diverged" is COMPLETE with the metric's worst
      value and infeasible (TPE ranks it below every other trial); one that "failed" (a
      config or data error) is FAIL;
    - each Optuna trial carries the Tune trial id, so the study can be read beside Tune's;
    - news of a trial the study has already finished is ignored (a resumed driver repeats
      what Tune's snapshot missed), and a restored searcher takes the study's trials as
      they are (`restore`).
    """

    def __init__(
        self, *args: Any, time_attr: str = "epoch", max_t: int, audit: Callable[[], dict[str, int]] | None = None,
        seed: int | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if ot_study(self) is not None and kwargs.get("metric"):  # the objective's name in optuna-dashboard
            ot_study(self).set_metric_names([kwargs["metric"]])
        self._seed = seed
        self._time_attr = time_attr
        self._max_t = max_t
        self._audit = audit  # the rung audit's trials (`search.experiment.audit.AuditLog.load`)

    def suggest(self, trial_id: str) -> dict | None:
        """Optuna's proposal for the Tune trial `trial_id`.

        With a sampler seed, the sampler's random state is made from (seed, number of search
        trials so far, attempt) before each proposal, so a proposal depends only on the study
        (what a resumed driver reads back), not on the draws of an earlier driver.

        Duplicates: a proposal identical to a search trial that finished (COMPLETE or PRUNED),
        is running, or failed for its config or data (it would fail the same way), i.e. one
        that would train the same config again at the same budget, is not trained: it stays in the study as FAIL with user attr `duplicate_of` (the
        earlier trial's number; TPE ignores FAIL trials and already holds the earlier result),
        and the sampler proposes another, up to `DUPLICATE_RETRIES` times; then a uniform
        random sampler proposes, up to `RANDOM_RETRIES` times (TPE sure of its best keeps
        proposing it while configs no trial has seen remain); after that the duplicate is
        trained (the space is exhausted). The study user attr `duplicate_proposals` counts
        them."""
        study = ot_study(self)
        trials = ot_trials(self)
        if trial_id in trials:  # a restored proposal
            return super().suggest(trial_id)
        search = [t for t in study.get_trials(deepcopy=False) if _searched(t)]
        own = study.sampler
        try:
            for attempt in range(DUPLICATE_RETRIES + RANDOM_RETRIES + 1):
                if attempt == DUPLICATE_RETRIES:
                    study.sampler = optuna.samplers.RandomSampler()
                if getattr(self, "_seed", None) is not None:
                    reseed_sampler(study.sampler, zlib.crc32(f"{self._seed}:{len(search)}:{attempt}".encode()))
                config = super().suggest(trial_id)
                ot_trial = trials[trial_id]
                same = next((t for t in search if t.params == ot_trial.params
                             and (t.state in _TAKEN or t.user_attrs.get(RUN_STATUS) == FAILED)), None)
                if same is None or attempt == DUPLICATE_RETRIES + RANDOM_RETRIES:
                    break
                ot_trial.set_user_attr(DUPLICATE_OF, same.number)
                study.tell(ot_trial, state=TrialState.FAIL, skip_if_finished=True)
                del trials[trial_id]
                study.set_user_attr(DUPLICATES, int(study.user_attrs.get(DUPLICATES, 0)) + 1)
                logger.debug("proposal identical to trial %d (%s): not trained, another proposed",
                             same.number, same.user_attrs.get(TUNE_TRIAL_ID))
        finally:
            study.sampler = own
        if TUNE_TRIAL_ID not in ot_trial.user_attrs:
            ot_trial.set_user_attr(TUNE_TRIAL_ID, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in completed_trials(self) or trial_id not in ot_trials(self):
            return
        value, step = result.get(self.metric), result.get(self._time_attr)
        if value is None or step is None:
            return
        ot_trial = ot_trials(self)[trial_id]
        frozen = ot_trial.storage.get_trial(ot_trial._trial_id)
        if self._ended(trial_id, frozen):
            return
        if int(step) not in frozen.intermediate_values:
            ot_trial.report(float(value), int(step))

    def _ended(self, trial_id: str, frozen: optuna.trial.FrozenTrial | None = None) -> bool:
        """Whether the study already holds this trial's end (recorded before a driver was
        killed and Tune's snapshot could say so): then there is nothing left to tell."""
        if frozen is None:
            ot_trial = ot_trials(self)[trial_id]
            frozen = ot_trial.storage.get_trial(ot_trial._trial_id)
        if not frozen.state.is_finished():
            return False
        logger.debug("trial %s is already %s in the study; ignoring Tune's late news", trial_id, frozen.state.name)
        completed_trials(self).add(trial_id)
        return True

    def restore(self, checkpoint_path: str) -> None:
        """Tune's snapshot of this searcher, brought up to date with the study (written at
        once, so it may be ahead): every Tune trial id the study holds maps to its Optuna
        trial, and trials the study has finished count as completed."""
        super().restore(checkpoint_path)
        for t in ot_study(self).get_trials(deepcopy=False):
            tid = t.user_attrs.get(TUNE_TRIAL_ID)
            if tid is None:
                continue
            if t.state.is_finished():
                completed_trials(self).add(tid)
            elif tid not in ot_trials(self):
                ot_trials(self)[tid] = optuna.Trial(ot_study(self), t._trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in completed_trials(self) or trial_id not in ot_trials(self) or self._ended(trial_id):
            return
        ended = (result or {}).get(RUN_STATUS)
        if not error and ended in (DIVERGED, FAILED):  # its last result is no measurement
            ot_trial = ot_trials(self)[trial_id]
            ot_trial.set_user_attr(RUN_STATUS, ended)
            ot_trial.set_user_attr(RUN_ERROR, str(result.get(RUN_ERROR) or ended))  # type: ignore[union-attr]
            if ended == FAILED:  # an error of the config or data: it says nothing of the tricks
                ot_study(self).tell(ot_trial, state=TrialState.FAIL, skip_if_finished=True)
            else:
                # a result: the worst value, and infeasible, so TPE ranks it below every
                # complete and pruned trial (a bare worst COMPLETE would rank above the
                # pruned ones) and Optuna never names it the best
                ot_trial.set_constraint(DIVERGED, 1.0)
                ot_study(self).tell(
                    ot_trial, worst_value(self.metric), state=TrialState.COMPLETE, skip_if_finished=True
                )
            completed_trials(self).add(trial_id)
            return
        if result:  # Tune hands a trial's last result to on_trial_complete only
            self.on_trial_result(trial_id, result)
        epochs = (result or {}).get(self._time_attr)
        if not error and epochs is not None and int(epochs) < self._max_t:
            ot_study(self).tell(ot_trials(self)[trial_id], state=TrialState.PRUNED, skip_if_finished=True)
            completed_trials(self).add(trial_id)
            return
        audited = self._audit()[0] if self._audit is not None else {}
        if trial_id in audited:  # ran to the end only for the rung audit: it did finish
            ot_trials(self)[trial_id].set_user_attr(AUDITED, audited[trial_id])
        super().on_trial_complete(trial_id, result=result, error=error)


def make_searcher(space: Space, db_path: str, audit: Callable[[], Any] | None = None) -> StudySearch:
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
        audit=audit,
        seed=exp.sampler.seed,
    )


def load_study(db_path: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=study_url(db_path))


class StudyBackup(Callback):
    """Copies the study's SQLite file into a remote experiment (SQLite cannot live on object
    storage): after every finished trial, at most every `every_s` seconds while results
    arrive, and at the end. `--resume` on a machine without the local file starts from it."""

    def __init__(self, db_path: str, store: Storage, every_s: float = 60.0) -> None:
        self.db_path, self.store, self.every_s = db_path, store, every_s
        self._last: float | None = None

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
        if self._last is None or time.monotonic() - self._last > self.every_s:
            self.backup()

    def on_trial_complete(self, *args: Any, **kwargs: Any) -> None:
        self.backup()

    def on_trial_error(self, *args: Any, **kwargs: Any) -> None:
        self.backup()

    def on_experiment_end(self, *args: Any, **kwargs: Any) -> None:
        self.backup()


# Resume ------------------------------------------------------------------------------------------------
ABANDONED = "abandoned"  # user attr of a study trial Tune never recorded (marked FAIL on --resume)


def abandon_orphans(study: optuna.Study, known: Collection[str]) -> list[int]:
    """Trials Optuna handed out that Tune never recorded (the driver died between the two)
    stay RUNNING in the study; mark them FAIL (user attr `abandoned`), so the study holds
    each Tune trial once. `known`: the Tune trial ids Tune recorded. Returns their numbers."""
    numbers = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get(TUNE_TRIAL_ID) not in known:
            trial = optuna.Trial(study, t._trial_id)
            trial.set_user_attr(ABANDONED, True)
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            numbers.append(t.number)
    return numbers


def record_phase(db_path: str, name: str, phase: str, measured: list[Any], mode: str = "max",
                 metric: str | None = None) -> None:
    """Keep a phase's configs (`search.experiment.phases.Measured`) in the study file as their own
    study `<name>.<phase>`, one COMPLETE trial per config (its mean over seeds) with the
    per-seed values, apart from the search's study so the sampler never sees them."""
    study_name = f"{name}.{phase}"
    storage = study_storage(db_path)
    try:
        optuna.delete_study(study_name=study_name, storage=storage)
    except KeyError:
        pass
    study = optuna.create_study(study_name=study_name, storage=storage,
                                direction="maximize" if mode == "max" else "minimize")
    if metric:
        study.set_metric_names([f"mean {metric} over seeds"])
    for m in measured:
        if not m.values:
            continue
        attrs = {PHASE: phase, "label": m.entry.label, "seeds": m.seeds, "values": m.values,
                 "config": m.entry.values, "trick": m.entry.trick}
        study.add_trial(optuna.trial.create_trial(value=sum(m.values) / len(m.values), user_attrs=attrs))
