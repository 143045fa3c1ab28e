"""Replay: the real decision code of a search run against a table of recorded curves
(`benchmarks.replay.record`) instead of training, many times, to measure how often the
answer is right.

What runs is the project's own: the searcher (`make_searcher`: Optuna TPE behind Ray's
OptunaSearch, with the duplicate rule), the scheduler (`make_scheduler`: the audited ASHA,
its audit written to `scheduler/audit.json` in a scratch experiment folder), the trial rows
(`summarise`), the confirmation and ablation plans (`confirm_plan`, `ablation_plan`), the
confirmation's rounds of seeds (`SeedRounds`, racing when the space says so) and its reader
(`read_phase`), the verdict (`decide`), the gain over the baseline and `--verify`'s rule (`verify_rule`). Only
Ray's executor is replaced: a simulated clock drives the searcher and the scheduler through
their public callbacks in the order Tune's controller calls them (scheduler first, then the
searcher unless the trial is stopped; at a trial's end the scheduler's and the searcher's
`on_trial_complete`), with `concurrency` trials at once, each epoch taking its recorded time,
so which trial reports first follows the recorded epoch times. A test checks that one trial
at a time it makes exactly the decisions a real `Tuner` run makes (tests/test_replay.py).

Seeds: one replay draws a random order of the table's seeds; the search trains on the first
(every search trial on the same seed, as a search does), the confirmation on the next
`confirm.seeds` (with racing: the first of them, as its rounds ask), `--verify` on the next
2: disjoint.

    python -m benchmarks.replay.replay --table quickstart --n 200
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent

VERIFY_SEEDS = 2
RIGHT_WITHIN = 0.005  # the answer's true mean within 0.5 pp of the true best


# The table -------------------------------------------------------------------------------------------
@dataclass
class Table:
    """Recorded curves: config key -> seed -> [(epoch, metric, seconds, run_status)]."""

    name: str
    recipe: dict[str, Any]
    curves: dict[str, dict[int, list[tuple[int, float, float, str | None]]]]
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    rung: dict[str, dict[int, list[tuple[int, float, float, str | None]]]] | None = None
    """The same runs under the rung schedule (the cosine restarted at the recipe's rungs),
    where the recipe recorded it."""

    def search_curves(self, space: Any) -> dict[str, dict[int, list[tuple[int, float, float, str | None]]]]:
        """The curves a search trial of `space` reports: the rung schedule's where the space's
        ASHA runs it (the table must have it, recorded at the same rungs), else the plain ones."""
        s = space.experiment.scheduler
        if s.kind == "fifo" or s.schedule != "rung":
            return self.curves
        recipe = replay_space(Table(self.name, {**self.recipe, "replay_overrides": []}, {}))
        recorded = recipe.experiment.scheduler
        if self.rung is None or recorded.schedule != "rung" or (
                recorded.rungs(recipe.train.run.epochs) != s.rungs(space.train.run.epochs)):
            raise ValueError(f"table {self.name}: no rung-schedule curves at the rungs of this space "
                             f"({s.rungs(space.train.run.epochs)}); replay it with experiment.scheduler.schedule=plain")
        return self.rung

    @property
    def seeds(self) -> list[int]:
        return sorted(set.intersection(*(set(c) for c in self.curves.values())))

    def final(self, key: str, seed: int) -> float:
        """The confirmation's score: the metric at the last epoch (nan when the run diverged)."""
        last = self.curves[key][seed][-1]
        return math.nan if last[3] else float(last[1])

    def truth(self, baseline: str) -> dict[str, Any]:
        """Each config's mean over every recorded seed, the best, and whether the best beats
        the baseline (paired 95% CI over all seeds excludes 0)."""
        from search.answer.stats import paired_difference

        seeds = self.seeds
        means = {k: float(np.nanmean([self.final(k, s) for s in seeds])) for k in self.curves}
        best = max(means, key=means.get)  # type: ignore[arg-type]
        d = paired_difference([self.final(best, s) for s in seeds], [self.final(baseline, s) for s in seeds])
        return {"means": means, "best": best, "best_beats_baseline": d.ci95[0] > 0 and best != baseline,
                "best_gain": d.mean, "best_gain_ci95": list(d.ci95)}


def main_effects(table: Table, baseline: str) -> dict[str, dict[str, Any]]:
    """Each searched key's main effect over the grid, per value that differs from the
    baseline's: per seed, the mean final score of the configs with that value minus the mean
    of those with the baseline's value (all other keys averaged over the grid), with its mean
    and paired 95% CI over the seeds ("key=value" -> {"mean", "ci95"})."""
    from search.answer.stats import summarise_values

    base = table.values[baseline]
    out: dict[str, dict[str, Any]] = {}
    for key in base:
        for value in sorted({json.dumps(v[key]) for v in table.values.values()} - {json.dumps(base[key])}):
            with_v = [k for k, v in table.values.items() if json.dumps(v[key]) == value]
            with_b = [k for k, v in table.values.items() if v[key] == base[key]]
            per_seed = [float(np.nanmean([table.final(k, s) for k in with_v]) - np.nanmean([table.final(k, s) for k in with_b]))
                        for s in table.seeds]
            summary = summarise_values(per_seed)
            out[f"{key}={json.loads(value)}"] = {"mean": summary.mean, "ci95": list(summary.ci95)}
    return out


def load_table(path: str | Path) -> Table:
    import hashlib

    with gzip.open(path, "rt") as f:
        data = json.load(f)
    body = json.dumps(data["rows"], sort_keys=True, separators=(",", ":"))
    if hashlib.sha256(body.encode()).hexdigest() != data["sha256"]:
        raise ValueError(f"{path}: checksum mismatch")
    curves: dict[str, dict[int, list[Any]]] = {}
    rung: dict[str, dict[int, list[Any]]] = {}
    values: dict[str, dict[str, Any]] = {}
    for row in data["rows"]:
        curves.setdefault(row["config"], {})[int(row["seed"])] = [tuple(p) for p in row["plain"]]
        if "rung" in row:
            rung.setdefault(row["config"], {})[int(row["seed"])] = [tuple(p) for p in row["rung"]]
        values[row["config"]] = row["values"]
    return Table(data["name"], data["recipe"], curves, values, rung or None)


def null_table(table: Table, baseline: str, seed: int = 0) -> Table:
    """No config differs from the baseline: every config's curve at seed s is the baseline's
    own run at another of its seeds (a fixed random permutation per config; the baseline
    keeps its own), so every config is a draw from the baseline's seed distribution."""
    rng = np.random.default_rng(seed)
    seeds = table.seeds
    curves, rung = {}, {}
    for key in table.curves:
        perm = seeds if key == baseline else [seeds[i] for i in rng.permutation(len(seeds))]
        curves[key] = {s: table.curves[baseline][p] for s, p in zip(seeds, perm)}
        if table.rung is not None:  # the same run under both schedules
            rung[key] = {s: table.rung[baseline][p] for s, p in zip(seeds, perm)}
    return Table(f"{table.name} (null)", table.recipe, curves, dict(table.values), rung or None)


REBASES: dict[str, list[str]] = {
    # the baseline with RandAugment on: the same recorded runs (every searched key is set by a
    # config's values, so each config trains the same TrainConfig whatever the base), where
    # the true best beats the baseline (turning RandAugment off: +4.9 pp, paired 95% CI 1.2 to
    # 8.5 over 8 seeds on the quickstart table) and two tricks have effects whose CIs exclude 0
    "randaugment": ["train.augment.randaugment.enabled=true"],
}


def rebased(table: Table, name: str) -> Table:
    """The table with the space's base (the baseline) moved (`REBASES`)."""
    recipe = {**table.recipe, "replay_overrides": [*table.recipe.get("replay_overrides", []), *REBASES[name]]}
    return Table(f"{table.name} (baseline: {name})", recipe, table.curves, table.values, table.rung)


# The simulated executor --------------------------------------------------------------------------------
class FakeTrial:
    """What the scheduler reads of a Tune trial."""

    def __init__(self, trial_id: str, config: dict[str, Any]) -> None:
        self.trial_id, self.config, self.status = trial_id, config, "RUNNING"

    def __repr__(self) -> str:
        return self.trial_id


class FakeResult:
    """What `summarise` reads of a Tune result."""

    def __init__(self, trial_id: str, config: dict[str, Any], reports: list[dict[str, Any]]) -> None:
        import pandas as pd

        self.config, self.error, self.path = config, None, trial_id
        self.metrics = {**reports[-1], "trial_id": trial_id, "done": True}
        self.metrics_dataframe = pd.DataFrame(reports)


@dataclass
class SearchRun:
    rows: list[Any]
    trial_epochs: int
    duplicates: int
    """Trials that trained a config an earlier trial of the search had trained."""
    proposals_refused: int
    order: list[tuple[str, int, str]] = field(default_factory=list)
    """(trial id, epoch, action) in the order the scheduler saw the results."""
    study: Any = None
    """The search's Optuna study (in memory)."""
    reports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """trial id -> its results, in order."""
    keys: dict[str, str] = field(default_factory=dict)
    """trial id -> the table's key of its config."""
    repeated: list[tuple[str, int, str, str]] = field(default_factory=list)
    """(trial id, epoch, decision before the restart, decision of the restarted scheduler)."""


def replay_search(space: Any, table: Table, seed: int, concurrency: int, folder: str,
                  constant_liar: bool = False, restart_after: set[int] | None = None) -> SearchRun:
    """The search phase on the table's curves at `seed`: the real searcher and scheduler, a
    simulated clock with `concurrency` trials at once.

    `restart_after`: the 1-based numbers of the results after whose decision the driver is
    killed and restarted: the scheduler is built anew from the experiment folder (as
    `Tuner.restore` rebuilds it from the state saved when the search started), told of the
    trials still running, and the trial whose result it was reports that epoch again from its
    checkpoint; the restarted scheduler's decision goes on (`SearchRun.repeated` keeps both)."""
    from ray.tune.schedulers import TrialScheduler

    from benchmarks.replay.record import config_key
    from search.experiment.audit import AuditLog, read_audit
    from search.experiment.folder import Experiment
    from search.experiment.sampling import sampled_values
    from search.experiment.study import DUPLICATES, make_searcher
    from search.experiment.trials import summarise
    from search.phases.schedulers import make_scheduler

    import optuna

    import search.experiment.study as study_module

    exp = Experiment.at(folder)
    db = f"{folder}/optuna.db"
    # the study in memory instead of SQLite (the same trials reach the sampler; SQLite's
    # commits would take most of a replay's time); a test checks the decisions against a real
    # Tune run on SQLite
    real_storage = study_module.study_storage
    study_module.study_storage = lambda path: optuna.storages.InMemoryStorage()  # type: ignore[assignment]
    try:
        searcher = make_searcher(space, db, audit=AuditLog(folder).load)
    finally:
        study_module.study_storage = real_storage
    if constant_liar:
        searcher._ot_study.sampler._constant_liar = True  # TPESampler(constant_liar=True)'s flag
    scheduler = make_scheduler(space, exp)
    metric, max_t = space.experiment.metric, space.train.run.epochs
    n_total = space.experiment.num_samples
    curves = table.search_curves(space)
    clock, started, epochs_used = 0.0, 0, 0
    events: list[tuple[float, int, str]] = []  # (time, tie-break, trial id)
    trials: dict[str, FakeTrial] = {}
    reports: dict[str, list[dict[str, Any]]] = {}
    keys: dict[str, str] = {}
    trained: set[str] = set()
    duplicates = 0
    order: list[tuple[str, int, str]] = []
    repeated: list[tuple[str, int, str, str]] = []
    tick = 0

    def start() -> None:
        nonlocal started, tick, duplicates
        tid = f"t{started:05d}"
        started += 1
        config = searcher.suggest(tid)
        trial = trials[tid] = FakeTrial(tid, config)
        scheduler.on_trial_add(None, trial)
        key = keys[tid] = config_key(space, sampled_values(config))
        if key in trained:
            duplicates += 1
        trained.add(key)
        reports[tid] = []
        heapq.heappush(events, (clock + curves[key][seed][0][2], tick, tid))
        tick += 1

    while started < n_total or events:
        while started < n_total and len(events) < concurrency:
            start()
        clock, _, tid = heapq.heappop(events)
        trial = trials[tid]
        i = len(reports[tid])
        epoch, value, _, status = curves[keys[tid]][seed][i]
        result = {metric: value, "epoch": epoch, "training_iteration": i + 1, "trial_id": tid}
        if status:
            from trainable.status import RUN_STATUS

            result[RUN_STATUS] = status
        reports[tid].append(result)
        epochs_used += 1
        action = scheduler.on_trial_result(None, trial, result)
        order.append((tid, epoch, action))
        if restart_after and len(order) in restart_after:
            scheduler = make_scheduler(space, exp)
            for t in trials.values():
                if t.status == "RUNNING":
                    scheduler.on_trial_add(None, t)
            again = scheduler.on_trial_result(None, trial, dict(result))
            repeated.append((tid, epoch, action, again))
            action = again
        if action != TrialScheduler.STOP:
            searcher.on_trial_result(tid, result)
        if action == TrialScheduler.STOP or epoch >= max_t or status:
            trial.status = "TERMINATED"
            scheduler.on_trial_complete(None, trial, result)
            searcher.on_trial_complete(tid, result=result)
        else:
            heapq.heappush(events, (clock + curves[keys[tid]][seed][i + 1][2], tick, tid))
            tick += 1
    results = [FakeResult(tid, trials[tid].config, reports[tid]) for tid in trials]
    rows = summarise(results, space, audited=read_audit(exp))
    refused = int(searcher._ot_study.user_attrs.get(DUPLICATES, 0))
    return SearchRun(rows, epochs_used, duplicates, refused, order, searcher._ot_study, reports, keys, repeated)


def rung_taus(space: Any, run: SearchRun, truth: dict[str, Any]) -> dict[int, float]:
    """Per rung of the space's scheduler: Kendall's tau between the scores of the trials that
    reported at that rung's epoch and their configs' true means (nan: fewer than 2 trials, or
    no spread in either, as on the null table, where every config's truth is the baseline's)."""
    from scipy.stats import kendalltau

    metric = space.experiment.metric
    out = {}
    for rung in space.experiment.scheduler.rungs(space.train.run.epochs):
        # the true means rounded: a mean of the same values summed in another order (the null
        # table's configs) differs in its last bits, which is no ranking
        pairs = [(r[metric], round(truth["means"][run.keys[tid]], 9)) for tid, rs in run.reports.items()
                 for r in rs if r["epoch"] == rung]
        if len(pairs) < 2 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
            out[rung] = math.nan
            continue
        out[rung] = float(kendalltau(*zip(*pairs)).statistic)
    return out


# The confirmation --------------------------------------------------------------------------------------
def replay_confirm(space: Any, table: Table, plan: list[Any], seeds: list[int], folder: str) -> tuple[list[Any], int]:
    """The confirmation phase on the table: the real `SeedRounds` searcher (rounds of seeds,
    racing when the space says so) proposes (config, seed) trials, each completing with the
    recorded run of that config at the table's seed `seeds[i]` for the space's i-th
    confirmation seed, and the real `read_phase` reads what ran. Returns the measured configs
    and the trial-epochs the phase trained."""
    from dataclasses import asdict

    from ray.tune.search import Searcher

    from search.experiment.folder import Experiment
    from search.experiment.phases import CONFIRM, phase_path, read_phase
    from search.phases.confirm import SeedRounds
    from trainable.status import RUN_STATUS

    exp = Experiment.at(folder)
    c, metric = space.experiment.confirm, space.experiment.metric
    table_seed = dict(zip(space.confirm_seeds, seeds))
    rounds = SeedRounds([asdict(e) for e in plan], space.confirm_seeds, metric, space.experiment.mode,
                        space.train.run.epochs, racing=bool(c.racing), phase_dir=phase_path(exp, CONFIRM))
    results, epochs, running = [], 0, []
    while True:
        tid = f"c{len(results) + len(running):05d}"
        suggestion = rounds.suggest(tid)
        if suggestion == Searcher.FINISHED:
            break
        if suggestion is not None:
            running.append((tid, suggestion))
            continue
        if not running:  # nothing to wait for and nothing proposed: SeedRounds would hang a Tuner
            raise RuntimeError("SeedRounds proposed nothing with no trial running")
        tid, config = running.pop(0)  # every trial of a round completes before the next round
        seed = config["seed"]
        curve = table.curves[json.dumps(config["entry"]["values"], sort_keys=True)][table_seed[seed]]
        reports = []
        for i, (epoch, value, _, status) in enumerate(curve):
            r = {metric: value, "epoch": epoch, "training_iteration": i + 1, "seed": seed, "trial_id": tid}
            if status:
                r[RUN_STATUS] = status
            reports.append(r)
        epochs += len(curve)
        rounds.on_trial_complete(tid, result=reports[-1])
        results.append(FakeResult(tid, config, reports))
    return read_phase(exp, CONFIRM, space, results=results), epochs


# One replay ------------------------------------------------------------------------------------------------
def replay_once(space: Any, table: Table, truth: dict[str, Any], rng: np.random.Generator,
                concurrency: int = 1, constant_liar: bool = False) -> dict[str, Any]:
    """One whole search on the table: search, confirmation, verdict, ablation plan, verify."""
    from benchmarks.replay.record import config_key
    from search.answer.decide import NO_GAIN, UNCONFIRMED, decide, spread_floor, value_bounds
    from search.export import verify_rule
    from search.phases.confirm import ablation_plan, confirm_plan

    c = space.experiment.confirm
    seeds = [table.seeds[i] for i in rng.permutation(len(table.seeds))]
    need = 1 + c.seeds + VERIFY_SEEDS
    if len(seeds) < need:
        raise ValueError(f"table {table.name}: {len(seeds)} seeds, a replay needs {need}")
    search_seed, confirm_seeds, verify_seeds = seeds[0], seeds[1:1 + c.seeds], seeds[1 + c.seeds:need]
    # the study's SQLite file in memory-backed storage where there is one: its commits dominate
    scratch = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="replay-", dir=scratch) as folder:
        run = replay_search(space, table, search_seed, concurrency, folder, constant_liar)
    plan = confirm_plan(run.rows, space)

    with tempfile.TemporaryDirectory(prefix="replay-confirm-", dir=scratch) as folder:
        measured, confirm_epochs = replay_confirm(space, table, plan, confirm_seeds, folder)
    fixed3_epochs = len(plan) * 3 * space.train.run.epochs
    d = decide(measured, space)
    ablation_epochs = 0
    if d is not None and d.verdict != UNCONFIRMED and space.experiment.ablate:
        ablation_epochs = len(ablation_plan(d.winner.entry, space)) * c.seeds * space.train.run.epochs
    out: dict[str, Any] = {"search_epochs": run.trial_epochs, "confirm_epochs": confirm_epochs,
                           "confirm_vs_fixed3": confirm_epochs / fixed3_epochs,
                           "confirm_seeds_run": {m.entry.label: len(m.seeds) + len(m.diverged) + len(m.failed)
                                                 for m in measured},
                           "tau": rung_taus(space, run, truth),
                           "ablation_epochs": ablation_epochs, "duplicates": run.duplicates,
                           "refused": run.proposals_refused, "trials": space.experiment.num_samples}
    if d is None:
        out.update(verdict="none", right=False)
        return out
    wkey = json.dumps(d.winner.entry.values, sort_keys=True)
    bkey = config_key(space, space.base_values)
    true_gain = truth["means"][wkey] - truth["means"][bkey]
    gain = d.vs_baseline or {"delta": 0.0, "adjusted": 0.0}
    right = (truth["means"][truth["best"]] - truth["means"][wkey] <= RIGHT_WITHIN + 1e-12
             and not (truth["best_beats_baseline"] and d.verdict == NO_GAIN)
             and d.verdict != UNCONFIRMED)
    verify_fail = None
    if d.verdict != UNCONFIRMED:
        fresh = [table.final(wkey, s) for s in verify_seeds]
        inside, _ = verify_rule(d.winner.values, fresh, spread_floor(measured, space), value_bounds(space))
        verify_fail = not inside
    out.update(verdict=d.verdict, right=right, answer=wkey, false_winner=d.verdict != NO_GAIN,
               reported_gain=gain["delta"], adjusted_gain=gain["adjusted"], true_gain=true_gain,
               verify_fail=verify_fail, weak=d.weak)
    return out


# Settings and their figures ---------------------------------------------------------------------------------
# (the table's recipe fixes the schedule: a table recorded with "plain" curves only replays the
# plain schedule; `RECIPES[...]["schedules"] = ["plain", "rung"]` records both)
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "audit 0": {"overrides": ["experiment.scheduler.audit=0"]},
    "fifo (no early stopping)": {"overrides": ["experiment.scheduler={kind: fifo}"]},
    # the search's trials on one cosine over the whole run (their rung scores mid-cosine)
    "schedule plain": {"overrides": ["experiment.scheduler.schedule=plain"]},
    "concurrency 4": {"concurrency": 4},
    "concurrency 16": {"concurrency": 16},
    "concurrency 32": {"concurrency": 32},
    "concurrency 4, constant liar": {"concurrency": 4, "constant_liar": True},
    "concurrency 16, constant liar": {"concurrency": 16, "constant_liar": True},
    "concurrency 32, constant liar": {"concurrency": 32, "constant_liar": True},
    "confirm on 5 seeds": {"overrides": ["experiment.confirm={top_k: 2, seeds: 5}"]},
    # sequential confirmation (`SeedRounds` with racing): two seeds for every config, then one
    # more per round for the configs still in the race, up to the cap
    # (the quickstart confirms its best config and the baseline: top_k 1; "confirm on 5 seeds"
    # also moves top_k to 2, so it has its racing twin, and "5 seeds, top 1" is racing cap 5's)
    "confirm on 5 seeds, top 1": {"overrides": ["experiment.confirm.seeds=5"]},
    "racing, cap 3": {"overrides": ["experiment.confirm.racing=true"]},
    "racing, cap 5": {"overrides": ["experiment.confirm.racing=true", "experiment.confirm.seeds=5"]},
    "racing, cap 5, top 2": {"overrides": ["experiment.confirm={top_k: 2, seeds: 5, racing: true}"]},
    # the tricks table's confirmation is already the top 3 on 5 seeds: its own variations
    "confirm on 3 seeds": {"overrides": ["experiment.confirm.seeds=3"]},
    "racing": {"overrides": ["experiment.confirm.racing=true"]},
    "racing, top 4": {"overrides": ["experiment.confirm={top_k: 4, seeds: 5, racing: true}"]},
    "16 trials": {"overrides": ["experiment.num_samples=16"]},
}


def replay_space(table: Table, overrides: list[str] | None = None, sampler_seed: int = 0) -> Any:
    """The table's space (its recipe) with the replay's and the setting's overrides."""
    from spaces import load_space

    recipe = table.recipe
    return load_space(recipe["space"], overrides=[*recipe["overrides"], *recipe.get("replay_overrides", []),
                                                  *(overrides or []), f"experiment.sampler.seed={sampler_seed}"])


def wilson(k: int, n: int) -> tuple[float, float, float]:
    """A proportion and its 95% Wilson interval."""
    if n == 0:
        return (math.nan, math.nan, math.nan)
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(method="wilson")
    return (k / n, float(ci.low), float(ci.high))


def mean_ci(x: list[float]) -> tuple[float, float, float]:
    from search.answer.stats import summarise_values

    s = summarise_values(x)
    return (s.mean, s.ci95[0], s.ci95[1]) if s.n >= 2 else (s.mean, math.nan, math.nan)


def run_setting(table: Table, setting: dict[str, Any], n: int, null: bool = False, seed: int = 0) -> dict[str, Any]:
    """`n` replays of one setting, with each figure and its 95% CI over the replays."""
    from benchmarks.replay.record import config_key

    base_space = replay_space(table, setting.get("overrides"))
    bkey = config_key(base_space, base_space.base_values)
    outs = []
    started = time.monotonic()
    for i in range(n):
        src = null_table(table, bkey, seed=seed + i) if null else table
        truth = src.truth(bkey)
        space = base_space.model_copy(deep=True)  # the same space, with this replay's sampler seed
        space.experiment.sampler.seed = seed + i
        rng = np.random.default_rng(10_000 + seed + i)
        outs.append(replay_once(space, src, truth, rng, setting.get("concurrency", 1),
                                setting.get("constant_liar", False)))
    c = base_space.experiment.confirm
    configs = len(table.curves)
    brute = configs * c.seeds * base_space.train.run.epochs
    winners = [o for o in outs if o["verdict"] in ("winner", "tie")]
    verified = [o for o in outs if o.get("verify_fail") is not None]
    used = [(o["search_epochs"] + o["confirm_epochs"] + o["ablation_epochs"]) / brute for o in outs]
    return {
        "n": n, "seconds": time.monotonic() - started,
        "p_right": wilson(sum(o["right"] for o in outs), n),
        "p_false_winner": wilson(sum(bool(o.get("false_winner")) for o in outs), n),
        "p_no_gain": wilson(sum(o["verdict"] == "no gain over baseline" for o in outs), n),
        "gain_bias_raw": mean_ci([o["reported_gain"] - o["true_gain"] for o in outs if "true_gain" in o]),
        "gain_bias_adjusted": mean_ci([o["adjusted_gain"] - o["true_gain"] for o in outs if "true_gain" in o]),
        "gain_bias_raw_winners": mean_ci([o["reported_gain"] - o["true_gain"] for o in winners]),
        "gain_bias_adjusted_winners": mean_ci([o["adjusted_gain"] - o["true_gain"] for o in winners]),
        "verify_false_failures": wilson(sum(o["verify_fail"] for o in verified), len(verified)),
        "trial_epochs_vs_brute_force": mean_ci(used),
        "duplicate_fraction": mean_ci([o["duplicates"] / o["trials"] for o in outs]),
        "refused_proposals_per_search": mean_ci([float(o["refused"]) for o in outs]),
        "brute_force_trial_epochs": brute,
        "confirm_vs_fixed3": mean_ci([o["confirm_vs_fixed3"] for o in outs]),
        "tau_rungs": {str(r): [*mean_ci([t for o in outs if (t := o["tau"].get(r)) is not None and t == t]),
                               sum(1 for o in outs if (t := o["tau"].get(r)) is not None and t == t)]
                      for r in base_space.experiment.scheduler.rungs(base_space.train.run.epochs)},
    }


def _pct(x: list[float]) -> str:
    v, lo, hi = x
    return "-" if v != v else f"{100 * v:.1f}% ({100 * lo:.1f}-{100 * hi:.1f})"


def _pp(x: list[float]) -> str:
    v, lo, hi = x
    if v != v:
        return "-"
    return f"{100 * v:+.2f} pp" + ("" if lo != lo else f" ({100 * lo:+.2f} to {100 * hi:+.2f})")


def _ratio(x: list[float] | None) -> str:
    if not x or x[0] != x[0]:
        return "-"
    return f"{x[0]:.2f}" + ("" if x[1] != x[1] else f" ({x[1]:.2f}-{x[2]:.2f})")


def _taus(taus: dict[str, list[float]] | None) -> str:
    """Rung epoch: mean tau (95% CI) over the replays where it is defined."""
    if not taus:
        return "-"
    return "; ".join(f"{r}: " + ("-" if v != v else f"{v:+.2f}" + ("" if lo != lo else f" ({lo:+.2f} to {hi:+.2f})"))
                     for r, (v, lo, hi, _) in taus.items())


def markdown(lines: list[dict[str, Any]]) -> str:
    """The figures of `main --out` as a Markdown table (95% CIs in brackets)."""
    head = ["table", "setting", "n", "P(right)", "P(verdict not 'no gain')", "gain bias raw (all)",
            "gain bias adjusted (all)", "gain bias raw (winners)", "gain bias adjusted (winners)", "--verify false failures", "trial-epochs / brute force",
            "duplicate trials", "confirmation trial-epochs / fixed 3 seeds", "tau per rung vs truth", "s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in lines:
        used = f["trial_epochs_vs_brute_force"]
        rows.append("| " + " | ".join([
            f["table"], f["setting"], str(f["n"]), _pct(f["p_right"]), _pct(f["p_false_winner"]),
            _pp(f["gain_bias_raw"]), _pp(f["gain_bias_adjusted"]),
            _pp(f["gain_bias_raw_winners"]), _pp(f["gain_bias_adjusted_winners"]), _pct(f["verify_false_failures"]),
            f"{used[0]:.2f} ({used[1]:.2f}-{used[2]:.2f})", _pct(f["duplicate_fraction"]),
            _ratio(f.get("confirm_vs_fixed3")), _taus(f.get("tau_rungs")), f"{f['seconds']:.0f}",
        ]) + " |")
    return "\n".join(rows)


def print_truths(table: Table) -> None:
    """Each config's mean over the table's seeds (best first), the best's paired gain over the
    baseline and every searched value's main effect, with 95% CIs."""
    space = replay_space(table)
    from benchmarks.replay.record import config_key

    base = config_key(space, space.base_values)
    truth = table.truth(base)
    for key, mean in sorted(truth["means"].items(), key=lambda kv: -kv[1]):
        mark = " (baseline)" if key == base else " (best)" if key == truth["best"] else ""
        print(f"{mean:.4f}  {key}{mark}")
    lo, hi = truth["best_gain_ci95"]
    print(f"best - baseline: {100 * truth['best_gain']:+.2f} pp (95% CI {100 * lo:+.2f} to {100 * hi:+.2f}) "
          f"over {len(table.seeds)} seeds")
    for name, e in main_effects(table, base).items():
        print(f"main effect {name}: {100 * e['mean']:+.2f} pp (95% CI {100 * e['ci95'][0]:+.2f} to {100 * e['ci95'][1]:+.2f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replay.replay", description=__doc__.splitlines()[0])
    p.add_argument("--table", default="quickstart")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--settings", nargs="*", default=list(SETTINGS))
    p.add_argument("--null", action="store_true", help="the null table (the baseline's seeds as every config)")
    p.add_argument("--rebase", choices=sorted(REBASES), help="move the baseline (the space's base) of the table")
    p.add_argument("--out", help="append each setting's figures as one JSON line here")
    p.add_argument("--markdown", metavar="JSONL", help="only print the figures of a --out file as a Markdown table")
    p.add_argument("--truths", action="store_true",
                   help="only print the table's truths: each config's mean, the best's gain and the main effects")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown([json.loads(x) for x in Path(args.markdown).read_text().splitlines() if x.strip()]))
        return 0
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    table = load_table(HERE / "tables" / f"{args.table}.json.gz")
    if args.rebase:
        table = rebased(table, args.rebase)
    if args.truths:
        print_truths(table)
        return 0
    for name in args.settings:
        fig = run_setting(table, SETTINGS[name], args.n, null=args.null)
        line = {"table": table.name + (" (null)" if args.null else ""), "setting": name, **fig}
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
