"""`--resume` after a killed driver, in seconds and without Ray: the study and Tune's last
snapshot are built by hand as a kill leaves them apart, then `search.study.reconcile` and
the restored searcher must settle every trial once and one way."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from ray import cloudpickle

from search.experiment.folder import Experiment, experiment_for
from search.experiment.trials import read_results, summarise
from search.experiment.resume import reconcile
from search.experiment.study import (
    ABANDONED,
    TUNE_TRIAL_ID,
    StudyBackup,
    load_study,
    make_searcher,
)
from spaces import QUICKSTART, Space, load_space

EPOCHS = 3
SESSION = "2020-01-01_00-00-00"  # an old Tune session: the reconciled snapshot must sort after it
STATE = f"experiment_state-{SESSION}.json"
GEN_STATE = f"search_gen_state-{SESSION}.json"


def _space(tmp_path: Path) -> Space:
    return load_space(
        QUICKSTART,
        [f"experiment.storage_path={tmp_path}", "experiment.name=res", "experiment.num_samples=4",
         "experiment.sampler.kind=random", f"train.run.epochs={EPOCHS}"],
    )


def _row(tid: str, epoch: int, done: bool = False) -> dict:
    return {"trial_id": tid, "epoch": epoch, "val_acc": 0.1 * epoch + 0.01 * len(tid), "training_iteration": epoch,
            "done": done}


def _config(tid: str) -> dict:
    return {"label_smoothing": 0.001 * len(tid)}


class Fake:
    """A study and Tune's state in an experiment folder, as a driver killed between them
    leaves them."""

    def __init__(self, tmp_path: Path) -> None:
        self.space = _space(tmp_path)
        self.exp: Experiment = experiment_for(self.space)
        Path(self.exp.path).mkdir(parents=True)
        self.searcher = make_searcher(self.space, self.exp.study_db)
        self.tune: dict[str, tuple[str, dict]] = {}  # tid -> (status, last result)
        self.rows: dict[str, list[dict]] = {}

    def trial(self, tid: str, epochs_reported: int) -> None:
        """A trial the searcher proposed and heard `epochs_reported` results of."""
        self.searcher.suggest(tid)
        for e in range(1, epochs_reported + 1):
            self.searcher.on_trial_result(tid, _row(tid, e))

    def in_tune(self, tid: str, status: str, last: dict, rows: list[dict]) -> None:
        self.tune[tid] = (status, last)
        self.rows[tid] = rows

    def write_tune_state(self, live: set[str], counter: int) -> None:
        from ray.train._internal.storage import StorageContext
        from ray.tune.experiment import Trial

        data = []
        for tid, (status, last) in self.tune.items():
            storage = StorageContext(self.exp.storage, self.exp.name, trial_dir_name=f"run_trial_{tid}")
            t = Trial("run_trial", config=_config(tid), trial_id=tid, storage=storage, stub=True)
            t.set_status(status)
            if last:
                t.update_last_result({**last, "config": _config(tid)})
            t.create_placement_group_factory()
            data.append(list(t.get_json_state()))
            folder = Path(self.exp.path) / f"run_trial_{tid}"
            folder.mkdir()
            rows = [{**r, "config": _config(tid)} for r in self.rows[tid]]  # Tune logs each row's config
            (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        state = {"trial_data": data, "runner_data": {"_session_str": SESSION}, "stats": {"start_time": 0.0}}
        (Path(self.exp.path) / STATE).write_text(json.dumps(state))
        gen = {"counter": counter, "total_samples": 4, "finished": False,
               "name:ConcurrencyLimiter": {"max_concurrent": 2, "batch": False, "live_trials": set(live),
                                           "num_unfinished_live_trials": len(live), "cached_results": {}}}
        (Path(self.exp.path) / GEN_STATE).write_bytes(cloudpickle.dumps(gen))

    def train_checkpoint(self, tid: str, metrics: dict) -> None:
        """The training run's record of its last checkpoint, as Ray Train keeps it."""
        run = Path(self.exp.runs) / f"trial_{tid}"
        run.mkdir(parents=True)
        snapshot = {"checkpoint_results": [], "latest_checkpoint_result": {"metrics": metrics}}
        (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))

    def study(self) -> optuna.Study:
        return load_study(self.exp.study_db, self.space.experiment.name)

    def by_tid(self) -> dict[str, optuna.trial.FrozenTrial]:
        return {t.user_attrs[TUNE_TRIAL_ID]: t for t in self.study().trials if TUNE_TRIAL_ID in t.user_attrs}


@pytest.fixture
def killed(tmp_path: Path) -> Fake:
    """Seven Tune trials and what the kill left of them:
    done: all epochs, COMPLETE in the study, Tune's snapshot still has it RUNNING at epoch 2;
    cut: stopped by ASHA after epoch 1, PRUNED in the study, RUNNING in Tune's snapshot;
    lost: TERMINATED in Tune after all epochs, its end never reached the study;
    trained: its training saved its last epoch, whose report reached neither Tune nor the
    study (both stop at epoch 1);
    unreported: Tune logged its last epoch and was killed before ending it (ASHA stops a
    trial at max_t without the searcher hearing that result);
    going: running in both, one epoch reported;
    behind: running in both, its training saved epoch 2, whose report reached neither;
    orphan: proposed by the study, never recorded by Tune (and one the study handed out
    before the Tune trial id was attached)."""
    f = Fake(tmp_path)
    f.trial("done", EPOCHS)
    f.searcher.on_trial_complete("done", _row("done", EPOCHS))
    f.trial("cut", 1)
    f.searcher.on_trial_complete("cut", _row("cut", 1, done=True))
    f.trial("lost", EPOCHS)
    f.trial("trained", 1)
    f.trial("unreported", EPOCHS - 1)
    f.trial("going", 1)
    f.trial("behind", 1)
    f.trial("orphan", 0)
    f.study().ask()  # killed between ask() and the Tune trial id
    assert {k: t.state for k, t in f.by_tid().items()} == {
        "done": TrialState.COMPLETE, "cut": TrialState.PRUNED, "lost": TrialState.RUNNING,
        "going": TrialState.RUNNING, "orphan": TrialState.RUNNING, "trained": TrialState.RUNNING,
        "unreported": TrialState.RUNNING, "behind": TrialState.RUNNING,
    }
    rows = {tid: [_row(tid, e) for e in range(1, n + 1)] for tid, n in
            (("done", EPOCHS), ("cut", 1), ("lost", EPOCHS), ("going", 1), ("trained", 1), ("unreported", EPOCHS), ("behind", 1))}
    rows["cut"][-1]["done"] = True
    f.in_tune("done", "RUNNING", rows["done"][1], rows["done"])
    f.in_tune("cut", "RUNNING", {}, rows["cut"])
    f.in_tune("lost", "TERMINATED", {**rows["lost"][-1], "done": True}, rows["lost"])
    f.in_tune("going", "RUNNING", rows["going"][0], rows["going"])
    f.in_tune("trained", "RUNNING", {}, rows["trained"])
    f.in_tune("behind", "RUNNING", rows["behind"][0], rows["behind"])
    f.in_tune("unreported", "RUNNING", rows["unreported"][0], rows["unreported"])
    for tid, epoch in (("trained", EPOCHS), ("unreported", EPOCHS), ("going", 1), ("behind", 2)):  # Ray Train's
        f.train_checkpoint(tid, {k: v for k, v in _row(tid, epoch).items() if k in ("epoch", "val_acc")})
    # the search generator's state was synced after the orphan was proposed
    f.write_tune_state(live={"done", "cut", "going", "trained", "unreported", "behind", "orphan"}, counter=9)
    return f


def test_reconcile_settles_every_trial_once_and_one_way(killed: Fake):
    old = (Path(killed.exp.path) / STATE).read_bytes()
    out = reconcile(killed.exp, killed.space)

    assert out.tune_state
    assert sorted(out.closed) == ["cut", "done", "trained", "unreported"]
    assert sorted(out.told) == ["lost", "trained", "unreported"]
    assert sorted(out.recovered) == ["behind", "trained"]
    assert len(out.abandoned) == 2
    trials = killed.study().trials
    by_tid = killed.by_tid()
    # orphans: FAIL and marked; each Tune trial still once in the study
    orphans = [t for t in trials if t.number in out.abandoned]
    assert all(t.state == TrialState.FAIL and t.user_attrs[ABANDONED] for t in orphans)
    assert {t.user_attrs.get(TUNE_TRIAL_ID) for t in orphans} == {"orphan", None}
    assert [t.user_attrs.get(TUNE_TRIAL_ID) for t in trials].count("done") == 1
    # the study's verdicts stand; the lost end is told as the searcher would have
    assert by_tid["done"].state == TrialState.COMPLETE
    assert by_tid["done"].value == pytest.approx(_row("done", EPOCHS)["val_acc"])
    assert by_tid["cut"].state == TrialState.PRUNED and sorted(by_tid["cut"].intermediate_values) == [1]
    assert by_tid["lost"].state == TrialState.COMPLETE
    assert by_tid["lost"].value == pytest.approx(_row("lost", EPOCHS)["val_acc"])
    assert by_tid["going"].state == TrialState.RUNNING
    assert by_tid["behind"].state == TrialState.RUNNING
    assert by_tid["behind"].intermediate_values == {e: pytest.approx(_row("behind", e)["val_acc"]) for e in (1, 2)}
    # trained to the end: COMPLETE with the last epoch, from Tune's row or the training's record
    for tid in ("trained", "unreported"):
        assert by_tid[tid].state == TrialState.COMPLETE, tid
        assert by_tid[tid].value == pytest.approx(_row(tid, EPOCHS)["val_acc"])
        assert EPOCHS in by_tid[tid].intermediate_values

    # Tune's last snapshot is kept as it was; a newer one holds the reconciled trials
    folder = Path(killed.exp.path)
    assert (folder / STATE).read_bytes() == old
    states = sorted(folder.glob("experiment_state-*.json"))
    assert len(states) == 2 and states[-1].name > STATE
    rows = {r.trial_id: r for r in summarise(read_results(killed.exp.path), killed.space)}
    assert all(r.values == _config(tid) for tid, r in rows.items()), rows  # closed trials keep their config
    assert (rows["done"].status, rows["done"].epochs) == ("done", EPOCHS)
    assert (rows["cut"].status, rows["cut"].epochs) == ("stopped early", 1)
    assert (rows["lost"].status, rows["lost"].epochs) == ("done", EPOCHS)
    assert (rows["going"].status, rows["going"].epochs) == ("unfinished", 1)
    assert rows["behind"].status == "unfinished" and rows["behind"].best == pytest.approx(_row("behind", 2)["val_acc"])
    assert (rows["trained"].status, rows["trained"].epochs) == ("done", EPOCHS)
    assert rows["trained"].best == pytest.approx(_row("trained", EPOCHS)["val_acc"])  # the row Tune missed
    assert (rows["unreported"].status, rows["unreported"].epochs) == ("done", EPOCHS)
    assert [r["epoch"] for r in map(json.loads, (folder / "run_trial_trained" / "result.json").open())] == [1, EPOCHS]
    # the concurrency limiter frees the closed trials' slots; the generator counts Tune's trials
    gen = cloudpickle.loads(max(folder.glob("search_gen_state-*.json")).read_bytes())
    assert gen["name:ConcurrencyLimiter"]["live_trials"] == {"going", "behind"}
    assert gen["name:ConcurrencyLimiter"]["num_unfinished_live_trials"] == 2
    assert gen["counter"] == 7


def test_reconcile_twice_changes_nothing_more(killed: Fake):
    reconcile(killed.exp, killed.space)
    folder = Path(killed.exp.path)
    files = {p.name: p.read_bytes() for p in folder.glob("*_state-*")}
    study = [(t.number, t.state, t.value) for t in killed.study().trials]
    again = reconcile(killed.exp, killed.space)
    assert again.tune_state and not (again.abandoned or again.closed or again.told)
    assert {p.name: p.read_bytes() for p in folder.glob("*_state-*")} == files
    assert [(t.number, t.state, t.value) for t in killed.study().trials] == study


def test_without_tune_state_every_running_trial_is_an_orphan(tmp_path: Path):
    f = Fake(tmp_path)
    f.trial("a", 1)
    f.trial("b", 0)
    out = reconcile(f.exp, f.space)
    assert not out.tune_state
    assert {t.user_attrs[TUNE_TRIAL_ID]: t.state for t in f.study().trials} == {"a": TrialState.FAIL,
                                                                             "b": TrialState.FAIL}


def test_without_a_study_nothing_is_created(tmp_path: Path):
    space = _space(tmp_path)
    exp = experiment_for(space)
    Path(exp.path).mkdir(parents=True)
    assert not reconcile(exp, space).tune_state
    assert not Path(exp.study_db).exists()


# The restored searcher ---------------------------------------------------------------------------------
def test_restored_searcher_maps_tune_ids_from_the_study_and_ignores_finished_trials(tmp_path: Path):
    f = Fake(tmp_path)
    f.trial("early", 1)
    f.trial("ends", 1)
    snapshot = tmp_path / "searcher-state.pkl"
    f.searcher.save(str(snapshot))  # Tune's snapshot of the searcher ...
    # ... then, before the driver was killed: "ends" finished, "late" was proposed
    f.searcher.on_trial_result("ends", _row("ends", 2))
    f.searcher.on_trial_complete("ends", _row("ends", EPOCHS))
    f.trial("late", 1)
    before = len(f.study().trials)

    restored = make_searcher(f.space, f.exp.study_db)
    restored.restore(str(snapshot))
    # late results of a finished trial change nothing and raise nothing
    restored.on_trial_result("ends", _row("ends", EPOCHS))
    restored.on_trial_complete("ends", _row("ends", 1, done=True))
    # a trial the snapshot did not know reports to its own Optuna trial
    restored.on_trial_result("late", _row("late", 2))
    restored.on_trial_result("early", _row("early", 2))
    restored.on_trial_complete("early", _row("early", 2, done=True))
    by_tid = f.by_tid()
    assert len(f.study().trials) == before
    assert by_tid["ends"].state == TrialState.COMPLETE and sorted(by_tid["ends"].intermediate_values) == [1, 2, 3]
    assert sorted(by_tid["late"].intermediate_values) == [1, 2]
    assert by_tid["early"].state == TrialState.PRUNED and sorted(by_tid["early"].intermediate_values) == [1, 2]


def test_news_of_a_trial_finished_in_the_study_is_ignored_without_error(tmp_path: Path):
    f = Fake(tmp_path)
    f.trial("x", 2)
    other = make_searcher(f.space, f.exp.study_db)  # another view of the same study finishes it
    study = other._ot_study
    study.tell(f.by_tid()["x"].number, state=TrialState.PRUNED)
    f.searcher.on_trial_result("x", _row("x", 3))  # before: UpdateFinishedTrialError
    f.searcher.on_trial_complete("x", _row("x", 3))
    t = f.by_tid()["x"]
    assert t.state == TrialState.PRUNED and sorted(t.intermediate_values) == [1, 2]


# The remote copy ---------------------------------------------------------------------------------------
class _Store:
    """A remote storage that records every upload of the study."""

    def __init__(self) -> None:
        self.copies: list[bytes] = []

    def upload(self, local: str, rel: str) -> None:
        self.copies.append(Path(local).read_bytes())


def test_study_backup_copies_the_study_at_every_trial_end(tmp_path: Path):
    f = Fake(tmp_path)
    f.trial("a", 1)
    store = _Store()
    backup = StudyBackup(f.exp.study_db, store, every_s=3600)  # type: ignore[arg-type]
    backup.on_trial_result()  # the first result: a copy; the next ones wait every_s
    backup.on_trial_result()
    assert len(store.copies) == 1
    for end in (backup.on_trial_complete, backup.on_trial_error, backup.on_experiment_end):
        f.searcher.on_trial_result("a", _row("a", len(store.copies) + 1))
        end()
        copy = tmp_path / "copy.db"
        copy.write_bytes(store.copies[-1])
        values = load_study(str(copy), f.space.experiment.name).trials[0].intermediate_values
        assert sorted(values) == list(range(1, len(store.copies) + 1))  # the copy as of that end
    assert len(store.copies) == 4


def test_a_restored_searcher_saves_and_restores_again(tmp_path: Path):
    f = Fake(tmp_path)
    f.trial("a", 1)
    first = tmp_path / "first.pkl"
    f.searcher.save(str(first))
    f.trial("b", 1)  # after the snapshot: adopted from the study on restore
    restored = make_searcher(f.space, f.exp.study_db)
    restored.restore(str(first))
    second = tmp_path / "second.pkl"
    restored.save(str(second))  # Tune snapshots it again
    again = make_searcher(f.space, f.exp.study_db)
    again.restore(str(second))
    again.on_trial_result("b", _row("b", 2))
    assert sorted(f.by_tid()["b"].intermediate_values) == [1, 2]


# Result rows across drivers ----------------------------------------------------------------------------
class _Trial:
    """What Tune's loggers use of a trial: its driver-side folder and its folder in the
    experiment."""

    def __init__(self, driver_dir: Path, experiment_dir: Path) -> None:
        import pyarrow.fs

        self.trial_id, self.config, self.local_path = "t1", {"label_smoothing": 0.1}, str(driver_dir)
        self.checkpoint = None  # Tune restores its files only for trials with a Tune checkpoint
        self.storage = type("S", (), {"trial_fs_path": str(experiment_dir),
                                      "storage_filesystem": pyarrow.fs.LocalFileSystem()})()
        self.init_local_path()

    def init_local_path(self) -> None:
        Path(self.local_path).mkdir(parents=True, exist_ok=True)


def test_result_rows_stay_in_the_experiment_across_drivers(tmp_path: Path):
    from search.experiment.resume import CsvRows, JsonRows

    kept = tmp_path / "experiment" / "run_trial_t1"
    first = _Trial(tmp_path / "ray_session_1", kept)
    loggers = [JsonRows(), CsvRows()]
    for e in (1, 2):
        for lg in loggers:
            lg.log_trial_result(e, first, _row("t1", e))
        # each row is in the experiment at once, not at Tune's next copy
        assert [json.loads(x)["epoch"] for x in (kept / "result.json").read_text().splitlines()] == list(range(1, e + 1))
    # killed; the next driver runs in a new Ray instance, with no copy of its own
    second = _Trial(tmp_path / "ray_session_2", kept)
    loggers = [JsonRows(), CsvRows()]
    for lg in loggers:
        lg.log_trial_result(3, second, _row("t1", 3))
    assert [json.loads(x)["epoch"] for x in (kept / "result.json").read_text().splitlines()] == [1, 2, 3]
    csv = (kept / "progress.csv").read_text().splitlines()
    assert len(csv) == 4 and csv[0].startswith("trial_id") and [c.split(",")[1] for c in csv[1:]] == ["1", "2", "3"]


def test_the_scheduler_state_is_out_of_reach_of_a_restored_tuners_sync(tmp_path: Path):
    """A restored Tuner copies the experiment's top-level .json and .pkl files into its
    staging folder and syncs them all back later (Ray's `sync_down_experiment_state`, listing
    one level): the scheduler's state, rewritten at every decision, must not be among them.
    An experiment made when it lived at the top level is still read."""
    from ray.train._internal.storage import _list_at_fs_path
    from pyarrow.fs import LocalFileSystem

    from search.experiment.audit import AuditLog, SchedulerState

    log = AuditLog(str(tmp_path))
    log.save_state(SchedulerState(audited={"t1": 2}, stop_decisions=1))
    copied_back = [p for p in _list_at_fs_path(LocalFileSystem(), str(tmp_path)) if p.endswith((".json", ".pkl"))]
    assert copied_back == [] and log.load_state().audited == {"t1": 2}

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "audit.json").write_text(SchedulerState(audited={"t9": 1}, stop_decisions=3).to_json())
    assert AuditLog(str(legacy)).load_state().stop_decisions == 3
