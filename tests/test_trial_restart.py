"""A restarted trial: one whose training already ran all its epochs reports its last
checkpoint's result again instead of nothing; Tune's state is saved with the trial at every
result."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from search.phases.schedulers import record_trial
from search.phases.trial import train_or_report_failure
from spaces import QUICKSTART, load_space


def record(runs, name: str, epoch: int) -> None:
    run = runs / name
    run.mkdir(parents=True)
    metrics = {"epoch": epoch, "val_acc": 0.75}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"latest_checkpoint_result": {"metrics": metrics}}))


@pytest.mark.parametrize(("saved", "trains"), [(4, False), (2, True), (None, True)])
def test_a_trial_whose_training_ended_reports_its_last_result_again(tmp_path, monkeypatch, saved, trains):
    import ray.tune

    space = load_space(QUICKSTART)  # 4 epochs
    if saved is not None:
        record(tmp_path, "trial_x", saved)
    reported, launched = [], []
    monkeypatch.setattr(ray.tune, "report", reported.append)
    train_or_report_failure(lambda: space.trial_config({}), "trial_x", str(tmp_path), space,
                            launch=lambda cfg, name, runs: launched.append(name))
    assert launched == (["trial_x"] if trains else [])
    assert reported == ([] if trains else [{"epoch": 4, "val_acc": 0.75}])


def test_every_result_saves_tunes_state_with_the_trial_before_the_scheduler_decides(tmp_path):
    from search.phases.schedulers import RecordedFIFO

    import pyarrow.fs

    calls = []
    staging, remote = tmp_path / "staging", tmp_path / "experiment"
    staging.mkdir()
    remote.mkdir()
    (remote / "trial_a").mkdir()
    (remote / "trial_a" / "result.json").write_text("rows kept by earlier drivers\n")

    def save_to_dir():
        calls.append("save")
        for name in ("experiment_state-S.json", "searcher-state-S.pkl", "experiment_state-OLD.json"):
            (staging / name).write_text(name)
        (staging / "trial_a").mkdir(exist_ok=True)
        (staging / "trial_a" / "result.json").write_text("")  # this driver's fresh copy

    storage = SimpleNamespace(experiment_driver_staging_path=str(staging), experiment_fs_path=str(remote),
                              storage_filesystem=pyarrow.fs.LocalFileSystem())
    inner = SimpleNamespace(_mark_trial_to_checkpoint=lambda t: calls.append(("mark", t.trial_id)),
                            save_to_dir=save_to_dir, _storage=storage, _session_str="S")
    trial = SimpleNamespace(trial_id="a")
    record_trial(SimpleNamespace(_tune_controller=inner), trial)
    assert calls == [("mark", "a"), "save"]
    assert sorted(p.name for p in remote.iterdir()) == ["experiment_state-S.json", "searcher-state-S.pkl", "trial_a"]
    assert (remote / "trial_a" / "result.json").read_text() == "rows kept by earlier drivers\n"
    calls.clear()
    record_trial(None, trial)  # the reconciliation's replay: no controller, nothing saved
    assert calls == []
    assert RecordedFIFO().on_trial_result(SimpleNamespace(_tune_controller=inner), trial, {"epoch": 1}) == "CONTINUE"
    assert calls == [("mark", "a"), "save"]


def test_a_resumed_trial_takes_its_kept_rows_back_over_a_stale_staging_copy(tmp_path):
    import pyarrow.fs

    from search.experiment.resume import JsonRows

    staging, remote = tmp_path / "staging" / "trial_a", tmp_path / "experiment" / "trial_a"
    staging.mkdir(parents=True)
    remote.mkdir(parents=True)
    (staging / "result.json").write_text("")  # as an earlier driver, killed, left it on this Ray instance
    (remote / "result.json").write_text('{"epoch": 1}\n')  # the rows the experiment kept
    trial = SimpleNamespace(local_path=str(staging), storage=SimpleNamespace(
        trial_fs_path=str(remote), storage_filesystem=pyarrow.fs.LocalFileSystem()))
    JsonRows()._restore_from_remote("result.json", trial)
    assert (staging / "result.json").read_text() == '{"epoch": 1}\n'
    same = SimpleNamespace(local_path=str(remote), storage=trial.storage)  # staging is the experiment: untouched
    JsonRows()._restore_from_remote("result.json", same)
    assert (remote / "result.json").read_text() == '{"epoch": 1}\n'


def test_a_resume_drops_the_result_files_an_earlier_driver_left_in_its_staging_folder(tmp_path):
    import pyarrow.fs

    from search.experiment.resume import _drop_staged_rows

    staging, remote = tmp_path / "staging" / "trial_a", tmp_path / "experiment" / "trial_a"
    staging.mkdir(parents=True)
    remote.mkdir(parents=True)
    for folder, text in ((staging, ""), (remote, '{"epoch": 1}\n')):
        (folder / "result.json").write_text(text)
        (folder / "progress.csv").write_text(text)
    (staging / "params.json").write_text("{}")
    trial = SimpleNamespace(local_path=str(staging), storage=SimpleNamespace(
        trial_fs_path=str(remote), storage_filesystem=pyarrow.fs.LocalFileSystem()))
    _drop_staged_rows(trial)  # Tune would sync these over the experiment's rows
    assert sorted(p.name for p in staging.iterdir()) == ["params.json"]
    assert (remote / "result.json").read_text() == '{"epoch": 1}\n'
    _drop_staged_rows(SimpleNamespace(local_path=str(remote), storage=trial.storage))  # staging is the experiment
    assert (remote / "result.json").read_text() == '{"epoch": 1}\n'
