"""The confirmation's seeds in rounds (`search.phases.confirm.SeedRounds`): one Tune trial
per (config, seed), every config's first seed before any config's second; with racing, the
configs shown worse than the best stop early and the phase ends once the answer is clear."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from search.experiment.phases import BASELINE, CONFIRM, ROUNDS_FILE, Entry, read_phase
from search.phases.confirm import SeedRounds, racing_decided, racing_survivors
from spaces import QUICKSTART, load_space

SEEDS = [1000, 1001, 1002, 1003]
EPOCHS = 3


def _entries(*labels: str) -> list[dict]:
    return [asdict(Entry(label, BASELINE if label == BASELINE else "candidate", {})) for label in labels]


def _drive(searcher: SeedRounds, score, concurrent: int = 2) -> list[tuple[str, int]]:
    """Run the searcher as Tune would with `concurrent` slots, the oldest trial ending first;
    `score(label, seed)` is each run's last value (None: the run diverged)."""
    order, running, n = [], [], 0
    while True:
        while len(running) < concurrent:
            n += 1
            got = searcher.suggest(f"t{n}")
            if got == SeedRounds.FINISHED or got is None:
                break
            running.append((f"t{n}", got["entry"]["label"], got["seed"]))
            order.append((got["entry"]["label"], got["seed"]))
        if got == SeedRounds.FINISHED and not running:
            return order
        assert running, "the searcher waits on nothing"
        tid, label, seed = running.pop(0)
        value = score(label, seed)
        result = {"val_acc": value, "epoch": EPOCHS} if value is not None else {
            "val_acc": 0.0, "epoch": 1, "run_status": "diverged"}
        searcher.on_trial_complete(tid, result)


def _searcher(labels, racing, tmp_path=None, seeds=SEEDS) -> SeedRounds:
    return SeedRounds(_entries(*labels), seeds, "val_acc", "max", EPOCHS, racing=racing,
                      phase_dir=str(tmp_path) if tmp_path else None)


NOISE = {1000: 0.0, 1001: 0.01, 1002: -0.005, 1003: 0.004}


def test_without_racing_every_config_runs_every_seed_in_rounds(tmp_path):
    order = _drive(_searcher(["candidate 1", "candidate 2", BASELINE], False, tmp_path),
                   lambda label, seed: 0.9 + NOISE[seed])
    assert order == [(label, seed) for seed in SEEDS for label in ("candidate 1", "candidate 2", BASELINE)]
    ran = json.loads((tmp_path / ROUNDS_FILE).read_text())["seeds"]
    assert ran == {label: SEEDS for label in ("candidate 1", "candidate 2", BASELINE)}


def test_racing_drops_a_clear_loser_after_two_seeds_and_keeps_the_baseline(tmp_path):
    means = {"candidate 1": 0.95, "candidate 2": 0.80, BASELINE: 0.94}
    # candidate 1 and the baseline stay within seed noise of each other: the race goes on
    jitter = {("candidate 1", 1000): 0.0, ("candidate 1", 1001): 0.02, ("candidate 1", 1002): -0.01,
              ("candidate 1", 1003): 0.0}
    order = _drive(_searcher(list(means), True, tmp_path),
                   lambda label, seed: means[label] + NOISE[seed] + jitter.get((label, seed), 0.0))
    assert order[:6] == [(label, seed) for seed in SEEDS[:2] for label in means]
    assert not any(label == "candidate 2" for label, _ in order[6:])
    ran = json.loads((tmp_path / ROUNDS_FILE).read_text())["seeds"]
    assert ran["candidate 2"] == SEEDS[:2] and ran[BASELINE] == SEEDS and ran["candidate 1"] == SEEDS
    assert len(order) == 2 * 3 + 2 * 2  # 10 of the 12 seed-runs a fixed confirmation trains


def test_racing_stops_when_one_candidate_clearly_beats_the_baseline():
    means = {"candidate 1": 0.97, "candidate 2": 0.70, BASELINE: 0.70}
    order = _drive(_searcher(list(means), True), lambda label, seed: means[label] + NOISE[seed])
    # after two seeds candidate 2 is 0.27 below the best on both (shown worse: it drops) and
    # candidate 1 is 0.27 above the baseline on both (shown better, even with the spread
    # floored at the values' 0.01 step): the phase ends
    assert len(order) == 6


def test_racing_floors_the_spread_so_equal_differences_are_not_certainty():
    # the values move in steps of 0.01 (100 validation images): a gain of 0.03 on both of two
    # seeds is not shown (the floored interval is wider), so the race goes on to the next seed
    means = {"candidate 1": 0.93, BASELINE: 0.90}
    order = _drive(_searcher(list(means), True), lambda label, seed: means[label] + NOISE[seed])
    assert len(order) > 4


@pytest.mark.parametrize("a, b", [([0.93, 0.95, 0.94], [0.90, 0.93, 0.90]), ([0.95, 0.96], [0.93, 0.94])])
def test_racing_intervals_are_the_verdicts(a, b):
    from search.answer.decide import paired_gain, spread_floor
    from search.answer.stats import paired_difference
    from search.experiment.phases import Measured

    seeds = SEEDS[:len(a)]
    ma = Measured(Entry("candidate 1", "candidate", {}), "t1", seeds, a)
    mb = Measured(Entry(BASELINE, BASELINE, {}), "t2", seeds, b)
    verdict = paired_gain(ma, mb, 1.0, spread_floor([ma, mb], load_space(QUICKSTART)))
    s = _searcher(["candidate 1", BASELINE], True)
    s.scores = {"candidate 1": dict(zip(seeds, a)), BASELINE: dict(zip(seeds, b))}
    assert s.paired_floor() > 0
    race = paired_difference(a, b, floor=s.paired_floor())
    assert race.ci95 == pytest.approx(tuple(verdict["ci95"]), abs=1e-12)


def test_racing_drops_a_config_with_a_diverged_seed():
    scores = {"candidate 1": {1000: 0.95, 1001: None}, "candidate 2": {1000: 0.93, 1001: 0.94},
              BASELINE: {1000: 0.90, 1001: 0.91}}
    assert racing_survivors(scores, BASELINE, 1.0) == ["candidate 2", BASELINE]


def test_racing_rules_by_hand():
    tied = {"a": {1: 0.90, 2: 0.95}, "b": {1: 0.93, 2: 0.91}, BASELINE: {1: 0.92, 2: 0.92}}
    assert racing_survivors(tied, BASELINE, 1.0) == ["a", "b", BASELINE]
    assert not racing_decided(tied, ["a", "b", BASELINE], BASELINE, 1.0)
    # lower is better (a loss): "a" is clearly the worst and drops; the baseline never does
    loss = {"a": {1: 2.0, 2: 2.1}, "b": {1: 1.0, 2: 1.1}, BASELINE: {1: 3.0, 2: 3.1}}
    alive = racing_survivors(loss, BASELINE, -1.0)
    assert alive == ["b", BASELINE]
    assert racing_decided(loss, alive, BASELINE, -1.0)
    assert racing_decided({BASELINE: {1: 0.9, 2: 0.9}}, [BASELINE], BASELINE, 1.0)


def test_a_searcher_saved_mid_round_continues_where_it_stopped(tmp_path):
    s = _searcher(["candidate 1", BASELINE], True)
    first = s.suggest("t1")
    s.save(str(tmp_path / "state.pkl"))
    again = _searcher(["candidate 1", BASELINE], True)
    again.restore(str(tmp_path / "state.pkl"))
    assert again.running == {"t1": (first["entry"]["label"], first["seed"])}
    assert again.suggest("t2") == s.suggest("t2")


@pytest.mark.parametrize("racing", [False, True])
def test_read_phase_expects_the_seeds_each_config_ran(ray_address, tmp_path, racing):
    """Through Tune with a fake training: the phase's configs are done with the seeds the
    rounds gave them, and the dropped config is not left 'unfinished'."""
    from search.experiment.folder import experiment_for, record_space
    from search.phases.confirm import run_phase

    effect = {"candidate 1": 0.08, "candidate 2": -0.2, BASELINE: 0.0}
    offsets = {1000: 0.0, 1001: 0.013, 1002: -0.007}

    def launch(cfg, name, runs_path):
        from ray import tune

        label = next(k for k, v in labels.items() if v == cfg.label_smoothing)
        for epoch in range(1, cfg.run.epochs + 1):
            tune.report({"epoch": epoch, "val_acc": 0.85 + effect[label] + offsets[cfg.run.seed], "seed": cfg.run.seed})

    labels = {"candidate 1": 0.1, "candidate 2": 0.05, BASELINE: 0.0}
    sets = [f"experiment.storage_path={tmp_path}", "experiment.name=rounds", f"train.run.epochs={EPOCHS}",
            f"experiment.confirm={{top_k: 2, seeds: 3, racing: {str(racing).lower()}}}",
            "search.label_smoothing={choice: [0.0, 0.05, 0.1]}"]
    space = load_space(QUICKSTART, sets)
    exp = experiment_for(space)
    record_space(exp, space, sets)
    entries = [Entry(k, BASELINE if k == BASELINE else "candidate", space.full_values({"label_smoothing": v}))
               for k, v in labels.items()]
    run_phase(space, exp, CONFIRM, entries, concurrent=2, launch=launch)
    measured = {m.entry.label: m for m in read_phase(exp, CONFIRM, space)}
    assert all(m.status == "done" for m in measured.values())
    if racing:  # candidate 2 is 0.28 below after two seeds, candidate 1 0.08 above the baseline
        assert measured["candidate 2"].seeds == [1000, 1001] and measured["candidate 1"].seeds == [1000, 1001]
        assert measured[BASELINE].seeds == [1000, 1001]
    else:
        assert all(m.seeds == [1000, 1001, 1002] for m in measured.values())
