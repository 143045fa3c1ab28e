"""The search phase: Optuna's TPE proposes trick combinations from the space (the study and
its searcher, `search.experiment.study`), ASHA stops the poor trials early
(`search.phases.schedulers`), and every trial trains the config the space and the proposal
make together (`search.phases.trial`)."""

from __future__ import annotations

import os
from typing import Any

from search.experiment.audit import AuditLog
from search.experiment.folder import Experiment
from search.experiment.resume import CsvRows, JsonRows
from search.experiment.study import StudyBackup, make_searcher
from search.phases.console import TrialLines, ray_verbosity
from search.phases.hparams import hparams_callback
from search.phases.schedulers import make_scheduler
from search.phases.trial import run_trial, trial_trainable
from spaces import Space

__all__ = ["build_tuner"]


def build_tuner(
    space: Space, exp: Experiment, concurrent: int, resume: bool, callbacks: list[Any] | None = None
) -> Any:
    """The search phase's Tuner: TPE proposes (`make_searcher`), the scheduler stops early,
    every trial is `run_trial`; with `resume`, Tune's last snapshot restored."""
    from ray import tune

    trainable = trial_trainable(run_trial, space=space, runs_path=exp.runs)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # our own TensorBoard files, no copies
    if resume:
        return tune.Tuner.restore(exp.path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(space, exp.study_db, audit=AuditLog(exp.path).load),
            scheduler=make_scheduler(space, exp),
            num_samples=space.experiment.num_samples,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name=exp.name,
            storage_path=exp.storage,
            failure_config=tune.FailureConfig(max_failures=space.experiment.max_failures),
            verbose=ray_verbosity(callbacks),
            callbacks=[
                CsvRows(),  # Tune's own loggers, whose rows stay in the experiment across drivers
                JsonRows(),
                TrialLines(space),  # one line per ended trial on the console
                hparams_callback(space, exp),  # TensorBoard's HParams view
                *([] if exp.store.is_local else [StudyBackup(exp.study_db, exp.store)]),
                *(callbacks or []),
            ],
        ),
    )
