"""Trials that cannot give a score: a config or data error ends the trial at once (no retry,
FAIL in Optuna), a divergence is a result (no retry, COMPLETE at the worst value and
infeasible in Optuna), and only a lost worker is retried. Both show in the trial table with
their one-line reason.

The bookkeeping runs in seconds: the real `run_trial`, searcher and scheduler, with a launcher
that reports fixed curves instead of training. One slow test runs a real search whose two
trials diverge and fail inside their Ray Train workers."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from optuna.trial import TrialState

from trainable import status
from search.experiment.trials import finished, format_table, read_results, summarise
from search.phases.schedulers import make_scheduler
from search.phases.trial import run_trial
from search.experiment.study import TUNE_TRIAL_ID, load_study, make_searcher
from spaces import QUICKSTART, load_space
from trainable.config import ConfigError, DataError
from trainable.failures import deterministic_cause

EPOCHS = 3
DATA_ERROR = "the training set (40 images) is smaller than one update of batch.global_batch 64"
DIVERGED_LINE = ("diverged: non-finite loss at epoch 2, step 9 (update 3 of the epoch), lr 0.8; "
                 "lower optimizer.base_lr or lengthen schedule.warmup_epochs")
# what the n-th trial to start does; "lost worker" fails once after epoch 1, then resumes
PLAN = ["diverges", "data error", "lost worker", "pruned", "completes"]
CURVES = {"diverges": [0.3], "lost worker": [0.5, 0.6, 0.7], "pruned": [0.01, 0.02, 0.03],
          "completes": [0.6, 0.7, 0.8]}


# Which failures are retried -----------------------------------------------------------------------------
def test_config_and_data_errors_are_deterministic_lost_workers_are_not():
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    data = DataError(DATA_ERROR)
    collateral = RuntimeError("gloo: connection closed by peer")
    assert deterministic_cause(WorkerGroupError("x", {0: data, 1: collateral})) is data
    assert deterministic_cause(ControllerError(data)) is data  # ended by EndOnUserError
    assert deterministic_cause(ConfigError("sampled value")) is not None  # raised by the driver
    wrapped = RayTaskError("fn", "Traceback ...", data, DataError)
    assert deterministic_cause(wrapped) is data
    # a lost worker is retried, whatever the other ranks raised after it
    assert deterministic_cause(WorkerGroupError("x", {0: data, 1: ActorDiedError()})) is None
    assert deterministic_cause(WorkerGroupError("x", {0: ActorDiedError()})) is None
    assert deterministic_cause(ControllerError(WorkerGroupStartupFailedError("no resources"))) is None
    assert deterministic_cause(WorkerGroupError("x", {0: collateral})) is None  # unknown: retried
    assert deterministic_cause(RuntimeError("boom")) is None


def test_a_pretrained_checkpoint_that_does_not_fit_is_a_config_error(tmp_path):
    import torch

    from models import create_model
    from trainable.loop import load_pretrained

    def model():
        return create_model("resnet18_vd", num_classes=10, small_input=True)

    state = model().state_dict()
    cases = {
        "extra.pt": ({**state, "extra.weight": torch.zeros(1)}, "1 unexpected keys, e.g. extra.weight"),
        "short.pt": ({k: v for k, v in state.items() if k != "conv1.0.weight"}, "1 missing keys, e.g. conv1.0.weight"),
        "shape.pt": ({**state, "conv1.0.weight": torch.zeros(3, 3, 1, 1)}, "size mismatch for conv1.0.weight"),
    }
    for name, (bad, reason) in cases.items():
        torch.save(bad, tmp_path / name)
        with pytest.raises(ConfigError) as info:
            load_pretrained(model(), str(tmp_path / name))
        msg = str(info.value)
        assert msg.startswith(f"model.pretrained {tmp_path / name}: does not fit the model (") and reason in msg
        assert "\n" not in msg
    # another class count: the classifier is re-initialised, the rest loads
    other = create_model("resnet18_vd", num_classes=7, small_input=True).state_dict()
    torch.save(other, tmp_path / "seven.pt")
    fresh = model()
    load_pretrained(fresh, str(tmp_path / "seven.pt"))
    assert torch.equal(fresh.state_dict()["conv1.0.weight"], other["conv1.0.weight"])


def test_result_keys_and_worst_values_agree_across_the_layers():
    from trainable import loop

    assert (loop.RUN_STATUS, loop.RUN_ERROR, loop.DIVERGED) == (
        status.RUN_STATUS, status.RUN_ERROR, status.DIVERGED)
    for metric, worst in loop.WORST.items():
        assert status.worst_value(metric) == worst
    err = loop.TrainingDiverged(DIVERGED_LINE, epoch=2)
    assert loop.diverged_metrics(err) == {
        **loop.WORST, "epoch": 2, "run_status": "diverged", "error": DIVERGED_LINE}
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert str(again) == DIVERGED_LINE and again.epoch == 2


# A search of fixed curves ---------------------------------------------------------------------------------
def fake_launch(cfg, name: str, runs_path: str) -> None:
    """Stands in for the TorchTrainer: what the n-th trial to start reports or raises, the way
    the real run does (the loop's diverged result, Ray Train's WorkerGroupError)."""
    from ray import tune
    from ray.exceptions import ActorDiedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from trainable.loop import TrainingDiverged, diverged_metrics

    folder = Path(runs_path)
    folder.mkdir(parents=True, exist_ok=True)
    order = folder / "order.txt"
    seen = order.read_text().split() if order.exists() else []
    if name not in seen:
        seen.append(name)
        order.write_text("\n".join(seen) + "\n")
    attempts = folder / f"{name}.attempts"
    with attempts.open("a") as f:
        f.write("attempt\n")
    attempt = len(attempts.read_text().split())
    kind = PLAN[seen.index(name)]
    if kind == "data error":
        raise WorkerGroupError("rank 0 failed", {0: DataError(DATA_ERROR), 1: RuntimeError("gloo: closed")})
    first = 2 if kind == "lost worker" and attempt > 1 else 1  # a retry resumes after epoch 1
    for epoch, acc in enumerate(CURVES[kind], start=1):
        if epoch >= first:
            tune.report({"epoch": epoch, "val_acc": acc})
        if kind == "lost worker" and attempt == 1:
            raise WorkerGroupError("worker 1 died", {1: ActorDiedError()})
    if kind == "diverges":
        tune.report(diverged_metrics(TrainingDiverged(DIVERGED_LINE, epoch=2)))


def _space(storage: Path):
    return load_space(QUICKSTART, [
        f"experiment.storage_path={storage}",
        "experiment.name=failures",
        f"experiment.num_samples={len(PLAN)}",
        "experiment.max_failures=2",
        "experiment.sampler.kind=random",
        "experiment.scheduler={kind: asha, grace_period: 1, reduction_factor: 2, audit: 0}",
        f"train.run.epochs={EPOCHS}",
    ])


def _trainable(space, runs: Path):
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(run_trial, space=space, runs_path=str(runs), launch=fake_launch),
        {"CPU": 0, "memory": 2**20},
    )


def _attempts(runs: Path) -> dict[str, int]:
    """{kind: attempts} of the fake search."""
    names = (runs / "order.txt").read_text().split()
    return {PLAN[i]: len((runs / f"{n}.attempts").read_text().split()) for i, n in enumerate(names)}


@pytest.fixture(scope="module")
def fixed(ray_address, tmp_path_factory):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    storage = tmp_path_factory.mktemp("storage")
    space = _space(storage)
    runs = storage / "fake_runs"
    db = str(storage / "optuna.db")
    tuner = tune.Tuner(
        _trainable(space, runs),
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(space, db),
            scheduler=make_scheduler(space),
            num_samples=space.experiment.num_samples,
            max_concurrent_trials=1,  # the plan follows the order trials start in
        ),
        run_config=tune.RunConfig(
            name="failures", storage_path=str(storage), verbose=0,
            failure_config=tune.FailureConfig(max_failures=space.experiment.max_failures),
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback()],
        ),
    )
    grid = tuner.fit()
    names = (runs / "order.txt").read_text().split()
    kinds = {n.removeprefix("trial_"): PLAN[i] for i, n in enumerate(names)}
    return space, grid, runs, kinds, load_study(db, "failures")


def test_only_a_lost_worker_is_retried(fixed):
    _, _, runs, _, _ = fixed
    # experiment.max_failures=2: a data error would have run 3 times
    assert _attempts(runs) == {"diverges": 1, "data error": 1, "lost worker": 2, "pruned": 1, "completes": 1}


def test_the_table_shows_diverged_and_failed_with_their_reason(fixed):
    space, grid, _, kinds, _ = fixed
    rows = summarise(grid, space)
    by_kind = {kinds[r.trial_id]: r for r in rows}
    assert {k: r.status for k, r in by_kind.items()} == {
        "diverges": "diverged", "data error": "failed", "lost worker": "done", "pruned": "stopped early",
        "completes": "done"}
    div, fail = by_kind["diverges"], by_kind["data error"]
    # the epochs before the divergence count; its final report (the worst values) does not
    assert (div.epochs, div.best, div.final, div.error) == (1, 0.3, 0.3, DIVERGED_LINE)
    assert (fail.epochs, fail.best, fail.final, fail.error) == (0, None, None, DATA_ERROR)
    assert by_kind["lost worker"].error is None and by_kind["lost worker"].epochs == EPOCHS
    assert [kinds[r.trial_id] for r in finished(rows)] == ["completes", "lost worker"]
    assert rows[-1] is fail  # no score: last

    lines = format_table(rows, space).splitlines()
    assert lines[0].endswith("  status         reason")
    status_at, reason_at = lines[0].index("status"), lines[0].index("reason")
    for r, line in zip(rows, lines[2:]):
        assert line[status_at:reason_at].strip() == r.status
        assert line[reason_at:] == (r.error or "")
    # the same rows from the experiment folder on disk
    assert summarise(read_results(str(Path(space.experiment.storage_path) / "failures")), space) == rows


def test_optuna_sees_divergence_as_the_worst_result_and_a_failure_as_fail(fixed):
    from optuna.samplers._tpe.sampler import _split_trials

    _, _, _, kinds, study = fixed
    trials = {kinds[t.user_attrs[TUNE_TRIAL_ID]]: t for t in study.get_trials(deepcopy=False)}
    assert len(trials) == len(PLAN)
    div, fail = trials["diverges"], trials["data error"]
    assert div.state == TrialState.COMPLETE and div.value == 0.0
    assert div.intermediate_values == {1: 0.3, 2: 0.0}  # the epoch it diverged in: the worst, as ASHA saw it
    assert div.constraints == {"diverged": 1.0}
    assert div.user_attrs["run_status"] == "diverged" and div.user_attrs["error"] == DIVERGED_LINE
    assert fail.state == TrialState.FAIL and fail.intermediate_values == {}
    assert fail.user_attrs["error"] == DATA_ERROR
    assert trials["lost worker"].state == TrialState.COMPLETE and trials["lost worker"].value == 0.7
    assert trials["pruned"].state == TrialState.PRUNED
    assert study.best_trial.number == trials["completes"].number
    # TPE: a bare COMPLETE 0.0 would rank above the pruned trial; infeasible, it ranks last
    usable = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    below, above = _split_trials(study, usable, n_below=3)
    assert {t.number for t in below} == {trials[k].number for k in ("completes", "lost worker", "pruned")}
    assert [t.number for t in above] == [div.number]


def test_resume_reruns_neither_diverged_nor_failed_trials(fixed):
    from ray import tune

    space, grid, runs, _, _ = fixed
    assert all(r.error is None for r in grid)  # ended normally, so `resume_errored` skips them
    before = _attempts(runs)
    restored = tune.Tuner.restore(str(Path(space.experiment.storage_path) / "failures"),
                                  trainable=_trainable(space, runs), resume_unfinished=True, resume_errored=True)
    restored.fit()
    assert _attempts(runs) == before


# Production -------------------------------------------------------------------------------------------------
def test_production_run_that_diverged_prints_one_error_line_and_exits_1(tmp_path, monkeypatch, capsys):
    from trainable import train
    from trainable.loop import TrainingDiverged, diverged_metrics

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"kind": "digits", "image_size": 32}, "run": {"epochs": 1}}))
    result = SimpleNamespace(metrics=diverged_metrics(TrainingDiverged(DIVERGED_LINE, epoch=2)), checkpoint=None)
    monkeypatch.setattr(train, "connect", lambda address=None: None)
    monkeypatch.setattr(train, "build_trainer", lambda *a, **k: SimpleNamespace(fit=lambda: result))
    rc = train.main(["--config", str(config), "--storage-path", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.splitlines() == [f"error: {DIVERGED_LINE}"]


# The real thing ---------------------------------------------------------------------------------------------
def _checkpoints(folder: Path) -> tuple[Path, Path]:
    """A checkpoint whose classifier is NaN (the first update's loss is NaN: the run
    diverges), and one with a key the model lacks (it does not fit: a config error raised
    on every worker when it builds the model)."""
    import torch

    from models import create_model

    state = create_model("resnet18_vd", num_classes=10, small_input=True).state_dict()
    state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))
    nan, bad = folder / "nan.pt", folder / "bad.pt"
    torch.save(state, nan)
    torch.save({**state, "extra.weight": torch.zeros(1)}, bad)
    return nan, bad


def _worker_groups_started() -> int:
    """Worker groups Ray Train has started in this Ray instance (a placement group of one
    CPU bundle per worker each; removed ones included): one per attempt, of Tune or Ray Train."""
    from ray.util.placement_group import placement_group_table

    return sum(1 for pg in placement_group_table().values()
               if pg["bundles"] and all(b == {"CPU": 1.0} for b in pg["bundles"].values()))


def _tune_failures(exp: Path) -> dict[str, int]:
    """{trial id: times Tune restarted it} from Tune's experiment state."""
    state = json.loads(max(exp.glob("experiment_state-*.json")).read_text())
    out = {}
    for _, runtime in state["trial_data"]:
        data = json.loads(runtime)
        out[data["last_result"]["trial_id"]] = data["num_failures"]
    return out


@pytest.mark.slow
def test_real_search_neither_retries_a_divergence_nor_a_config_error(ray_address, tmp_path, capsys):
    from search.run import main

    nan, bad = _checkpoints(tmp_path)
    unsearched = list(load_space(QUICKSTART).search)
    sets = [
        "experiment.num_samples=2", "experiment.max_concurrent_trials=1", "experiment.max_failures=2",
        "experiment.scheduler={kind: fifo}", "experiment.sampler={kind: random, seed: 0}", "experiment.confirm=null",
        "train.run.epochs=1", "train.run.log_every=1",
        "train.distributed.max_failures=2",  # Ray Train would restart the workers twice
        *(f"search.{k}=null" for k in unsearched),
        f"search.model.pretrained={{choice: [{nan}, {bad}]}}",
    ]
    # --verbose: the end-of-run table of every search trial with its reason
    args = ["--storage-path", str(tmp_path / "store"), "--name", "bad", "--address", ray_address, "--verbose"]
    for s in sets:
        args += ["--set", s]
    started = _worker_groups_started()
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 1, err[-3000:]  # no trial finished

    exp = tmp_path / "store" / "bad"
    results = {}
    for f in exp.glob("*/result.json"):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        results[rows[0]["config"]["model.pretrained"]] = rows
    assert set(results) == {str(nan), str(bad)}, "the sampler drew both checkpoints"
    diverged, failed = results[str(nan)], results[str(bad)]
    assert len(diverged) == len(failed) == 1  # one final result each, nothing more
    assert diverged[0]["run_status"] == "diverged" and diverged[0]["val_acc"] == 0.0
    assert diverged[0]["error"].startswith("diverged: non-finite loss at epoch 1, step 0")
    assert failed[0]["run_status"] == "failed"
    assert failed[0]["error"].startswith(f"model.pretrained {bad}: does not fit the model")
    ids = {k: rows[0]["trial_id"] for k, rows in results.items()}
    # one attempt each, although Tune and Ray Train could each have retried twice
    assert _tune_failures(exp) == {ids[str(nan)]: 0, ids[str(bad)]: 0}
    assert _worker_groups_started() - started == 2

    table = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in ids.values()}
    assert "diverged" in table[ids[str(nan)]] and diverged[0]["error"] in table[ids[str(nan)]]
    assert "failed" in table[ids[str(bad)]] and failed[0]["error"] in table[ids[str(bad)]]
    assert f"trial {ids[str(bad)]} failed (not retried): model.pretrained" in err
    assert f"trial {ids[str(nan)]} ended: diverged: non-finite loss" in err

    study = {t.user_attrs[TUNE_TRIAL_ID]: t for t in load_study(str(exp / "optuna.db"), "bad").get_trials()
             if TUNE_TRIAL_ID in t.user_attrs}  # not the proposals of a config that already failed (never trained)
    assert study[ids[str(nan)]].state == TrialState.COMPLETE and study[ids[str(nan)]].value == 0.0
    assert study[ids[str(nan)]].constraints == {"diverged": 1.0}
    assert study[ids[str(bad)]].state == TrialState.FAIL
