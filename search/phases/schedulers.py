"""The trial schedulers of a search: FIFO, or ASHA with a rung audit.

The audit lets a fraction of the trials ASHA stops run to the end anyway; comparing their
scores at the rung where ASHA stopped them with their final scores (rank correlation per
rung, in the report) says how far the early stopping of this search can be trusted.
Audited trials are listed in `<experiment>/scheduler/audit.json` (`search.experiment.audit`).
"""

from __future__ import annotations

import math
import random
import zlib
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from search.experiment.audit import AuditLog, SchedulerState
from search.experiment.ray_private import (asha_bracket_for, asha_forget, asha_knows, asha_rungs, asha_stopped,
                                          save_tune_state)
from search.experiment.folder import Experiment
from trainable.status import RUN_STATUS
from spaces import Space

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

__all__ = ["AuditedASHA", "RecordedFIFO", "audit_pick", "audit_seed", "make_scheduler", "record_trial"]

def record_trial(tune_controller: Any, trial: Trial) -> None:
    """Tune writes its experiment state only every ~10 s: a driver killed in between loses
    the trials it started since and the ends of those that ended, and `--resume` would
    mark the lost ones orphans, propose others and train them in another order. At every
    result, before the scheduler decides and the study records it, the trial (running) and
    every trial that ended before it are written into the experiment's state. Not during
    the reconciliation's replay (no controller)."""
    if tune_controller is not None:
        save_tune_state(tune_controller, trial)


class RecordedFIFO(FIFOScheduler):
    """FIFO whose trials are in Tune's saved state at every result (`record_trial`)."""

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        record_trial(tune_controller, trial)
        return super().on_trial_result(tune_controller, trial, result)


class AuditedASHA(ASHAScheduler):
    """ASHA that lets a fraction `audit` of the trials it would stop run to `max_t`, and
    that remembers what it decided across drivers.

    The audited stops are drawn at random, seeded by the experiment (`audit_pick`): the stop
    decisions are cut into consecutive strata of 1/audit decisions and one decision of each
    stratum, at a seeded random place, is audited; which decision is audited depends only on
    the seed and its rank among the stop decisions, so a resumed search audits the same ones.
    Audited trials no longer take part in the rungs, so the audit does not change which other
    trials ASHA stops.

    Every rung record and every decision taken at a rung is written to `scheduler/audit.json`
    (`search.experiment.audit`) before Tune acts on it; a restarted scheduler reads it back
    on first use, and a decision already taken for a trial's epoch (or a stop at an earlier
    epoch) is repeated, never taken again."""

    def __init__(self, *, audit: float, log: AuditLog | None, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._audit = audit
        self._log = log
        self._seed = seed
        self._memory: SchedulerState | None = None  # read from the log on first use (after a restore too)

    def _state(self) -> SchedulerState:
        if self._memory is None:
            self._memory = self._log.load_state() if self._log else SchedulerState()
            for milestone, recorded in asha_rungs(self):
                recorded.update(self._memory.rungs.get(_milestone_key(milestone), {}))
            asha_stopped(self, self._memory.num_stopped - asha_stopped(self))
        return self._memory

    def _save(self) -> None:
        state = self._state()
        state.rungs = {_milestone_key(m): dict(r) for m, r in asha_rungs(self) if r}
        state.num_stopped = asha_stopped(self)
        if self._log:
            self._log.save_state(state)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        record_trial(tune_controller, trial)
        state = self._state()
        tid, epoch = trial.trial_id, result.get(self._time_attr)
        if tid in state.audited:
            return TrialScheduler.CONTINUE
        if epoch is None or self._metric not in result:
            return TrialScheduler.CONTINUE
        earlier = state.decisions.get(tid, {})
        if str(int(epoch)) in earlier:  # decided before a restart: the same decision
            return earlier[str(int(epoch))]
        stopped = state.stopped_at(tid)
        if stopped is not None and stopped < epoch:  # a stop whose trial a restart ran on
            return TrialScheduler.STOP
        asha_bracket_for(self, tid)
        before = sum(len(r) for _, r in asha_rungs(self))
        action = super().on_trial_result(tune_controller, trial, result)
        if epoch >= self._max_t:
            # its last epoch: the trial ends by itself, and its TorchTrainer shuts its workers
            # down and frees their resources, which a stop from here would leave to Ray Train's
            # clean-up of a killed run
            return TrialScheduler.CONTINUE
        recorded = sum(len(r) for _, r in asha_rungs(self)) != before
        ended = result.get(RUN_STATUS) is not None  # diverged or failed: nothing to audit
        if action == TrialScheduler.STOP and not ended:
            state.stop_decisions += 1
            if self._audit > 0 and audit_pick(state.stop_decisions - 1, self._audit, self._seed):
                state.audited[tid] = int(epoch)
                asha_stopped(self, -1)
                action = TrialScheduler.CONTINUE
        if recorded or action == TrialScheduler.STOP or tid in state.audited:
            state.decisions.setdefault(tid, {})[str(int(epoch))] = action
            self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        state = self._state()
        if trial.trial_id in state.audited or not asha_knows(self, trial.trial_id):
            asha_forget(self, trial.trial_id)
            return
        before = sum(len(r) for _, r in asha_rungs(self))
        super().on_trial_complete(tune_controller, trial, result)
        if sum(len(r) for _, r in asha_rungs(self)) != before:
            self._save()

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        asha_forget(self, trial.trial_id)


def _milestone_key(milestone: float) -> str:
    return repr(float(milestone))


def audit_pick(stop: int, audit: float, seed: int) -> bool:
    """Whether the stop decision of rank `stop` (0-based) is audited: stop decisions fall in
    strata [ceil(j / audit), ceil((j + 1) / audit)), j = 0, 1, ..., and one decision of each
    stratum, at a place drawn from a generator seeded by (`seed`, j), is audited. A fraction
    `audit` of the stops is audited, each stop of a stratum with the same probability."""
    if audit <= 0:
        return False
    j = math.floor(stop * audit + 1e-9)
    lo = math.ceil(j / audit - 1e-9)
    hi = max(lo + 1, math.ceil((j + 1) / audit - 1e-9))
    return stop == lo + random.Random(f"{seed}:{j}").randrange(hi - lo)


def audit_seed(space: Space) -> int:
    """The rung audit's seed: one per experiment (its name and the sampler's seed)."""
    return zlib.crc32(f"{space.experiment.name}:{space.experiment.sampler.seed}".encode())


def make_scheduler(space: Space, exp: Experiment | None = None) -> Any:
    """FIFO, or ASHA on the metric over epochs up to train.run.epochs, audited when
    `experiment.scheduler.audit` > 0 (the audit is recorded in `exp`)."""
    s = space.experiment.scheduler
    if s.kind == "fifo":
        return RecordedFIFO()
    return AuditedASHA(
        audit=s.audit,
        log=AuditLog(exp.path) if exp is not None else None,
        seed=audit_seed(space),
        time_attr="epoch",
        metric=space.experiment.metric,
        mode=space.experiment.mode,
        max_t=space.train.run.epochs,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )
