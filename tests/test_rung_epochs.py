"""Rung epochs are the epochs at which Ray's ASHA compares trials, for whole and fractional
reduction factors, and the rung schedule anneals the LR to its floor exactly there."""

from __future__ import annotations

import math

import pytest
from ray.tune.schedulers.async_hyperband import _Bracket

from spaces import QUICKSTART, load_space
from spaces.space import SchedulerSettings
from trainable.optim import lr_factor

PAIRS = [(1, 2.0, 4), (1, 3.0, 9), (2, 2.5, 20), (2, 2.5, 13), (1, 1.5, 10), (3, 3.0, 30), (2, 1.3, 12),
         (1, 4.0, 64), (1, 2.0, 8), (2, 2.0, 16), (1, 1.1, 6)]


def ray_compares(grace: int, factor: float, max_t: int) -> list[int]:
    """The epochs below max_t at which Ray's ASHA bracket records (and so compares) a trial
    that reports every epoch."""

    class Trial:
        trial_id = "t"

    bracket = _Bracket(grace, max_t, factor, 0)
    out = []
    for epoch in range(1, max_t):
        before = sum(len(recorded) for _, recorded in bracket._rungs)
        bracket.on_result(Trial, epoch, 0.5)
        if sum(len(recorded) for _, recorded in bracket._rungs) > before:
            out.append(epoch)
    return out


@pytest.mark.parametrize(("grace", "factor", "max_t"), PAIRS)
def test_rung_epochs_are_the_epochs_ray_compares_at(grace, factor, max_t):
    rungs = SchedulerSettings(grace_period=grace, reduction_factor=factor).rungs(max_t)
    assert rungs == ray_compares(grace, factor, max_t)


def test_a_fractional_milestone_is_compared_at_its_ceiling():
    assert SchedulerSettings(grace_period=2, reduction_factor=2.5).rungs(20) == [2, 5, 13]  # 12.5 -> 13


def test_the_rung_schedule_anneals_at_the_epochs_ray_compares_at():
    space = load_space(QUICKSTART, ["experiment.scheduler.grace_period=2", "experiment.scheduler.reduction_factor=2.5",
                                    "train.run.epochs=20", "train.schedule.warmup_epochs=0.5"])
    assert space.rung_epochs() == ray_compares(2, 2.5, 20) == [2, 5, 13]
    cfg = space.trial_config({})
    assert cfg.schedule.restarts == [2, 5, 13]
    per_epoch, total = 10, 20 * 10
    for rung in space.rung_epochs():  # the floor at the rung's last update, re-warming after it
        at = lr_factor(rung * per_epoch, total, 5, cfg.schedule, per_epoch)
        assert math.isclose(at, cfg.schedule.min_lr_factor, abs_tol=1e-12)
        assert lr_factor(rung * per_epoch + 1, total, 5, cfg.schedule, per_epoch) > at
        assert lr_factor(rung * per_epoch - 1, total, 5, cfg.schedule, per_epoch) > at
