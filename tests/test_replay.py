"""The replay (`benchmarks/replay`): the real searcher, scheduler, plans, verdict and verify
rule on a table of curves, checked on a tiny hand-made table against a hand-computed
outcome and against a real Tune run; the recorder against a real trial, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.replay.record import config_key, train_curve
from benchmarks.replay.replay import Table, null_table, replay_once, replay_search, replay_space, run_setting

TINY = {
    "space": "spaces/quickstart.yaml",
    "overrides": [
        "search.mix.mixup_alpha=null", "search.mix.cutmix_alpha=null", "search.mix.mode={choice: [none, cutmix]}",
        "search.augment.randaugment.enabled=null", "search.augment.randaugment.magnitude=null",
        "search.batch.global_batch=null", "train.run.epochs=3", "experiment.scheduler.grace_period=1",
        "experiment.num_samples=4",
        "experiment.scheduler.schedule=plain",  # one curve per run: the search's and the confirmation's
    ],
}
SEEDS = range(6)


def quality(values: dict) -> float:
    """The tiny table's truth: cutmix +3 pp, label smoothing +2 pp over 0.90."""
    return 0.90 + 0.03 * (values["mix.mode"] == "cutmix") + 0.02 * (values["label_smoothing"] == 0.1)


def seed_noise(seed: int) -> float:
    return 0.01 * ((seed * 7) % 5) / 5  # shared by every config on a seed: paired differences are exact


@pytest.fixture(scope="module")
def tiny() -> Table:
    t = Table("tiny", TINY, {})
    space = replay_space(t)
    for mode in ("none", "cutmix"):
        for ls in (0.0, 0.1):
            v = {"mix.mode": mode, "label_smoothing": ls}
            key = config_key(space, v)
            t.values[key] = space.full_values(v)
            # a curve rising 10 pp an epoch to its final value; epoch times differ per config
            t.curves[key] = {s: [(e, round(quality(v) - 0.1 * (3 - e) + seed_noise(s), 6), 1.0 + 0.1 * e + ls, None)
                                 for e in (1, 2, 3)] for s in SEEDS}
    return t


def test_the_replay_gives_the_hand_computed_answer(tiny):
    space = replay_space(tiny)
    base = config_key(space, space.base_values)
    truth = tiny.truth(base)
    best = config_key(space, {"mix.mode": "cutmix", "label_smoothing": 0.1})
    assert truth["best"] == best and truth["best_beats_baseline"]
    out = replay_once(space, tiny, truth, np.random.default_rng(1))
    # every seed ranks the configs the same way, so whatever TPE proposes first, four trials of
    # four configs train each once (the duplicate rule), the best is confirmed with the baseline
    # and beats it by exactly its true margin
    assert out["verdict"] == "winner" and out["answer"] == best and out["right"]
    assert out["reported_gain"] == pytest.approx(0.05, abs=1e-9) and out["true_gain"] == pytest.approx(0.05, abs=1e-9)
    assert out["duplicates"] == 0 and out["verify_fail"] is False
    # the best and the baseline, and the runner-up unless the baseline is the runner-up: x 3 seeds x 3 epochs
    assert out["confirm_epochs"] in (2 * 3 * 3, 3 * 3 * 3)
    assert out["ablation_epochs"] == 2 * 3 * 3  # two tricks, one at a time
    # ASHA (grace 1, factor 2): the first trial runs on, later ones stop at a rung unless in the top half
    assert 4 + 2 <= out["search_epochs"] <= 4 * 3


def test_racing_confirmation_stops_after_its_first_round_when_the_tiny_table_decides(tiny):
    """The real `SeedRounds` with racing: the tiny table's seed noise is shared by every config,
    so every paired difference is exact and its spread is the verdict's floor: sqrt(2) x the
    rounding spread of the table's step 0.002 (0.00082). After the first round (two seeds per
    config) the 95% CI of a difference is +-12.71 x 0.00082 / sqrt(2) = +-0.0073, so a
    candidate 2 or 3 pp below the best is dropped and the best's +5 pp over the baseline is
    decided: the phase stops at 2 seeds per config, 2/3 of a fixed 3-seed confirmation."""
    space = replay_space(tiny, ["experiment.confirm={top_k: 2, seeds: 3, racing: true}"])
    base = config_key(space, space.base_values)
    truth = tiny.truth(base)
    out = replay_once(space, tiny, truth, np.random.default_rng(1))
    assert out["verdict"] == "winner" and out["answer"] == truth["best"] and out["right"]
    assert out["reported_gain"] == pytest.approx(0.05, abs=1e-9) and out["weak"]  # two seeds: a weak verdict
    assert set(out["confirm_seeds_run"].values()) == {2} and len(out["confirm_seeds_run"]) == 3
    assert out["confirm_epochs"] == 2 * len(out["confirm_seeds_run"]) * 3
    assert out["confirm_vs_fixed3"] == pytest.approx(2 / 3)
    # the same replay without racing: every config on all 3 seeds, through the same SeedRounds
    fixed = replay_once(replay_space(tiny, ["experiment.confirm={top_k: 2, seeds: 3}"]), tiny, truth,
                        np.random.default_rng(1))
    assert set(fixed["confirm_seeds_run"].values()) == {3} and fixed["confirm_vs_fixed3"] == 1.0
    assert fixed["confirm_seeds_run"].keys() == out["confirm_seeds_run"].keys() and not fixed["weak"]
    # tau per rung (epochs 1 and 2): every seed ranks the configs as their true means do
    assert set(out["tau"]) == {1, 2} and all(t == pytest.approx(1.0) for t in out["tau"].values() if t == t)


def test_the_null_table_is_the_baselines_seeds_under_every_name(tiny):
    space = replay_space(tiny)
    base = config_key(space, space.base_values)
    null = null_table(tiny, base, seed=3)
    for key, by_seed in null.curves.items():
        assert sorted(map(str, by_seed.values())) == sorted(map(str, tiny.curves[base].values()))
    assert null.curves[base] == tiny.curves[base]
    fig = run_setting(null, {}, 3)
    assert fig["n"] == 3 and 0.0 <= fig["p_false_winner"][0] <= 1.0
    # every config's truth is the baseline's: no ranking to correlate a rung with
    assert set(fig["tau_rungs"]) == {"1", "2"} and all(t[0] != t[0] and t[3] == 0 for t in fig["tau_rungs"].values())


def test_concurrency_follows_the_recorded_epoch_times(tiny):
    space = replay_space(tiny, ["experiment.scheduler={kind: fifo}"])
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        run = replay_search(space, tiny, 0, 4, d)
    # four trials at once, fifo: every epoch of every trial; a trial with label smoothing 0.1
    # takes 0.1 s longer an epoch, so the first results to arrive are the smoothing-0 trials'
    assert run.trial_epochs == 4 * 3
    first = [tid for tid, epoch, _ in run.order[:2]]
    smoothing = {r.trial_id: r.values["label_smoothing"] for r in run.rows}
    assert [smoothing[t] for t in first] == [0.0, 0.0]
    clock_order = [(e, smoothing[t]) for t, e, _ in run.order]
    assert clock_order == sorted(clock_order, key=lambda p: (1.0 * p[0] + sum(0.1 * k for k in range(1, p[0] + 1))
                                                                + p[1] * p[0]))


def test_the_replay_makes_the_same_decisions_as_a_real_tuner(tiny, ray_address, tmp_path, monkeypatch):
    from ray import tune

    # Tune's own result files (a search in this process may have turned them off for its own)
    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)

    from search.experiment.audit import AuditLog, read_audit
    from search.experiment.folder import Experiment
    from search.experiment.sampling import sampled_values
    from search.experiment.study import TUNE_TRIAL_ID, load_study, make_searcher
    from search.experiment.trials import summarise
    from search.phases.confirm import confirm_plan
    from search.phases.schedulers import make_scheduler

    space = replay_space(tiny, ["experiment.num_samples=4", "experiment.scheduler.audit=0.5"])
    seed = 2
    curves = {k: v[seed] for k, v in tiny.curves.items()}
    keys = {json.dumps(space.full_values(sampled_values({"mix.mode": m, "label_smoothing": ls})), sort_keys=True):
            None for m in ("none", "cutmix") for ls in (0.0, 0.1)}
    assert set(keys) == set(curves)

    def fake_trial(config: dict) -> None:
        key = json.dumps(space.full_values(sampled_values(config)), sort_keys=True)
        for epoch, value, _, _ in curves[key]:
            tune.report({"epoch": epoch, "val_acc": value})

    folder = tmp_path / "real"
    folder.mkdir()
    exp = Experiment.at(str(folder))
    tuner = tune.Tuner(
        tune.with_resources(fake_trial, {"CPU": 0, "memory": 2**20}),
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(space, str(folder / "optuna.db"), audit=AuditLog(str(folder)).load),
            scheduler=make_scheduler(space, exp), num_samples=4, max_concurrent_trials=1),
        run_config=tune.RunConfig(name="real", storage_path=str(tmp_path / "tune"), verbose=0),
    )
    grid = tuner.fit()
    real = summarise(grid, space, audited=read_audit(exp))
    sim_folder = tmp_path / "sim"
    sim_folder.mkdir()
    sim_run = replay_search(space, tiny, seed, 1, str(sim_folder))
    sim = sim_run.rows

    def decisions(rows: list, study) -> list:
        # trials in the order they were proposed: their numbers in the study
        number = {t.user_attrs.get(TUNE_TRIAL_ID): t.number for t in study.trials}
        by_order = sorted(rows, key=lambda r: number[r.trial_id])
        return [(json.dumps(space.full_values(r.values), sort_keys=True), r.epochs, r.status, r.final, r.audited,
                 r.audited_at) for r in by_order]

    assert decisions(sim, sim_run.study) == decisions(real, load_study(str(folder / "optuna.db"),
                                                                      space.experiment.name))
    assert len(real) == 4 and sum(r.audited for r in real) >= 1  # the audit took part
    assert [(e.label, e.values) for e in confirm_plan(sim, space)] == [(e.label, e.values)
                                                                       for e in confirm_plan(real, space)]


@pytest.mark.slow
def test_a_recorded_curve_is_what_a_real_trial_reports(ray_address, tmp_path, monkeypatch):
    """One (config, seed) of the recorder, bit for bit against a search trial of it."""
    from ray import tune

    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)  # Tune's own result files

    from search.phases.trial import run_trial
    from spaces import load_space

    space = load_space("spaces/quickstart.yaml", [
        f"experiment.storage_path={tmp_path}", "train.data.subset=0.05", "train.run.epochs=2",
        "experiment.scheduler.grace_period=1", "train.run.seed=5"])
    values = {"mix.mode": "cutmix", "mix.cutmix_alpha": 1.0, "label_smoothing": 0.1,
              "augment.randaugment.enabled": True, "augment.randaugment.magnitude": 9, "batch.global_batch": 32}
    recorded = train_curve(space.trial_config(values), "val_acc")
    tuner = tune.Tuner(
        tune.with_parameters(run_trial, space=space, runs_path=str(tmp_path / "runs")),
        param_space=values,
        run_config=tune.RunConfig(name="one", storage_path=str(tmp_path / "tune"), verbose=0),
    )
    df = tuner.fit()[0].metrics_dataframe
    assert [(int(e), float(v)) for e, v in zip(df["epoch"], df["val_acc"])] == [(e, v) for e, v, _, _ in recorded]


def test_the_committed_table_holds_its_checksum_and_its_truths():
    from benchmarks.replay.replay import HERE, load_table, rebased

    table = load_table(HERE / "tables" / "quickstart.json.gz")  # checks the sha256 of its rows
    assert len(table.curves) == 8 and table.seeds == list(range(8))
    space = replay_space(table)
    base = config_key(space, space.base_values)
    assert not table.truth(base)["best_beats_baseline"]  # tricks do not pay on this proxy
    ra = rebased(table, "randaugment")
    ra_space = replay_space(ra)
    ra_base = config_key(ra_space, ra_space.base_values)
    assert json.loads(ra_base)["augment.randaugment.enabled"] is True and ra.curves is table.curves
    truth = ra.truth(ra_base)
    assert truth["best_beats_baseline"] and truth["best_gain"] >= 0.01


def test_the_committed_tricks_table_is_a_proxy_where_tricks_matter():
    """Table (b): 36 configs x 8 seeds on both schedules; its best beats the baseline by at
    least 1 pp (paired 95% CI excluding 0) and at least two tricks have main effects whose
    CIs exclude 0, so a timid answer ("no gain") is wrong on it."""
    from benchmarks.replay.replay import HERE, load_table, main_effects

    table = load_table(HERE / "tables" / "tricks.json.gz")  # checks the sha256 of its rows
    assert len(table.curves) == 36 and table.seeds == list(range(8))
    space = replay_space(table)
    assert table.search_curves(space) is table.rung and set(table.rung) == set(table.curves)
    base = config_key(space, space.base_values)
    truth = table.truth(base)
    assert truth["best_beats_baseline"] and truth["best_gain"] >= 0.01 and truth["best_gain_ci95"][0] > 0
    effects = main_effects(table, base)
    shown = [k for k, e in effects.items() if e["ci95"][0] > 0 or e["ci95"][1] < 0]
    assert len({k.split("=")[0] for k in shown}) >= 2, effects
