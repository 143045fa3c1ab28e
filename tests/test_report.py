"""The report of an experiment's answer (`search.answer.report`, `search.answer.plots`) written from
fixed answer dicts, one per verdict and with missing sections; and importance over a real
Optuna study (`search.importance`) with pruned, diverged and conditional trials."""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
import types
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from search.answer import plots as report_plots
from search.experiment.folder import SEARCH_INFO
from trainable.status import DIVERGED, RUN_ERROR, RUN_STATUS, worst_value
from search.answer.importance import EVALUATORS, importance
from search.experiment.study import PHASE
from search.answer.report import fmt_delta, render_markdown, write_report
from search.report import main
from tests.test_scale_out import s3  # noqa: F401  (a local S3 server)
from trainable.config import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"
KEYS = ["mix.mode", "mix.mixup_alpha", "label_smoothing", "augment.randaugment.enabled"]


# A fixed answer -------------------------------------------------------------------------------------------
BASE = {"mix.mode": "none", "mix.mixup_alpha": 0.2, "label_smoothing": 0.0, "augment.randaugment.enabled": False}


def _config(label: str, role: str, changed: dict[str, Any], values: list[float]) -> dict[str, Any]:
    """A confirmed config: its full values (keys it does not use at their base value) and its active keys."""
    m = sum(values) / len(values)
    config = {**BASE, **changed}
    active = [k for k in KEYS if k != "mix.mixup_alpha" or config["mix.mode"] == "mixup"]
    tricks = [k for k in ("mix.mode", "label_smoothing", "augment.randaugment.enabled") if config[k] != BASE[k]]
    return {"label": label, "role": role, "search_trial": None, "search_score": None,
            "config": config, "changed": tricks, "active": active, "mean": m, "std": statistics.stdev(values),
            "ci95": [m - 0.01, m + 0.01], "seeds": [1001, 1002, 1003], "values": values}


def _search_trials() -> list[dict[str, Any]]:
    trials = []
    for i in range(8):
        mode = ["none", "mixup", "cutmix"][i % 3]
        values = {"mix.mode": mode, "label_smoothing": 0.05 * (i % 3), "augment.randaugment.enabled": bool(i % 2)}
        if mode == "mixup":
            values["mix.mixup_alpha"] = 0.2 + 0.1 * i
        n = 1 if i % 4 == 3 else 4
        curve = [[e, 0.5 + 0.1 * e + 0.01 * i] for e in range(1, n + 1)]
        trials.append({"trial_id": f"t{i}", "phase": "search", "label": None, "values": values,
                       "status": "done" if n == 4 else "stopped early", "audited": i == 2, "score": curve[-1][1],
                       "best": curve[-1][1] + 0.001, "epochs": n, "seed": 0, "curve": curve})
    return trials


def answer() -> dict[str, Any]:
    """A finished experiment with a clear winner."""
    c1 = _config("candidate 1", "candidate", {"mix.mode": "cutmix", "label_smoothing": 0.1}, [0.96, 0.958, 0.968])
    c2 = _config("candidate 2", "candidate", {"mix.mode": "mixup", "mix.mixup_alpha": 0.3}, [0.955, 0.95, 0.96])
    base = _config("baseline", "baseline", {}, [0.95, 0.945, 0.955])
    base["vs_baseline"] = None
    c1["vs_baseline"] = {"delta": 0.012, "ci95": [0.0077, 0.0163], "std": 0.0017, "n": 3}
    c2["vs_baseline"] = {"delta": 0.005, "ci95": [0.004, 0.006], "std": 0.0004, "n": 3}
    confirm_runs = [{"trial_id": f"c{i}{s}", "phase": "confirm", "label": c["label"], "values": c["config"],
                     "active": c["active"],
                     "status": "done", "audited": False, "score": v, "best": v, "epochs": 4, "seed": s,
                     "curve": [[4, v]]}
                    for i, c in enumerate((c1, c2, base)) for s, v in zip(c["seeds"], c["values"])]
    return {
        "experiment": "/data/exps/quickstart", "metric": "val_acc", "mode": "max", "state": "finished",
        "verdict": "winner", "message": "candidate 1 (cutmix, label smoothing 0.1) wins on 3 seeds.",
        "budget": {"trial_epochs_search": 31, "trial_epochs_confirm": 84, "epochs_search": 4, "epochs_confirm": 4},
        "winner": c1, "baseline": base, "runner_up": c2,
        "vs_runner_up": {"delta": 0.007, "ci95": [0.002, 0.012]},
        "vs_baseline": {"delta": 0.012, "ci95": [0.004, 0.020]},
        "p_best": {"candidate 1": 0.71, "candidate 2": 0.2, "baseline": 0.09},
        "confirm": [c1, c2, base],
        "ablation": [{"trick": "mix.mode", "reset": {"mix.mode": "none", "mix.cutmix_alpha": 1.0},
                      "active": ["mix.mode", "label_smoothing", "augment.randaugment.enabled"], "delta": 0.008,
                      "ci95": [0.005, 0.011], "values": [0.006, 0.009, 0.009]},
                     {"trick": "label_smoothing", "reset": {"label_smoothing": 0.0}, "delta": 0.001,
                      "ci95": [-0.004, 0.006], "values": [0.0, 0.003, 0.0]}],
        "importance": {"PedAnovaImportanceEvaluator": {"mix.mode": 0.7, "label_smoothing": 0.3},
                       "FanovaImportanceEvaluator": {"mix.mode": 0.8, "label_smoothing": 0.2}},
        "importance_note": "over the 6 search trials that ran all their epochs; 2 pruned trials left out",
        "rung_tau": [{"rung": 1, "tau": 0.6, "n": 5, "epoch": 1}, {"rung": 2, "tau": 0.8, "n": 4, "epoch": 3}],
        "late_bloomers": [{"trial_id": "t2", "rung": 1, "rung_score": 0.62, "final": 0.92}],
        "trials": _search_trials() + confirm_runs, "searched_keys": KEYS,
        "tricks": {"mix.mode": ["mix.mixup_alpha"], "label_smoothing": [], "augment.randaugment.enabled": []},
        "rungs": {"epochs": [1, 2], "restarts": True},
    }


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 5_000, path
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[0] > 100


def _images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


# The report ------------------------------------------------------------------------------------------------
def test_a_winner_report_holds_every_section_and_plot(tmp_path):
    a = answer()
    out = tmp_path / "report"
    written = write_report(a, out)
    names = {p.name for p in written}
    assert names == {"report.json", "report.md", "confirmation.png", "ablation.png", "rung_audit.png",
                     "learning_curves.png"}
    for p in written:
        assert p.parent == out and p.exists()
    for name in names - {"report.json", "report.md"}:
        _png(out / name)
    assert json.loads((out / "report.json").read_text()) == a  # round-trips, keys in their order
    assert list(json.loads((out / "report.json").read_text())) == list(a)

    md = (out / "report.md").read_text()
    answer_at = md.index("## Answer")
    assert md.index(a["message"]) < md.index("## Confirmation")
    assert answer_at < md.index(a["message"]) < md.index("**Winner: candidate 1**")
    assert "val_acc 96.20% ± 1.00 pp over 3 seeds (1001, 1002, 1003)" in md
    assert "Budget: search trials up to 4 epochs (31 trial-epochs), confirmation runs 4 epochs (84 trial-epochs)" in md
    assert ("**Verdict: winner.** It beats the runner-up (candidate 2) by +0.7 ± 0.5 pp "
            "and the baseline by +1.2 ± 0.8 pp") in md
    # the confirmation table: label, what changed (the keys it uses), mean ± CI, paired Δ to the baseline ± CI,
    # std, per seed, P(best)
    assert ("| candidate 1 | mix.mode=cutmix, label_smoothing=0.1 | 96.20% ± 1.00 pp | +1.2 ± 0.4 pp | 0.53 pp "
            "| 96.00%, 95.80%, 96.80% | 0.71 |") in md
    assert "| candidate 2 | mix.mode=mixup, mix.mixup_alpha=0.3 | 95.50% ± 1.00 pp | +0.5 ± 0.1 pp |" in md
    assert "| baseline | (the baseline) | 95.00% ± 1.00 pp | (the baseline) |" in md
    # the ablation in the Bag-of-Tricks style; an interval across 0 is said to be one
    # reset to: the keys the ablated config uses (cutmix_alpha is unused once mixing is off)
    assert "| mix.mode: +0.8 ± 0.3 pp | mix.mode=none | +0.6, +0.9, +0.9 |" in md
    assert "label_smoothing: +0.1 ± 0.5 pp (CI contains 0)" in md
    # importance side by side, with its caveat
    assert "| key | PED-ANOVA | fANOVA |" in md and "| mix.mode | 0.700 | 0.800 |" in md
    assert "Single-seed" in md and a["importance_note"] in md
    # the rung audit and the late bloomer
    assert "| rung (epoch) | τ | n |" in md and "| 1 | 0.60 | 5 |" in md and "| 2 | 0.80 | 4 |" in md
    assert "trial t2: rung 1 score 62.00%, final 92.00%" in md
    # the trial table: the score is the last epoch's, the best is extra; audited marked
    row_t2 = next(line for line in md.splitlines() if line.startswith("| t2 |"))
    assert "| cutmix | – | 0.1 | False | 92.00% | 92.10% | 4 | done | yes |" in row_t2  # alpha: mixup's only
    assert any(line.startswith("| c01001 | confirm | candidate 1 | 1001 |") for line in md.splitlines())
    # every image is linked relatively and exists
    assert sorted(_images(md)) == sorted(names - {"report.json", "report.md"})
    assert md.index("![Confirmation](confirmation.png)") < md.index("## What each trick")


def test_a_tie_says_the_simpler_config_was_preferred(tmp_path):
    a = answer()
    a.update(verdict="tie", vs_runner_up={"delta": 0.004, "ci95": [-0.002, 0.010]})
    md = (write_report(a, tmp_path)[-1]).read_text()
    assert ("**Verdict: tie.** candidate 2, the best by mean, is statistically tied with the winner "
            "(paired difference +0.4 ± 0.6 pp, 95% CI contains 0)") in md
    assert "the simpler config (fewer tricks changed from the baseline) was preferred" in md
    assert "It beats" not in md


def test_no_gain_says_plainly_that_no_combination_beat_the_baseline(tmp_path):
    a = answer()
    # the baseline is the answer; the runner-up is the best other config, the difference the baseline's minus its
    a.update(verdict="no gain over baseline", winner=a["baseline"], runner_up=a["confirm"][0], vs_baseline=None,
             vs_runner_up={"delta": -0.001, "ci95": [-0.006, 0.004]})
    md = render_markdown(a)
    assert ("No trick combination beat the baseline on this data: the best other config by mean, candidate 1, "
            "differs from the baseline by +0.1 ± 0.5 pp (paired over the same seeds; its 95% CI does not lie "
            "above 0).") in md
    a.update(runner_up=None, vs_runner_up=None)  # nothing else finished: no difference, and why
    assert "no other config finished every seed, so there is no difference to show" in render_markdown(a)


def test_an_unconfirmed_answer_rests_on_one_seed_and_says_what_did_not_run(tmp_path):
    a = answer()
    w = {"label": "trial t6", "role": "candidate", "config": {"mix.mode": "none"}, "changed": [], "mean": 0.96,
         "std": math.nan, "ci95": [-math.inf, math.inf], "seeds": [0], "values": [0.96]}
    a.update(verdict="unconfirmed", winner=w, baseline=None, runner_up=None, vs_runner_up=None, vs_baseline=None,
             p_best={}, confirm=[], ablation=[], rung_tau=[], late_bloomers=[],
             importance={n: {} for n in EVALUATORS}, importance_note="not computed: 2 usable trials (at least 3 needed)")
    a["trials"] = [t for t in a["trials"] if t["phase"] == "search"]
    written = write_report(a, tmp_path)
    assert {p.name for p in written} == {"report.json", "report.md", "learning_curves.png"}  # no empty plots
    md = (tmp_path / "report.md").read_text()
    assert "**Verdict: unconfirmed.** This answer rests on one seed of the search and is not confirmed" in md
    assert "val_acc 96.00% (one seed, no CI) over one seed (0)" in md
    a["budget"].update(epochs_confirm=None, trial_epochs_confirm=0)
    assert "(31 trial-epochs), no confirmation runs;" in render_markdown(a)
    assert "Confirmation: not run (experiment.confirm is off)." in md
    assert "Ablation: nothing to take out (the winner changes no trick from the baseline)." in md
    a["winner"]["changed"] = ["mix.mode"]
    assert "Ablation: not run (no confirmed winner to ablate)." in render_markdown(a)
    assert "Importance: not computed: 2 usable trials (at least 3 needed)." in md
    assert "Rung audit: not run (no audited trials" in md
    assert "| label | seed |" not in md  # search trials only: no confirmation columns
    # report.json stays strict JSON: the unbounded interval and the missing std are null
    data = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["winner"]["ci95"] == [None, None] and data["winner"]["std"] is None


def test_a_running_search_says_which_sections_are_still_to_come(tmp_path):
    a = answer()
    a.update(state="searching", verdict=None, winner=None, baseline=None, runner_up=None, vs_runner_up=None,
             vs_baseline=None, p_best={}, confirm=[], ablation=[], rung_tau=[], late_bloomers=[],
             importance={}, importance_note=None, message="The search is running: 8 of 10 trials so far.")
    md = render_markdown(a)
    assert "searching (this report is regenerated as it runs)" in md
    assert "No winner yet: the experiment is searching." in md
    assert "Confirmation: not started yet (the experiment is searching)." in md
    assert "Ablation: not started yet (the experiment is searching)." in md
    assert "Rung audit: no audited trial has finished yet." in md
    a["state"] = "confirming"
    md = render_markdown(a)
    assert "Confirmation: still running." in md and "Ablation: not started yet (the experiment is confirming)." in md
    a["trials"] = []
    assert {p.name for p in write_report(a, tmp_path)} == {"report.json", "report.md"}
    assert "Trials: none yet." in (tmp_path / "report.md").read_text()


def test_the_report_replaces_its_own_files_and_nothing_else(tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("kept")
    write_report(answer(), tmp_path)
    a = answer()
    a["message"] = "a newer answer"
    write_report(a, tmp_path)
    assert "a newer answer" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["message"] == "a newer answer"
    assert mine.read_text() == "kept"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    with pytest.raises(ConfigError, match="not a folder"):
        write_report(answer(), mine)


def _prose(md: str) -> list[str]:
    """The report's sentences: every line that is not a table row, heading, image or blank."""
    return [ln for ln in md.splitlines() if ln.strip() and not ln.startswith(("|", "#", "!["))]


@pytest.mark.parametrize("verdict", ["winner", "tie", "no gain over baseline", "unconfirmed"])
def test_the_text_reads_without_a_manual(tmp_path, verdict):
    """Every sentence has its numbers (no "-" standing for a missing difference), a key a
    config does not use is "–" (never its base value), and the figures say how to read them."""
    a = answer()
    if verdict == "tie":
        a.update(verdict=verdict, vs_runner_up={"delta": 0.004, "ci95": [-0.002, 0.010]})
    elif verdict == "no gain over baseline":
        a.update(verdict=verdict, winner=a["baseline"], runner_up=a["confirm"][0], vs_baseline=None,
                 vs_runner_up={"delta": -0.001, "ci95": [-0.006, 0.004]})
    elif verdict == "unconfirmed":
        a.update(verdict=verdict, vs_runner_up=None, vs_baseline=None, p_best={})
    write_report(a, tmp_path)
    md = (tmp_path / "report.md").read_text()
    for line in _prose(md):
        assert not re.search(r"(^|[\s(])-([\s,.;)]|$)", line.removeprefix("- ")), line  # a list item's dash aside
        assert "?" not in line.replace("?)", ""), line
    if verdict != "unconfirmed":  # the verdict states its paired difference, with its CI
        line = next(ln for ln in md.splitlines() if ln.startswith("**Verdict"))
        assert re.search(r"[+-]\d+\.\d+ ± \d+\.\d+ pp", line), line
    # the trial table: a confirmation run of a config that does not use a key shows "–" there, never its base value
    head = next(ln for ln in md.splitlines() if ln.startswith("| trial | phase |"))
    col = [c.strip() for c in head.strip("|").split("|")].index("mix.mixup_alpha")
    cells = {ln.split("|")[3].strip(): [c.strip() for c in ln.strip("|").split("|")][col]
             for ln in md.splitlines() if re.match(r"\| c\d100\d \| confirm \|", ln)}
    assert cells == {"candidate 1": "–", "candidate 2": "0.3", "baseline": "–"}
    assert "0.2" not in [c for c in cells.values()]  # the base value of a key the config does not use
    # the figures' captions say how to read them
    assert "*Each config's gain over the baseline, paired by seed" in md
    assert "Dotted lines: the rungs (epoch 1, 2)" in md
    assert ("The curves dip just after a rung because the rung schedule anneals the learning rate to its floor at "
            "each rung") in md


def _confirmed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, measured: list[Any]) -> dict[str, Any]:
    """The answer `build_answer` gives for a confirmation that recorded `measured` (no search
    trials, no ablation): the real answer, without running anything."""
    import search.answer.build as build
    from search.experiment.folder import Experiment
    from search.experiment.phases import CONFIRM
    from spaces import QUICKSTART, load_space

    space = load_space(QUICKSTART, ["search.batch.global_batch=null", "experiment.ablate=false"])
    monkeypatch.setattr(build, "read_phase", lambda exp, phase, space: measured if phase == CONFIRM else [])
    return build.build_answer(Experiment.at(str(tmp_path / "exp")), space, results=[])


def _m(label: str, role: str, values: list[float], changed: dict[str, Any] | None = None, **kw: Any) -> Any:
    from search.experiment.phases import Entry, Measured

    seeds = kw.pop("seeds", [1001, 1002, 1003][: len(values)])
    return Measured(Entry(label, role, {**BASE, **(changed or {})}), label, seeds=seeds, values=values, **kw)


def _reads_cleanly(md: str) -> None:
    """No "-" standing for a missing number and no "?" in the report's sentences."""
    for line in _prose(md):
        assert not re.search(r"(^|[\s(])-([\s,.;)]|$)", line.removeprefix("- ")), line  # a list item's dash aside
        assert "?" not in line.replace("?)", ""), line
    for line in md.splitlines():  # nor in a confirmed config's row
        if line.startswith(("| candidate", "| baseline")):
            assert "| - |" not in line, line


FAILED_LINE = ("2 of 10 search trials failed: t3 (error): CUDA out of memory; t7 (failed): DataError: bad image. "
               "The answer rests on the others; --resume retries those with status error.")


def _case(case: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """A fixed answer for one of the fields the report must show: (answer, texts it must hold, texts it must not)."""
    a = answer()
    c1, c2, base = a["confirm"]
    if case == "unconfirmed with reason":
        a.update(verdict="unconfirmed", verdict_reason="the baseline has not finished every seed yet",
                 vs_baseline=None, vs_runner_up=None, p_best={}, ablation=[], state="confirming")
        base.update(status="unfinished", values=[0.95], seeds=[1001], mean=0.95, std=None, ci95=None)
        for c in (c1, c2):
            c["vs_baseline"] = None
        return a, ["**Verdict: unconfirmed**: the baseline has not finished every seed yet. candidate 1 is only the "
                   "best confirmed config so far; this is no evidence that it beats the baseline.",
                   "Not final: the experiment is confirming, so this answer may still change.",
                   "| candidate 1 | mix.mode=cutmix, label_smoothing=0.1 | 96.20% ± 1.00 pp | "
                   "none: the baseline has no stable result on every seed |",
                   "Baseline: val_acc 95.00% (one seed, no CI)."], ["rests on one seed of the search"]
    if case == "one seed":
        for c in (c1, c2, base):
            c.update(values=c["values"][:1], seeds=c["seeds"][:1], std=None, ci95=None, vs_baseline=None)
        a.update(verdict="unconfirmed", verdict_reason="one seed", vs_baseline=None, vs_runner_up=None, p_best={},
                 ablation=[])
        return a, ["**Verdict: unconfirmed**: the confirmation ran one seed, and nothing is claimed from one seed.",
                   "| candidate 2 | mix.mode=mixup, mix.mixup_alpha=0.3 | 95.50% (one seed, no CI) | none: one seed |",
                   "P(best) needs at least two seeds per config."], []
    if case == "weak":
        for c in (c1, c2, base):
            c.update(values=c["values"][:2], seeds=c["seeds"][:2])
        a.update(weak=True)
        return a, ["**Weak verdict:** it rests on only 2 seeds (a firm one needs at least 3; with 2, a 95% interval "
                   "is wide); set experiment.confirm.seeds >= 3.", "over 2 seeds (1001, 1002)"], []
    if case == "unstable config":
        c2.update(values=[0.955, 0.96], seeds=[1001, 1003], mean=0.9575, unstable_seeds=[1002], vs_baseline=None)
        a["p_best"].pop("candidate 2")
        return a, ["**Unstable:** candidate 2 is unstable (seed 1002 diverged or failed), so it is never the answer.",
                   "| candidate 2, unstable (seed 1002) | mix.mode=mixup, mix.mixup_alpha=0.3 | 95.75% ± 1.00 pp | "
                   "none: unstable (seed 1002) |",
                   "| 95.50%, 96.00%; seed 1002 diverged or failed | n/a (unstable) |"], []
    if case == "stale ablation":
        a.update(ablation=[], ablation_note="the recorded ablation was planned for another config than the winner "
                                            "(candidate 1); it is re-planned and its effects are not shown")
        return a, ["Ablation: the recorded ablation was planned for another config than the winner (candidate 1); "
                   "it is re-planned and its effects are not shown."], ["| trick: Δ ± 95% CI |", "mix.mode: +"]
    if case == "too few trials tau":
        a["rung_tau"][1] = {"rung": 2, "tau": None, "n": 3, "epoch": 3,
                            "note": "too few trials (3 ranked at this rung and run to the end; 8 needed)"}
        return a, ["| 1 | 0.60 | 5 |",
                   "| 2 | too few trials (3 ranked at this rung and run to the end; 8 needed) | 3 |"], ["n/a"]
    if case == "adjusted gain":
        a["vs_baseline"]["adjusted"] = 0.009
        a["notes"] = ["The confirmation scores the configs on the validation set the search selected them on: the "
                      "winner's score is optimistic; the gain over the baseline is adjusted for its selection."]
        return a, ["**Verdict: winner.** It beats the runner-up (candidate 2) by +0.7 ± 0.5 pp (paired over the same "
                   "seeds, 95% CI). Over the baseline it gains +0.9 pp, adjusted for having been selected (a gain "
                   "reported because its interval cleared 0 is biased upwards, so it is shrunk towards what such a "
                   "selection leaves); the raw paired mean over the same seeds is +1.2 ± 0.8 pp (95% CI).",
                   "Note: The confirmation scores the configs on the validation set the search selected them on"], \
            ["and the baseline by"]
    if case == "failed trials":
        a["failed"] = {"count": 2, "of": 10, "line": FAILED_LINE,
                       "trials": [{"trial_id": "t3", "status": "error", "error": "CUDA out of memory"},
                                  {"trial_id": "t7", "status": "failed", "error": "DataError: bad image"}]}
        return a, [f"**Failed trials:** {FAILED_LINE}"], []
    raise AssertionError(case)


CASES = ["unconfirmed with reason", "one seed", "weak", "unstable config", "stale ablation", "too few trials tau",
         "adjusted gain", "failed trials"]


@pytest.mark.parametrize("case", CASES)
def test_the_report_shows_each_answer_field(case):
    a, holds, lacks = _case(case)
    md = render_markdown(a)
    for text in holds:
        assert text in md, (text, md)
    for text in lacks:
        assert text not in md, text
    _reads_cleanly(md)


def test_each_answer_field_changes_the_report():
    """The texts above come from the fields: without them the plain answer holds none of them."""
    md = render_markdown(answer())
    for case in CASES:
        _, holds, _ = _case(case)
        assert not [t for t in holds if t in md and not t.startswith("| 1 | 0.60")], case


def test_the_table_the_figure_and_the_verdict_show_one_paired_difference(tmp_path, monkeypatch):
    """Each config's paired difference to the baseline is computed once (`paired_gain`, in
    `build._summary`, with the verdict's floor) and the table, the figure and the verdict show it.
    The values move in steps of 1/200, so the floor binds (candidate 1 gains +3 pp on every seed);
    the unstable config's values move in steps of 1/2000 and would lower that floor were it counted."""
    from search.answer.decide import paired_gain

    base = _m("baseline", "baseline", [0.950, 0.960, 0.970])
    c1 = _m("candidate 1", "candidate", [0.980, 0.990, 1.000], {"mix.mode": "cutmix", "label_smoothing": 0.1})
    c2 = _m("candidate 2", "candidate", [0.955, 0.970, 0.975], {"label_smoothing": 0.1})
    c3 = _m("candidate 3", "candidate", [0.9515, 0.9625], {"mix.mode": "mixup"}, seeds=[1001, 1003], diverged=[1002])
    a = _confirmed(tmp_path, monkeypatch, [c1, c2, c3, base])
    assert a["verdict"] == "winner" and a["winner"]["label"] == "candidate 1"
    rows = {c["label"]: c for c in a["confirm"]}
    # the verdict's gain over the baseline is the winner's row
    verdict = a["vs_baseline"]
    assert rows["candidate 1"]["vs_baseline"]["delta"] == pytest.approx(verdict["delta"], abs=1e-12)
    assert rows["candidate 1"]["vs_baseline"]["ci95"] == pytest.approx(verdict["ci95"], abs=1e-12)
    # the floor is the verdict's, over the stable configs (steps of 1/200): sqrt(2) * (1/200) / sqrt(12)
    half = 4.302652729911275 * 0.005 / 6 ** 0.5 / 3 ** 0.5
    assert verdict["ci95"] == pytest.approx([0.03 - half, 0.03 + half], abs=1e-9)
    assert rows["candidate 2"]["vs_baseline"]["delta"] == pytest.approx(paired_gain(c2, base, 1.0)["delta"])
    assert rows["candidate 3"]["vs_baseline"] is None and rows["candidate 3"]["unstable_seeds"] == [1002]
    assert rows["baseline"]["vs_baseline"] is None
    # the figure reads the same numbers; without the field (an older report.json) it computes them alike
    figure = {r["label"]: r for r in report_plots.paired_to_baseline(a)}
    assert set(figure) == {"candidate 1", "candidate 2", "candidate 3"}
    for label in ("candidate 1", "candidate 2"):
        assert figure[label]["delta"] == rows[label]["vs_baseline"]["delta"]
        assert figure[label]["ci95"] == rows[label]["vs_baseline"]["ci95"]
    assert figure["candidate 1"]["diffs"] == pytest.approx([0.03, 0.03, 0.03])
    assert figure["candidate 3"]["delta"] is None and figure["candidate 3"]["seeds"] == [1001, 1003]
    older = json.loads(json.dumps(a))
    for c in older["confirm"]:
        del c["vs_baseline"]
    for r in report_plots.paired_to_baseline(older):
        want = figure[r["label"]]
        assert r["delta"] == pytest.approx(want["delta"], abs=1e-12) if want["delta"] is not None else r["delta"] is None
        if want["ci95"] is not None:
            assert r["ci95"] == pytest.approx(want["ci95"], abs=1e-12)
    # the table and the verdict line print it alike
    md = render_markdown(a)
    shown = fmt_delta(verdict["delta"], verdict["ci95"], "val_acc")
    assert shown == "+3.0 ± 0.5 pp"
    assert re.search(rf"^\| candidate 1 \| [^|]+ \| [^|]+ \| {re.escape(shown)} \|", md, re.M)
    assert f"the raw paired mean over the same seeds is {shown} (95% CI)" in md
    assert "(unchanged: a gain this far above the bar is hardly inflated)" in md  # +3 pp, 0.5 pp wide: no shrink
    assert figure["candidate 3"]["unstable_seeds"] == [1002]  # the figure labels it unstable
    c2_shown = fmt_delta(rows["candidate 2"]["vs_baseline"]["delta"], rows["candidate 2"]["vs_baseline"]["ci95"], "val_acc")
    assert re.search(rf"^\| candidate 2 \| [^|]+ \| [^|]+ \| {re.escape(c2_shown)} \|", md, re.M)
    assert re.search(r"^\| candidate 3, unstable \(seed 1002\) \| [^|]+ \| [^|]+ \| none: unstable \(seed 1002\) \|",
                     md, re.M)


def test_a_loss_metric_prints_raw_deltas():
    assert fmt_delta(0.05, [0.03, 0.07], "val_loss") == "+0.05 ± 0.02"
    assert fmt_delta(0.008, [0.005, 0.011], "val_acc") == "+0.8 ± 0.3 pp"
    assert fmt_delta(0.0004, [0.0001, 0.0007], "val_acc") == "+0.04 ± 0.03 pp"  # small: two decimals
    assert fmt_delta(0.01, [-math.inf, math.inf], "val_acc") == "+1.0 pp (no CI)"
    a = answer()
    a.update(metric="val_loss", mode="min")
    a["ablation"][0].update(delta=0.05, ci95=[0.03, 0.07])
    assert "| mix.mode: +0.05 ± 0.02 |" in render_markdown(a)


# The plots ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(report_plots.PLOTS))
def test_each_plot_is_skipped_without_data(tmp_path, name):
    file, plot = report_plots.PLOTS[name]
    empty = answer()
    empty.update(trials=[], ablation=[], confirm=[], rung_tau=[])
    assert plot(empty, tmp_path / file) is False and not (tmp_path / file).exists()
    assert plot(answer(), tmp_path / file) is True
    _png(tmp_path / file)


def test_rung_points_come_from_the_entry_or_from_the_curves_at_the_rung_epoch():
    a = answer()
    # search trials that ran to the end (done), at epoch 1: t0 t1 t2 t4 t5 t6
    got = report_plots.rung_points(a, {"rung": 1, "epoch": 1})
    want = [(0.6 + 0.01 * i, 0.9 + 0.01 * i) for i in (0, 1, 2, 4, 5, 6)]
    assert [x for p in got for x in p] == pytest.approx([x for p in want for x in p])
    given = {"rung": 1, "points": [[0.4, 0.9], {"rung_score": 0.5, "final": 0.8}, [0.3, None]]}
    assert report_plots.rung_points(a, given) == [(0.4, 0.9), (0.5, 0.8)]
    assert report_plots.rung_points(a, {"rung": 1}) == got  # the rung is the epoch ASHA compares at
    assert report_plots.rung_points(a, {"rung": None, "tau": 0.5, "n": 3}) == []  # nothing to draw


# The CLI -----------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_answer(monkeypatch):
    """`search.report`'s `build_answer` returning the fixed answer for the experiment it is given."""
    calls: list[Any] = []

    def build_answer(exp):
        calls.append(exp)
        a = answer()
        a["experiment"] = exp.path
        return a

    import search.report

    monkeypatch.setattr(search.report, "build_answer", build_answer)
    return calls


def _experiment(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / SEARCH_INFO).write_text(json.dumps({"overrides": []}))
    return path


def test_cli_writes_into_the_experiment_and_prints_the_answer(tmp_path, fake_answer, capsys):
    exp = _experiment(tmp_path / "exps" / "quickstart")
    assert main(["--experiment", str(exp)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == answer()["message"]
    assert f"wrote {exp / 'report' / 'report.md'}" in out
    assert fake_answer[0].path == str(exp)
    assert (exp / "report" / "report.md").read_text().startswith("# Trick search: quickstart")
    elsewhere = tmp_path / "elsewhere"
    assert main(["--experiment", str(exp), "--out", str(elsewhere)]) == 0
    _png(elsewhere / "learning_curves.png")


@pytest.mark.parametrize("case", ["missing", "not ours", "user error"])
def test_cli_user_errors_are_one_line(tmp_path, fake_answer, capsys, monkeypatch, case):
    path = tmp_path / "nowhere"
    if case != "missing":
        path.mkdir()
    if case == "user error":
        (path / SEARCH_INFO).write_text("{}")

        def broken(exp):
            raise ConfigError(f"{exp.path}/{SEARCH_INFO}: damaged (expected a JSON object with an 'overrides' list)")

        monkeypatch.setattr(sys.modules["search.report"], "build_answer", broken)
    assert main(["--experiment", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err
    expected = {"missing": "no such folder", "not ours": "not an experiment of this tool",
                "user error": "damaged"}[case]
    assert expected in err
    assert not (path / "report").exists()


def test_cli_uploads_the_report_of_a_remote_experiment(s3, fake_answer, monkeypatch, capsys):  # noqa: F811
    client, env = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client.put_object(Bucket="trick-bucket", Key=f"exps/remote/{SEARCH_INFO}", Body=b'{"overrides": []}')
    assert main(["--experiment", "s3://trick-bucket/exps/remote"]) == 0
    assert "wrote s3://trick-bucket/exps/remote/report/report.md" in capsys.readouterr().out
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="trick-bucket", Prefix="exps/remote/report/")["Contents"]}
    assert {"exps/remote/report/report.md", "exps/remote/report/report.json",
            "exps/remote/report/learning_curves.png"} <= keys
    body = client.get_object(Bucket="trick-bucket", Key="exps/remote/report/report.md")["Body"].read().decode()
    assert "![Trials](learning_curves.png)" in body


# Importance over a real study -----------------------------------------------------------------------------------
MODES = ["none", "mixup", "cutmix"]
DISTS = {"mix.mode": CategoricalDistribution(MODES), "label_smoothing": FloatDistribution(0.0, 0.2),
         "mix.mixup_alpha": FloatDistribution(0.1, 1.0)}


def _trial(mode: str, ls: float, value: float | None, state: TrialState = TrialState.COMPLETE,
           **attrs: Any) -> optuna.trial.FrozenTrial:
    """A search trial; a pruned one has its short-budget value as its last intermediate value."""
    params: dict[str, Any] = {"mix.mode": mode, "label_smoothing": ls}
    if mode == "mixup":  # a `when` child: set only when mix.mode is mixup
        params["mix.mixup_alpha"] = 0.2 + ls
    pruned = state == TrialState.PRUNED
    return create_trial(state=state, value=None if pruned else value, params=params,
                        distributions={k: DISTS[k] for k in params}, user_attrs=attrs,
                        intermediate_values={1: value} if pruned else None)


def _study(tmp_path: Path, trials: list[optuna.trial.FrozenTrial], diverged: list[tuple[str, float]] = ()) -> str:
    """A study in SQLite; each of `diverged` (mix mode, label smoothing) is a trial marked as
    search/study.py marks a divergence: run_status and error, infeasible, the worst value."""
    db = str(tmp_path / "optuna.db")
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{db}", direction="maximize")
    study.add_trials(trials)
    for mode, ls in diverged:
        study.enqueue_trial({"mix.mode": mode, "label_smoothing": ls})
        t = study.ask()
        assert (t.suggest_categorical("mix.mode", MODES), t.suggest_float("label_smoothing", 0.0, 0.2)) == (mode, ls)
        t.set_user_attr(RUN_STATUS, DIVERGED)
        t.set_user_attr(RUN_ERROR, "diverged: non-finite loss")
        t.set_constraint(DIVERGED, 1.0)
        study.tell(t, worst_value("val_acc"), state=TrialState.COMPLETE)
    return db


def _grid(n: int) -> list[optuna.trial.FrozenTrial]:
    """mix.mode decides the value; label smoothing, spread the same way under every mode,
    changes nothing."""
    effect = {"none": 0.5, "mixup": 0.7, "cutmix": 0.9}
    return [_trial(MODES[i % 3], 0.2 * ((i // 3) % 5) / 4, effect[MODES[i % 3]]) for i in range(n)]


# diverged runs, all with strong label smoothing: taken for results, they would make it decisive
DIVERGED_RUNS = [(m, 0.2) for m in MODES * 3]
# pruned runs whose short-budget values follow label smoothing
PRUNED_RUNS = [_trial(MODES[i % 3], 0.2 * (i % 2), 0.1 + 0.8 * (i % 2), TrialState.PRUNED) for i in range(10)]


def test_importance_ranks_the_key_that_decides_first_without_pruned_and_diverged_trials(tmp_path):
    confirm_run = _trial("none", 0.0, 0.99, phase="confirm")
    db = _study(tmp_path, _grid(15) + PRUNED_RUNS + [confirm_run], DIVERGED_RUNS)
    keys = ["mix.mode", "label_smoothing", "mix.mixup_alpha"]
    result, note = importance(db, "s", keys)
    for name in EVALUATORS:
        assert next(iter(result[name])) == "mix.mode", (name, result[name])
        assert result[name]["mix.mode"] > 0.8 and sum(result[name].values()) == pytest.approx(1.0)
    assert "over the 15 search trials that ran all their epochs" in note
    assert "10 pruned trials left out because their last value comes from a shorter budget" in note
    assert "9 diverged left out" in note
    # the conditional key: PED-ANOVA scores it within the trials that set it, fANOVA leaves it out
    assert "mix.mixup_alpha" in result["PedAnovaImportanceEvaluator"]
    assert "mix.mixup_alpha" not in result["FanovaImportanceEvaluator"]
    assert "fANOVA leaves out the keys set only when their `when` holds: mix.mixup_alpha (5 of 15)" in note
    assert "\n" not in note
    # deterministic: the same numbers again
    assert importance(db, "s", keys)[0] == result


def test_the_excluded_trials_would_change_the_ranking(tmp_path):
    """The exclusion matters (so the test above can fail): Optuna's evaluators on the study as
    it is, diverged trials included, rank label smoothing first; with the pruned trials' last
    values as results as well, too."""
    db = _study(tmp_path, _grid(15) + PRUNED_RUNS, DIVERGED_RUNS)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    params = ["mix.mode", "label_smoothing"]
    as_is = optuna.importance.FanovaImportanceEvaluator(seed=0).evaluate(study, params=params)
    assert next(iter(as_is)) == "label_smoothing", as_is
    budget_blind = optuna.create_study(direction="maximize")
    budget_blind.add_trials([
        create_trial(state=TrialState.COMPLETE, params=t.params, distributions=t.distributions,
                     value=t.value if t.state == TrialState.COMPLETE else t.intermediate_values[1])
        for t in study.trials if t.user_attrs.get(RUN_STATUS) != DIVERGED])
    naive = optuna.importance.FanovaImportanceEvaluator(seed=0).evaluate(budget_blind, params=params)
    assert next(iter(naive)) == "label_smoothing", naive
    result, _ = importance(db, "s", params)
    assert next(iter(result["FanovaImportanceEvaluator"])) == "mix.mode"


@pytest.mark.parametrize("case", ["no file", "no study", "two trials", "equal values", "only pruned"])
def test_too_little_to_go_on_gives_empty_importance_and_a_note(tmp_path, case):
    db = str(tmp_path / "optuna.db")
    if case == "two trials":
        db = _study(tmp_path, _grid(2), [("none", 0.2)])
    elif case == "equal values":
        db = _study(tmp_path, [_trial(m, 0.1, 0.5) for m in MODES * 2])
    elif case == "only pruned":
        db = _study(tmp_path, [_trial(m, 0.1, 0.5, TrialState.PRUNED) for m in MODES])
    elif case == "no study":
        db = _study(tmp_path, _grid(6))
    result, note = importance(db, "other" if case == "no study" else "s", ["mix.mode", "label_smoothing"])
    assert result == {name: {} for name in EVALUATORS}
    expected = {"no file": "does not exist", "no study": "no study named 'other'",
                "two trials": "2 usable trials (at least 3 needed)", "equal values": "the same value",
                "only pruned": "0 usable trials"}[case]
    assert expected in note and "\n" not in note
    if case == "no file":
        assert not (tmp_path / "optuna.db").exists()  # reading never creates a study


def test_phase_attr_name_is_the_studys():
    from search.experiment.study import PHASE as STUDY_PHASE

    assert PHASE == STUDY_PHASE
