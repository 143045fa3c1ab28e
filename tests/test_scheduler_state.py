"""The pieces that make a resumed search the same search, without Ray running: the seeded
rung audit, snapshot names that never replace each other, the private-API version check,
and the scheduler's memory read back by a new scheduler."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest

from search.experiment.resume import next_session
from search.phases.schedulers import AuditedASHA, audit_pick
from search.experiment.audit import AuditLog
from trainable.config import ConfigError


@pytest.mark.parametrize("audit", [0.25, 0.3, 0.5, 1.0])
def test_audit_picks_a_fraction_of_the_stops_at_seeded_random_places(audit):
    picks = [i for i in range(400) if audit_pick(i, audit, seed=7)]
    assert abs(len(picks) - 400 * audit) <= 1
    assert picks == [i for i in range(400) if audit_pick(i, audit, seed=7)]  # deterministic
    other = [i for i in range(400) if audit_pick(i, audit, seed=8)]
    if audit < 1:
        assert picks != other  # the seed moves them
        gaps = {b - a for a, b in zip(picks, picks[1:])}
        assert len(gaps) > 1  # not every k-th stop


def test_snapshot_names_sort_after_the_newest_whatever_the_clock():
    assert next_session("2026-01-01_00-00-02", "2026-01-01_00-00-01") == "2026-01-01_00-00-02"
    same = next_session("2026-01-01_00-00-01", "2026-01-01_00-00-01")  # two resumes in one second
    behind = next_session("2025-12-31_23-59-59", same)  # and a clock behind
    assert "2026-01-01_00-00-01" < same < behind
    assert same == "2026-01-01_00-00-01_r001" and behind == "2026-01-01_00-00-01_r002"


def test_resume_refuses_other_ray_or_optuna_versions(monkeypatch):
    import ray

    from search.experiment import ray_private

    monkeypatch.setattr(ray, "__version__", "9.9.9")
    module = importlib.reload(ray_private)
    try:
        with pytest.raises(ConfigError) as err:
            module.check_resume()
        assert "ray 9.9.9 (written for 2.60.0)" in str(err.value) and "\n" not in str(err.value)
    finally:
        monkeypatch.undo()
        importlib.reload(ray_private)
    ray_private.check_resume()


def _asha(path, audit=0.0):
    return AuditedASHA(audit=audit, log=AuditLog(str(path)), seed=1, time_attr="epoch", metric="val_acc",
                       mode="max", max_t=4, grace_period=1, reduction_factor=2)


def test_a_new_scheduler_repeats_the_decisions_of_the_one_before(tmp_path):
    (tmp_path / "search.json").write_text("{}")
    first = _asha(tmp_path)
    t = [SimpleNamespace(trial_id=f"t{i}") for i in range(3)]
    for trial in t:
        first.on_trial_add(None, trial)
    assert first.on_trial_result(None, t[0], {"epoch": 1, "val_acc": 0.9}) == "CONTINUE"
    assert first.on_trial_result(None, t[1], {"epoch": 1, "val_acc": 0.5}) == "STOP"
    second = _asha(tmp_path)  # a restarted driver: Tune's pickle has empty rungs
    # the rung's record is back: a worse trial is stopped as the first scheduler would
    assert second.on_trial_result(None, t[2], {"epoch": 1, "val_acc": 0.6}) == "STOP"
    # a decision already taken is repeated, and a stopped trial that ran on is stopped
    assert second.on_trial_result(None, t[1], {"epoch": 1, "val_acc": 0.99}) == "STOP"
    assert second.on_trial_result(None, t[1], {"epoch": 2, "val_acc": 0.99}) == "STOP"
