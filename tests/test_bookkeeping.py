"""What Tune, ASHA and Optuna record for a search, in seconds: the project's own searcher
(`search.study.make_searcher`) and scheduler (`search.run.make_scheduler`) drive a Tune
trainable that reports fixed curves instead of training."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import TrialState

from search.phases.schedulers import make_scheduler
from search.experiment.study import DUPLICATE_OF, DUPLICATE_RETRIES, DUPLICATES, RANDOM_RETRIES, TUNE_TRIAL_ID, load_study, make_searcher
from spaces import QUICKSTART, load_space

EPOCHS = 4


def curve(smoothing: float) -> list[float]:
    """val_acc per epoch: the higher the smoothing, the better at every epoch (so ASHA's
    choice is known), distinct per trial."""
    return [round(0.1 * e + smoothing, 6) for e in range(1, EPOCHS + 1)]


def fixed_curve(config: dict) -> None:
    from ray import tune

    for epoch, acc in enumerate(curve(config["label_smoothing"]), start=1):
        tune.report({"epoch": epoch, "val_acc": acc})


@pytest.fixture(scope="module")
def searched(ray_address, tmp_path_factory):
    from ray import tune

    storage = tmp_path_factory.mktemp("storage")
    space = load_space(
        QUICKSTART,
        [
            f"experiment.storage_path={storage}",
            "experiment.name=book",
            "experiment.num_samples=6",
            "experiment.sampler.kind=random",
            "experiment.scheduler.grace_period=1",
            "experiment.scheduler.reduction_factor=2",
            f"train.run.epochs={EPOCHS}",
            # one searched key: the fixed curves depend on it
            "search.mix.mode=null",
            "search.mix.mixup_alpha=null",
            "search.mix.cutmix_alpha=null",
            "search.augment.randaugment.enabled=null",
            "search.augment.randaugment.magnitude=null",
            "search.batch.global_batch=null",
            "experiment.scheduler.audit=0",  # ASHA's own decisions only (the audit: tests/test_answer.py)
        ],
    )
    db = str(Path(storage) / "optuna.db")
    tuner = tune.Tuner(
        tune.with_resources(fixed_curve, {"CPU": 0, "memory": 2**20}),
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(space, db),
            scheduler=make_scheduler(space),
            num_samples=space.experiment.num_samples,
            max_concurrent_trials=1,  # ASHA decides with the earlier trials' rungs known
        ),
        run_config=tune.RunConfig(name="book", storage_path=str(storage), verbose=0),
    )
    grid = tuner.fit()
    return space, grid, load_study(db, space.experiment.name)


def test_every_tune_trial_is_one_optuna_trial(searched):
    space, grid, study = searched
    tune_ids = sorted(r.metrics["trial_id"] for r in grid)
    study_ids = sorted(t.user_attrs[TUNE_TRIAL_ID] for t in study.trials if DUPLICATE_OF not in t.user_attrs)
    assert len(tune_ids) == space.experiment.num_samples
    assert study_ids == tune_ids
    # proposals identical to an earlier trial were not trained: FAIL, counted, never a Tune trial
    duplicates = [t for t in study.trials if DUPLICATE_OF in t.user_attrs]
    assert all(t.state == TrialState.FAIL and TUNE_TRIAL_ID not in t.user_attrs for t in duplicates)
    assert study.user_attrs.get(DUPLICATES, 0) == len(duplicates)
    # two values of one key, six trials: both are trained before any duplicate, which is
    # trained only once the samplers (TPE, then a random one) proposed nothing else over and over
    assert len(duplicates) >= DUPLICATE_RETRIES + RANDOM_RETRIES


def test_stopped_trials_are_pruned_and_finished_ones_complete_with_their_last_value(searched):
    _, grid, study = searched
    by_tune = {t.user_attrs[TUNE_TRIAL_ID]: t for t in study.trials if TUNE_TRIAL_ID in t.user_attrs}
    states = set()
    for r in grid:
        t = by_tune[r.metrics["trial_id"]]
        reported = curve(r.config["label_smoothing"])
        epochs = int(r.metrics["epoch"])
        assert t.params["label_smoothing"] == r.config["label_smoothing"]
        # every epoch the trial ran reached Optuna as an intermediate value at that epoch
        assert t.intermediate_values == {e: reported[e - 1] for e in range(1, epochs + 1)}
        if epochs < EPOCHS:
            assert t.state == TrialState.PRUNED, (epochs, t.state)
        else:
            assert t.state == TrialState.COMPLETE
            assert t.value == reported[-1]
        states.add(t.state)
    assert states == {TrialState.PRUNED, TrialState.COMPLETE}  # ASHA stopped some, not all

