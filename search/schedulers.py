"""The trial schedulers of a search: FIFO, or ASHA with a rung audit.

The audit lets a fraction of the trials ASHA stops run to the end anyway; comparing their
scores at the rung where ASHA stopped them with their final scores (rank correlation per
rung, in the report) says how far the early stopping of this search can be trusted.
Audited trials are listed in `<experiment>/audit.json` (trial id -> the rung epoch at which
ASHA would have stopped them), with the number of stop decisions so far.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from search.experiment import RUN_STATUS, Experiment
from spaces import Space

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

__all__ = ["AUDIT_FILE", "AuditedASHA", "AuditLog", "make_scheduler", "read_audit"]

AUDIT_FILE = "audit.json"


def read_audit(exp: Experiment) -> dict[str, int]:
    """The audited trials of an experiment: trial id -> the rung epoch ASHA stopped it at."""
    return AuditLog(exp.path).load()[0]


class AuditLog:
    """`audit.json` of one experiment (picklable: Tune keeps the scheduler in its state)."""

    def __init__(self, experiment_path: str) -> None:
        self.path = experiment_path

    def load(self) -> tuple[dict[str, int], int]:
        store = Experiment.at(self.path).store
        if not store.exists(AUDIT_FILE):
            return {}, 0
        try:
            data = json.loads(store.read_text(AUDIT_FILE))
            return {str(k): int(v) for k, v in data["audited"].items()}, int(data["stop_decisions"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return {}, 0

    def save(self, audited: dict[str, int], stop_decisions: int) -> None:
        text = json.dumps({"audited": audited, "stop_decisions": stop_decisions}, indent=2) + "\n"
        Experiment.at(self.path).store.write_text(AUDIT_FILE, text, overwrite=True)


class AuditedASHA(ASHAScheduler):
    """ASHA that lets every k-th trial it would stop (a fraction `audit` of its stop
    decisions, the first one included) run to `max_t`. Audited trials no longer take part
    in the rungs, so the audit does not change which other trials ASHA stops."""

    def __init__(self, *, audit: float, log: AuditLog | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._audit = audit
        self._log = log
        self._audited: dict[str, int] | None = None  # read from the log on first use (after a restore too)
        self._stops = 0

    def _state(self) -> dict[str, int]:
        if self._audited is None:
            self._audited, self._stops = self._log.load() if self._log else ({}, 0)
        return self._audited

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        audited = self._state()
        epoch = result.get(self._time_attr)
        if trial.trial_id in audited:
            return TrialScheduler.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)
        if epoch is not None and epoch >= self._max_t:
            # its last epoch: the trial ends by itself, and its TorchTrainer shuts its workers
            # down and frees their resources, which a stop from here would leave to Ray Train's
            # clean-up of a killed run
            return TrialScheduler.CONTINUE
        ended = result.get(RUN_STATUS) is not None  # diverged or failed: nothing to audit
        if action != TrialScheduler.STOP or epoch is None or epoch >= self._max_t or ended:
            return action
        self._stops += 1
        if self._audit > 0 and len(audited) < math.ceil(self._audit * self._stops - 1e-9):
            audited[trial.trial_id] = int(epoch)
            self._num_stopped -= 1
            action = TrialScheduler.CONTINUE
        if self._log:
            self._log.save(audited, self._stops)
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        if trial.trial_id in self._state():
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)


def make_scheduler(space: Space, exp: Experiment | None = None) -> Any:
    """FIFO, or ASHA on the metric over epochs up to train.run.epochs, audited when
    `experiment.scheduler.audit` > 0 (the audit is recorded in `exp`)."""
    s = space.experiment.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    return AuditedASHA(
        audit=s.audit,
        log=AuditLog(exp.path) if exp is not None else None,
        time_attr="epoch",
        metric=space.experiment.metric,
        mode=space.experiment.mode,
        max_t=space.train.run.epochs,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )
