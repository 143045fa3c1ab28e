"""The rung schedule trains what production trains: every cosine keeps the configured
warmup; a warmup longer than one of its cosines, or a `step` schedule, is refused with one
line; the warmup warning is right for both schedules."""

from __future__ import annotations

import pytest

from spaces import QUICKSTART, SpaceError, load_space
from trainable.optim import lr_factor

UPE = 10  # optimizer updates per epoch


def test_every_cosine_of_the_rung_schedule_keeps_the_configured_warmup():
    # grace 2, factor 2, 8 epochs: cosines 0-2, 2-4, 4-8; a 1.5-epoch warmup fits the shortest
    space = load_space(QUICKSTART, ["train.run.epochs=8", "train.schedule.warmup_epochs=1.5"])
    cfg = space.trial_config({})
    assert cfg.schedule.restarts == [2, 4]
    warm, total = round(1.5 * UPE), 8 * UPE
    f = [lr_factor(u, total, warm, cfg.schedule, UPE) for u in range(total + 1)]
    floor = cfg.schedule.min_lr_factor
    assert f[0] == pytest.approx(cfg.schedule.warmup_start_factor)
    for start in (0, 20, 40):  # each cosine reaches the peak exactly after the whole warmup (15 updates)
        assert all(a < b for a, b in zip(f[start: start + warm], f[start + 1: start + warm + 1]))
        assert f[start + warm] == pytest.approx(1.0) and f[start + warm - 1] < 1.0
    for rung in (20, 40, 80):  # and still anneals to its floor at the rung
        assert f[rung] == pytest.approx(floor)


def test_a_warmup_longer_than_a_cosine_of_the_rung_schedule_is_refused_with_the_numbers():
    with pytest.raises(SpaceError) as err:
        load_space(QUICKSTART, ["train.schedule.warmup_epochs=2.5"])
    message = str(err.value)
    assert "train.schedule.warmup_epochs: 2.5 is longer than the rung schedule's cosine from epoch 0 to 2" in message
    assert "rungs [2], train.run.epochs 4" in message and "at most 2" in message and "\n" not in message
    with pytest.raises(SpaceError, match="2.5 is longer"):  # a searched warmup: its largest value
        load_space(QUICKSTART, ["search.schedule.warmup_epochs={uniform: [0.5, 2.5]}"])
    load_space(QUICKSTART, ["train.schedule.warmup_epochs=2.5", "experiment.scheduler.schedule=plain"])
    load_space(QUICKSTART, ["train.schedule.warmup_epochs=2.5", "experiment.scheduler={kind: fifo}"])


def test_a_step_schedule_with_the_rung_schedule_is_refused():
    with pytest.raises(SpaceError) as err:
        load_space(QUICKSTART, ["train.schedule.name=step"])
    assert "experiment.scheduler.schedule: rung anneals a cosine LR at every rung" in str(err.value)
    assert "\n" not in str(err.value)
    load_space(QUICKSTART, ["train.schedule.name=step", "experiment.scheduler.schedule=plain"])


@pytest.mark.parametrize(("sets", "warning"), [
    (["train.schedule.warmup_epochs=2"],
     "grace_period 2 ends with the LR warmup (train.schedule.warmup_epochs 2): the first rung compares trials at "
     "their peak LR, before their cosine anneals"),
    (["train.schedule.warmup_epochs=3", "experiment.scheduler.schedule=plain"],
     "grace_period 2 ends inside the LR warmup (train.schedule.warmup_epochs 3): the first rung compares trials "
     "before they trained at full LR"),
    (["train.schedule.warmup_epochs=1.5"], None),
    (["train.schedule.warmup_epochs=1.5", "experiment.scheduler.schedule=plain"], None),
])
def test_the_warmup_warning_is_right_for_both_schedules(caplog, sets, warning):
    with caplog.at_level("WARNING", logger="spaces.loader"):
        load_space(QUICKSTART, sets)
    lines = [r.getMessage() for r in caplog.records if "warmup" in r.getMessage()]
    assert lines == ([] if warning is None else [lines[0]]) and (warning is None or warning in lines[0])
