"""The answer's bookkeeping, in seconds: a search, its confirmation and its ablation run
through the real Tuner, searcher, audited ASHA and phase runner, with a launcher that
reports fixed curves (each trick adds a known amount), so the winner, the paired
differences, the per-trick deltas and the audit are known exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from search.answer.build import build_answer
from search.answer.decide import NO_GAIN, TIE, UNCONFIRMED, WINNER, decide, verdict_message
from search.answer.stats import rounding_floor
from search.experiment.phases import ABLATE, CONFIRM, Entry, Measured, ablation_matches, read_phase
from search.phases.confirm import ablation_plan, confirm_plan
from search.experiment.folder import experiment_for, record_space
from search.experiment.trials import TrialRow, summarise
from search.phases.schedulers import make_scheduler
from search.phases.trial import run_trial
from search.run import run_confirmation
from search.experiment.audit import AuditLog, read_audit
from search.experiment.study import AUDITED, load_study, make_searcher
from spaces import QUICKSTART, load_space

EPOCHS = 4
SEEDS = [1000, 1001, 1002]
EFFECT = {("mix.mode", "cutmix"): 0.04, ("mix.mode", "mixup"): 0.01, ("label_smoothing", 0.1): 0.02,
          ("augment.randaugment.enabled", True): -0.03}
"""What each trick adds to the final val_acc of the fake runs."""


def _get(cfg, path: str):
    node = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def final_score(cfg, seed: int) -> float:
    """The fake run's last-epoch val_acc: 0.5, plus each trick's effect, plus a seed offset
    shared by every config (so paired differences are exact)."""
    return 0.5 + sum(e for (k, v), e in EFFECT.items() if _get(cfg, k) == v) + 0.003 * (seed % 3)


def fake_launch(cfg, name: str, runs_path: str) -> None:
    """Report every repeat's epochs as a curve rising to `final_score`; count launches."""
    from ray import tune

    runs = Path(runs_path)
    runs.mkdir(parents=True, exist_ok=True)
    with (runs / "launches.txt").open("a") as f:
        f.write(name + "\n")
    for repeat in range(cfg.run.repeats):
        seed = cfg.run.seed + repeat
        for epoch in range(1, cfg.run.epochs + 1):
            tune.report({"epoch": epoch, "val_acc": final_score(cfg, seed) * epoch / cfg.run.epochs,
                         "seed": seed, "repeat": repeat, "restarts": str(cfg.schedule.restarts)})


@pytest.fixture(scope="module")
def answered(ray_address, tmp_path_factory):
    from ray import tune

    storage = tmp_path_factory.mktemp("storage")
    sets = [
        f"experiment.storage_path={storage}",
        "experiment.name=answer",
        "experiment.num_samples=8",
        "experiment.sampler={kind: random, seed: 3}",
        "experiment.scheduler={kind: asha, grace_period: 1, reduction_factor: 2, audit: 0.5}",
        "experiment.confirm={top_k: 2, seeds: 3}",
        f"train.run.epochs={EPOCHS}",
        "search.batch.global_batch=null",
    ]
    space = load_space(QUICKSTART, sets)
    exp = experiment_for(space)
    record_space(exp, space, sets)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, space=space, runs_path=exp.runs, launch=fake_launch),
                            {"CPU": 0, "memory": 2**20}),
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(space, exp.study_db, audit=AuditLog(exp.path).load),
            scheduler=make_scheduler(space, exp),
            num_samples=space.experiment.num_samples,
            max_concurrent_trials=1,  # ASHA decides with the earlier trials' rungs known
        ),
        run_config=tune.RunConfig(name=exp.name, storage_path=exp.storage, verbose=0),
    )
    grid = tuner.fit()
    rows = summarise(grid, space, audited=read_audit(exp))
    run_confirmation(space, exp, rows, concurrent=2, launch=fake_launch)
    launches = (Path(exp.runs) / "launches.txt").read_text().split()
    run_confirmation(space, exp, rows, concurrent=2, launch=fake_launch)  # as --resume does: nothing reruns
    assert (Path(exp.runs) / "launches.txt").read_text().split() == launches
    return space, exp, grid, rows, build_answer(exp, space)


def test_search_trials_anneal_at_every_rung_and_confirmation_runs_once_over_all_seeds(answered):
    space, exp, grid, _, _ = answered
    assert space.rung_epochs() == [1, 2]
    assert {r.metrics_dataframe["restarts"].iloc[0] for r in grid} == {"[1, 2]"}
    confirmed = read_phase(exp, CONFIRM, space)
    assert confirmed and all(m.seeds == SEEDS and m.status == "done" for m in confirmed)


def test_audited_trials_run_to_the_end_and_are_marked(answered):
    space, exp, _, rows, answer = answered
    audited = read_audit(exp)
    assert audited, "audit 0.5 audits the first trial ASHA stops"
    by_id = {r.trial_id: r for r in rows}
    for tid, rung in audited.items():
        assert rung in space.rung_epochs()
        assert by_id[tid].status == "done" and by_id[tid].epochs == EPOCHS and by_id[tid].audited
    study = load_study(exp.study_db, exp.name)
    marked = {t.user_attrs["tune_trial_id"]: t for t in study.trials if AUDITED in t.user_attrs}
    assert set(marked) == set(audited)
    assert all(t.state.name == "COMPLETE" for t in marked.values())
    assert {t["trial_id"] for t in answer["trials"] if t["audited"]} == set(audited)
    # every rung is audited over the trials that reached the end; curves rise the same way
    # for every trial, so the rung ranking is the final ranking
    assert [t["rung"] for t in answer["rung_tau"]] == [1, 2]
    from search.answer.build import MIN_TAU_TRIALS

    for t in answer["rung_tau"]:
        if t["n"] >= MIN_TAU_TRIALS:
            assert t["tau"] == pytest.approx(1.0)
        else:  # 8 search trials: too few ranked at a rung and run to the end for a tau
            assert t["tau"] is None and t["note"].startswith("too few trials")


def test_the_winner_is_the_best_confirmed_config_with_exact_paired_differences(answered):
    space, exp, _, rows, answer = answered
    plan = confirm_plan(rows, space)
    assert [e.label for e in plan][-1] == "baseline" and len(plan) == 3
    expected = {c["label"]: [final_score(space.config_for(c["config"]), s) for s in SEEDS] for c in answer["confirm"]}
    for c in answer["confirm"]:
        assert c["values"] == pytest.approx(expected[c["label"]]) and c["seeds"] == SEEDS
    ranked = sorted(expected, key=lambda k: -sum(expected[k]))
    best = ranked[0]
    assert answer["winner"]["label"] == best
    # every paired difference is exact: a tie only between equal scores, and the interval of
    # an exact difference is only as wide as the floor of one validation image's rounding
    tied = expected[ranked[1]] == pytest.approx(expected[best]) and ranked[1] != "baseline"
    assert answer["verdict"] == (TIE if tied else WINNER)
    gain = expected[best][0] - expected["baseline"][0]
    assert answer["vs_baseline"]["delta"] == pytest.approx(gain)
    lo, hi = answer["vs_baseline"]["ci95"]
    assert lo < gain < hi and hi - lo < 0.01
    equal = sum(1 for k in expected if expected[k] == pytest.approx(expected[best]))
    assert answer["p_best"][best] == pytest.approx(1.0 / equal)  # tied configs share every resample
    assert answer["budget"]["trial_epochs_confirm"] == EPOCHS * len(SEEDS) * (len(plan) + len(answer["ablation"]))


def test_the_ablation_gives_each_trick_its_own_effect(answered):
    space, exp, _, _, answer = answered
    winner = answer["winner"]["config"]
    tricks = {a["trick"]: a for a in answer["ablation"]}
    assert set(tricks) == set(answer["winner"]["changed"]) and tricks
    for trick, a in tricks.items():
        effect = next(e for (k, v), e in EFFECT.items() if k == trick and winner[k] == v)
        assert a["delta"] == pytest.approx(effect) and a["ci95"] == pytest.approx([effect, effect])
        assert a["values"] == pytest.approx([effect] * len(SEEDS))
    ablated = read_phase(exp, ABLATE, space)
    assert all(m.seeds == SEEDS for m in ablated)


def test_phases_are_kept_in_the_study_file_and_the_report_is_written(answered):
    from search.run import write_answer

    space, exp, _, _, _ = answered
    answer = write_answer(exp, space)
    confirm = load_study(exp.study_db, f"{exp.name}.confirm")
    assert len(confirm.trials) == len(answer["confirm"])
    assert all(t.user_attrs["seeds"] == SEEDS for t in confirm.trials)
    assert confirm.metric_names == ["mean val_acc over seeds"]  # optuna-dashboard's axis label
    assert load_study(exp.study_db, exp.name).metric_names == ["val_acc"]
    report = Path(exp.path) / "report"
    assert json.loads((report / "report.json").read_text())["verdict"] == answer["verdict"]
    md = (report / "report.md").read_text()
    assert answer["winner"]["label"] in md and "pp" in md
    assert (report / "confirmation.png").stat().st_size > 1000


# decide() on its own: the verdicts ----------------------------------------------------------------
def _measured(label: str, role: str, values: list[float], changed: dict | None = None) -> Measured:
    entry = Entry(label, role, {"mix.mode": "none", "label_smoothing": 0.0, **(changed or {})})
    return Measured(entry, label, seeds=SEEDS[: len(values)], values=values)


@pytest.fixture(scope="module")
def small_space():
    return load_space(QUICKSTART, ["search.batch.global_batch=null", "search.augment.randaugment.enabled=null",
                                   "search.augment.randaugment.magnitude=null", "experiment.confirm.top_k=2"])


def test_decide_winner_tie_no_gain_and_unconfirmed(small_space):
    base = _measured("baseline", "baseline", [0.90, 0.91, 0.92])
    strong = _measured("candidate 1", "candidate", [0.95, 0.96, 0.97], {"mix.mode": "cutmix", "label_smoothing": 0.1})
    close = _measured("candidate 2", "candidate", [0.951, 0.955, 0.972], {"label_smoothing": 0.1})
    far = _measured("candidate 2", "candidate", [0.92, 0.93, 0.94], {"label_smoothing": 0.1})
    d = decide([strong, far, base], small_space)
    assert d.verdict == WINNER and d.winner is strong and d.runner_up is far
    assert d.vs_runner_up["delta"] == pytest.approx(0.03)
    # tied with the best: the simpler config (one trick instead of two) is the answer
    d = decide([strong, close, base], small_space)
    assert d.verdict == TIE and d.winner is close
    noisy = _measured("candidate 1", "candidate", [0.93, 0.89, 0.935], {"mix.mode": "cutmix"})
    d = decide([noisy, base], small_space)
    assert d.verdict == NO_GAIN and d.winner is base
    one = [_measured("candidate 1", "candidate", [0.95], {"mix.mode": "cutmix"}), _measured("baseline", "baseline", [0.9])]
    assert decide(one, small_space).verdict == UNCONFIRMED


def test_a_tie_below_the_baseline_is_never_the_answer(small_space):
    # the reproduced case: candidate 2 (one trick) is "tied" with candidate 1 but 0.33 pp below the baseline
    base = _measured("baseline", "baseline", [0.950, 0.960, 0.970])
    c1 = _measured("candidate 1", "candidate", [0.980, 0.990, 1.000], {"mix.mode": "cutmix", "label_smoothing": 0.1})
    c2 = _measured("candidate 2", "candidate", [0.940, 0.975, 0.955], {"label_smoothing": 0.1})
    d = decide([c1, c2, base], small_space)
    # c1 - baseline is +0.03 on every seed: the floor (rounding to one image of 200, read from the
    # values: sd 0.005 / sqrt(12) a value, sqrt(2) times that a difference) keeps the interval
    # open, yet it excludes 0; c2 is not better than the baseline, so no tie
    assert d.verdict == WINNER and d.winner is c1
    half = 4.302652729911275 * 0.005 / 6 ** 0.5 / 3 ** 0.5
    assert d.vs_baseline["ci95"] == pytest.approx([0.03 - half, 0.03 + half], abs=1e-9)
    assert d.vs_baseline["adjusted"] <= d.vs_baseline["delta"]
    # without c1 the best is c2, not shown better than the baseline: no gain, the baseline answers
    d = decide([c2, base], small_space)
    assert d.verdict == NO_GAIN and d.winner is base


def test_a_tie_names_the_config_it_is_tied_with(small_space):
    base = _measured("baseline", "baseline", [0.90, 0.91, 0.92])
    best = _measured("candidate 1", "candidate", [0.95, 0.96, 0.97], {"mix.mode": "cutmix", "label_smoothing": 0.1})
    simple = _measured("candidate 2", "candidate", [0.951, 0.955, 0.972], {"label_smoothing": 0.1})
    d = decide([best, simple, base], small_space)
    assert d.verdict == TIE and d.winner is simple and d.runner_up is best
    assert d.vs_runner_up["ci95"][0] <= 0 <= d.vs_runner_up["ci95"][1]  # what "tied" says
    msg = verdict_message(d, small_space, None)
    assert msg.startswith("Tie: candidate 2") and "tied with candidate 1, the best by mean" in msg


@pytest.mark.parametrize("metric", ["val_acc", "val_loss"])
def test_a_diverged_seed_is_a_status_and_never_the_answer(metric):
    space = load_space(QUICKSTART, ["search.batch.global_batch=null", "search.augment.randaugment.enabled=null",
                                    "search.augment.randaugment.magnitude=null", f"experiment.metric={metric}",
                                    f"experiment.mode={'max' if metric == 'val_acc' else 'min'}"])
    sign = 1 if metric == "val_acc" else -1
    base = _measured("baseline", "baseline", [0.5 + sign * x for x in (0.30, 0.31, 0.32)])
    wild = _measured("candidate 1", "candidate", [0.5 + sign * x for x in (0.45, 0.46)], {"mix.mode": "cutmix"})
    wild.seeds, wild.diverged = SEEDS[:2], [SEEDS[2]]
    good = _measured("candidate 2", "candidate", [0.5 + sign * x for x in (0.40, 0.41, 0.42)], {"label_smoothing": 0.1})
    d = decide([wild, good, base], space)
    assert d.verdict == WINNER and d.winner is good and d.unstable == {"candidate 1": [SEEDS[2]]}
    assert f"candidate 1 is unstable (seed {SEEDS[2]}" in verdict_message(d, space, None)
    # an unstable baseline: no gain can be shown over it, and it is not the answer either
    base.values, base.seeds, base.diverged = base.values[:2], SEEDS[:2], [SEEDS[2]]
    d = decide([good, base], space)
    assert d.verdict == UNCONFIRMED and d.winner is good and "baseline is unstable" in d.reason


def _read_baseline_rows(space, rows: list[dict], tmp_path) -> list:
    """`read_phase` of a confirmation whose one Tune trial (the baseline) reported `rows`."""
    import pandas as pd

    from search.experiment.folder import Experiment

    class R:
        config = {"entry": {"label": "baseline", "role": "baseline", "values": space.base_values}}
        metrics = {"trial_id": "t1"}
        metrics_dataframe = pd.DataFrame(rows)
        error = None

    return read_phase(Experiment.at(str(tmp_path)), CONFIRM, space, results=[R()])


def test_diverged_seeds_are_read_as_a_status_from_the_phase(tmp_path):
    space = load_space(QUICKSTART, ["train.run.epochs=2"])
    seeds = space.confirm_seeds
    rows = [{"seed": seeds[0], "epoch": e, "val_acc": 0.9, "training_iteration": e} for e in (1, 2)]
    rows += [{"seed": seeds[1], "epoch": 1, "val_acc": 0.0, "run_status": "diverged", "training_iteration": 3}]
    rows += [{"seed": seeds[2], "epoch": e, "val_acc": 0.8, "training_iteration": 3 + e} for e in (1, 2)]

    (m,) = _read_baseline_rows(space, rows, tmp_path)
    assert m.values == [0.9, 0.8] and m.seeds == [seeds[0], seeds[2]] and m.diverged == [seeds[1]]
    assert m.status == "done"  # every seed ended; one of them as a status


def test_a_seed_run_restored_by_a_resumed_driver_is_read_to_its_last_epoch(tmp_path):
    """A seed-run killed with its driver and restored from its epoch-5 checkpoint reports
    epoch 6 with Tune's training_iteration counting from 1 again: its value is epoch 6's and
    the config is done (it was read as unfinished, and the experiment never ended)."""
    space = load_space(QUICKSTART, ["train.run.epochs=6"])
    seeds = space.confirm_seeds
    rows = [{"seed": s, "epoch": e, "val_acc": 0.1 * e, "training_iteration": e} for s in seeds[:-1] for e in range(1, 7)]
    # the last seed: epochs 1-4 by the killed driver, epoch 6 after the restore (its epoch-5
    # checkpoint came back without a report of epoch 5 in this file)
    rows += [{"seed": seeds[-1], "epoch": e, "val_acc": 0.1 * e, "training_iteration": e} for e in range(1, 5)]
    rows += [{"seed": seeds[-1], "epoch": 6, "val_acc": 0.92, "training_iteration": 1}]

    (m,) = _read_baseline_rows(space, rows, tmp_path)
    assert m.seeds == list(seeds) and m.values[-1] == 0.92 and m.status == "done"


def test_no_baseline_result_is_unconfirmed_with_the_reason(small_space):
    c1 = _measured("candidate 1", "candidate", [0.95, 0.96, 0.97], {"mix.mode": "cutmix"})
    base = _measured("baseline", "baseline", [0.90])
    base.status = "unfinished"
    d = decide([c1, base], small_space)
    assert d.verdict == UNCONFIRMED and d.reason == "the baseline has not finished every seed yet"
    assert verdict_message(d, small_space, None).startswith("Unconfirmed: the baseline has not finished")
    base.status, base.error = "failed", "DataError: bad image"
    assert decide([c1, base], small_space).reason == "the baseline failed: DataError: bad image"
    assert decide([c1], small_space).reason == "the confirmation has no baseline"


def test_two_seeds_give_a_weak_verdict(small_space):
    base = _measured("baseline", "baseline", [0.90, 0.91])
    c1 = _measured("candidate 1", "candidate", [0.97, 0.98], {"mix.mode": "cutmix"})
    d = decide([c1, base], small_space)
    assert d.weak and "Weak: only 2 seeds" in verdict_message(d, small_space, None)
    assert not decide([_measured("baseline", "baseline", [0.9, 0.91, 0.92])], small_space).weak


def test_a_stale_ablation_is_recognised(small_space):
    winner = Entry("candidate 1", "candidate", {"mix.mode": "cutmix", "label_smoothing": 0.1})
    plan = ablation_plan(winner, small_space)
    assert ablation_matches(plan, winner, small_space) and ablation_matches([], winner, small_space)
    other = Entry("candidate 2", "candidate", {"mix.mode": "mixup", "label_smoothing": 0.1})
    assert not ablation_matches(ablation_plan(other, small_space), winner, small_space)
    assert not ablation_matches(plan[:1], winner, small_space)  # a trick missing
    assert not ablation_matches(plan, Entry("candidate 3", "candidate", {"mix.mode": "cutmix",
                                                                           "label_smoothing": 0.0}), small_space)


def test_verify_fails_5_percent_of_no_change_runs_and_never_on_a_zero_width_interval():
    import numpy as np

    from search.export import verify_rule

    rng = np.random.default_rng(5)
    runs, fails = 4000, 0
    for _ in range(runs):  # nothing changed: confirmation and verify seeds from one distribution (360 images)
        conf = np.round(rng.normal(0.95, 0.006, 3) * 360) / 360
        fresh = np.round(rng.normal(0.95, 0.006, 2) * 360) / 360
        fails += not verify_rule(list(conf), list(fresh), 1 / 360 / 12 ** 0.5, (0.0, 1.0))[0]
    assert 0.03 <= fails / runs <= 0.07  # binomial sd 0.0034
    # three identical confirmed seeds: the old CI rule had width 0 and failed every time
    inside, (lo, hi) = verify_rule([0.95, 0.95, 0.95], [0.95 + 1 / 360, 0.95], 1 / 360 / 12 ** 0.5, (0.0, 1.0))
    assert inside and hi - lo > 0
    assert not verify_rule([0.9, 0.91, 0.92], [float("nan"), 0.91])[0]  # a diverged verify seed fails


@pytest.mark.parametrize("state, verdict, why", [
    ("finished", WINNER, None),
    ("finished", NO_GAIN, None),
    ("confirming", WINNER, "the experiment is still confirming, so its verdict can still change"),
    ("finished", UNCONFIRMED, "the verdict is unconfirmed (the baseline has not finished every seed yet)"),
])
def test_export_refuses_an_answer_that_is_not_final(state, verdict, why):
    from search.export import not_final_reason

    answer = {"state": state, "verdict": verdict, "verdict_reason": "the baseline has not finished every seed yet"}
    assert not_final_reason(answer) == why


def test_rung_tau_uses_only_trials_ranked_at_the_rung_weighted_for_the_audit():
    from scipy.stats import kendalltau

    from search.answer.build import MIN_TAU_TRIALS, _rung_audit
    from search.answer.stats import weighted_tau

    space = load_space(QUICKSTART, ["train.run.epochs=4", "experiment.scheduler.grace_period=1",
                                    "experiment.scheduler.audit=0.25"])
    assert space.rung_epochs() == [1, 2]

    def row(i: int, rung1: float, rung2: float, final: float, audited_at: int | None = None) -> TrialRow:
        return TrialRow(f"t{i}", {}, final, 4, "done", final, audited=audited_at is not None, audited_at=audited_at,
                        curve=[(1, rung1), (2, rung2), (4, final)])

    promoted = [row(i, 0.5 + 0.01 * i, 0.6 + 0.01 * i, 0.7 + 0.01 * ((i * 3) % 8)) for i in range(8)]
    at1 = row(8, 0.40, 0.9, 0.99, audited_at=1)  # stopped at rung 1: never ranked at rung 2
    at2 = row(9, 0.45, 0.55, 0.50, audited_at=2)
    taus, _ = _rung_audit([*promoted, at1, at2], space)
    r1, r2 = taus
    assert r1["n"] == 10 and r2["n"] == 9  # the trial audited at rung 1 is left out at rung 2
    rows2 = [*promoted, at2]
    assert r2["tau"] == pytest.approx(weighted_tau([dict(r.curve)[2] for r in rows2], [r.final for r in rows2],
                                                   [1.0] * 8 + [4.0]), abs=1e-12)
    # an audited trial stands for 1/0.25 = 4 stopped ones: not scipy's unweighted tau
    assert r2["tau"] != pytest.approx(kendalltau([dict(r.curve)[2] for r in rows2], [r.final for r in rows2]).statistic)
    few, _ = _rung_audit(promoted[: MIN_TAU_TRIALS - 1], space)
    assert all(t["tau"] is None and t["note"].startswith("too few trials (7 ranked") for t in few)


def test_plans_dedupe_configs_and_ablate_a_trick_with_its_children(small_space):
    rows = [
        TrialRow("a", {"mix.mode": "cutmix", "mix.cutmix_alpha": 0.7, "label_smoothing": 0.1}, 0.9, EPOCHS, "done", 0.9),
        TrialRow("b", {"mix.mode": "cutmix", "mix.cutmix_alpha": 0.7, "label_smoothing": 0.1}, 0.8, EPOCHS, "done", 0.8),
        TrialRow("c", {"mix.mode": "none", "label_smoothing": 0.0}, 0.7, EPOCHS, "done", 0.7),
        TrialRow("d", {"mix.mode": "mixup", "mix.mixup_alpha": 0.3, "label_smoothing": 0.0}, 0.95, 2, "stopped early", 0.95),
    ]
    plan = confirm_plan(rows, small_space)
    # d was stopped early; b repeats a; c is the baseline itself
    assert [(e.label, e.search_trial) for e in plan] == [("candidate 1", "a"), ("baseline", "c")]
    ablations = {e.trick: e.values for e in ablation_plan(plan[0], small_space)}
    assert set(ablations) == {"mix.mode", "label_smoothing"}
    assert ablations["mix.mode"]["mix.mode"] == "none" and ablations["mix.mode"]["mix.cutmix_alpha"] == 1.0
    assert ablations["mix.mode"]["label_smoothing"] == 0.1


# The export ---------------------------------------------------------------------------------------
def test_export_takes_the_confirmed_winner_with_its_evidence_and_production_settings(answered, tmp_path, capsys):
    import yaml

    from search.export import main

    space, exp, _, _, answer = answered
    out = tmp_path / "best.yaml"
    assert main(["--experiment", exp.path, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(out.read_text())
    prov = data.pop("provenance")
    w = answer["winner"]
    assert prov["label"] == w["label"] and prov["verdict"] == answer["verdict"]
    assert prov["mean"] == pytest.approx(w["mean"]) and prov["ci95"] == pytest.approx(w["ci95"])
    assert prov["seeds"] == SEEDS and prov["values"] == pytest.approx(w["values"])
    assert prov["searched"] == w["config"]
    # the space's production section replaces the search budget, and says so
    assert data["run"]["epochs"] == space.production["run.epochs"] and data["run"]["repeats"] == 1
    assert data["run"]["seed"] == 0 and data["schedule"]["restarts"] == []
    assert f"run.epochs: {EPOCHS} -> {space.production['run.epochs']} (production)" in printed
    for key, value in w["config"].items():
        node = data
        for part in key.split("."):
            node = node[part]
        assert node == value
    # --rank 2: the next config of the confirmation table by mean
    second = tmp_path / "second.yaml"
    assert main(["--experiment", exp.path, "--out", str(second), "--rank", "2"]) == 0
    assert yaml.safe_load(second.read_text())["provenance"]["label"] != w["label"]


def test_without_a_production_section_the_subset_is_reset_and_the_epochs_named(tmp_path):
    space = load_space(QUICKSTART, ["production=null", "train.data.subset=0.3"])
    cfg, lines = space.production_config(space.confirm_config({"mix.mode": "cutmix"}))
    assert cfg.data.subset == 1.0 and cfg.run.repeats == 1 and cfg.mix.mode == "cutmix"
    assert lines[0] == "data.subset: 0.3 -> 1.0 (production)"
    assert lines[1].startswith(f"run.epochs: {space.train.run.epochs} kept from the search budget")


class _FakeResult:
    def __init__(self, values: list[float], epochs: int):
        import pandas as pd

        self.metrics_dataframe = pd.DataFrame(
            [{"seed": 3003 + i, "epoch": e, "val_acc": v * e / epochs} for i, v in enumerate(values)
             for e in range(1, epochs + 1)])


@pytest.mark.parametrize("inside", [True, False])
def test_verify_says_whether_fresh_seeds_land_in_the_confirmed_interval(answered, tmp_path, monkeypatch, capsys, inside):
    import search.export as export
    import trainable.train

    space, exp, _, _, answer = answered
    floor = rounding_floor([v for c in answer["confirm"] for v in c["values"]])
    _, (lo, hi) = export.verify_rule(answer["winner"]["values"], [0.5, 0.5], floor, (0.0, 1.0))
    mid = answer["winner"]["mean"]
    values = [mid, mid] if inside else [min(hi + 0.01, 1.0)] * 2
    assert hi < 1.0 or inside
    trained = []

    class Trainer:
        def __init__(self, cfg, name, storage):
            trained.append(cfg)

        def fit(self):
            return _FakeResult(values, EPOCHS)

    monkeypatch.setattr(trainable.train, "build_trainer", Trainer)
    monkeypatch.setattr("trainable.cluster.connect", lambda address=None: None)
    rc = export.main(["--experiment", exp.path, "--out", str(tmp_path / "v.yaml"), "--verify"])
    out = capsys.readouterr().out
    assert rc == (0 if inside else 1), out
    cfg = trained[0]
    assert cfg.run.repeats == 2 and cfg.run.seed not in SEEDS and cfg.run.epochs == EPOCHS  # the confirmation budget
    line = out.strip().splitlines()[-1]
    assert line.startswith("verify: val_acc") and ("inside" if inside else "outside") in line
    assert "prediction interval" in line
    assert f"{sum(values) / 2:.4f}" in line and f"[{lo:.4f}, {hi:.4f}]" in line


def test_a_tie_with_a_config_that_is_not_the_best_without_some_tricks_answers_the_best(small_space):
    """Tied with the best by mean, a config that changes a trick the best does not (here
    cutmix instead of label smoothing) is no simpler an answer: the best answers, as a tie."""
    base = _measured("baseline", "baseline", [0.90, 0.91, 0.92])
    best = _measured("candidate 1", "candidate", [0.955, 0.965, 0.975], {"label_smoothing": 0.1})
    other = _measured("candidate 2", "candidate", [0.951, 0.955, 0.972], {"mix.mode": "cutmix"})
    d = decide([best, other, base], small_space)
    assert d.verdict == TIE and d.winner is best and d.runner_up is other
    assert d.vs_runner_up["ci95"][0] <= 0 <= d.vs_runner_up["ci95"][1]
    msg = verdict_message(d, small_space, None)
    assert msg.startswith("Tie: candidate 1") and "the best by mean, is statistically tied with candidate 2" in msg
    # the best with one more trick than a tied sub-config: the sub-config answers
    more = _measured("candidate 3", "candidate", [0.956, 0.966, 0.976], {"label_smoothing": 0.1, "mix.mode": "cutmix"})
    d = decide([more, best, base], small_space)
    assert d.verdict == TIE and d.winner is best and d.runner_up is more
