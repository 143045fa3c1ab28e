"""The answer of a search: which config wins, by how much, with what certainty, what each
trick contributed, and how far early stopping could be trusted.

`decide` picks the winner from the confirmation (highest mean over the paired seeds; a tie
with the runner-up goes to the simpler config; no gain over the baseline says so);
`build_answer` gathers everything an experiment holds into the dict that `search.report`
writes as `report.json` (the schema is in its docstring) and `search.export` reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from search.confirm import ABLATE, BASELINE, CONFIRM, Measured, changed_tricks, full_values, read_phase
from search.experiment import Experiment, TrialRow, read_results, recorded_space, summarise
from search.stats import kendall_tau, p_best, paired_difference, summarise_values
from spaces import Space
from trainable.config import ConfigError

__all__ = ["Decision", "build_answer", "decide", "verdict_message"]

WINNER, TIE, NO_GAIN, UNCONFIRMED = "winner", "tie", "no gain over baseline", "unconfirmed"


@dataclass
class Decision:
    """The outcome of a confirmation: the winner, the runner-up, the verdict and the paired
    comparisons (winner minus other, signed so that positive means the winner is better)."""

    winner: Measured
    runner_up: Measured | None
    baseline: Measured | None
    verdict: str
    vs_runner_up: dict[str, Any] | None
    vs_baseline: dict[str, Any] | None
    p_best: dict[str, float]


def _sign(space: Space) -> float:
    return 1.0 if space.experiment.mode == "max" else -1.0


def _diff(a: Measured, b: Measured, sign: float) -> dict[str, Any] | None:
    if len(a.values) < 2 or a.seeds != b.seeds:
        return None
    d = paired_difference([sign * v for v in a.values], [sign * v for v in b.values])
    return {"delta": d.mean, "ci95": list(d.ci95)}


def decide(measured: list[Measured], space: Space) -> Decision | None:
    """The winner among the configs that finished every seed; None when none did."""
    done = [m for m in measured if m.status == "done" and m.values]
    if not done:
        return None
    sign = _sign(space)
    seeds = max((m.seeds for m in done), key=len)
    done = [m for m in done if m.seeds == seeds]  # paired: the same seeds everywhere
    ranked = sorted(done, key=lambda m: -sign * sum(m.values) / len(m.values))
    best, baseline = ranked[0], next((m for m in done if m.entry.role == BASELINE), None)
    if len(seeds) < 2:
        verdict, winner = UNCONFIRMED, best
    elif baseline is not None and (best is baseline or _contains_zero(_diff(best, baseline, sign))):
        verdict, winner = NO_GAIN, baseline
    else:
        tied = [m for m in ranked[1:] if m is not baseline and _contains_zero(_diff(best, m, sign))]
        if tied:  # statistically tied with the best: the config with fewest tricks away from the base
            verdict = TIE
            pool = [best, *tied]
            winner = min(pool, key=lambda m: (len(changed_tricks(space, m.entry.values)), ranked.index(m)))
        else:
            verdict, winner = WINNER, best
    others = [m for m in ranked if m is not winner]
    runner_up = others[0] if others else None
    pb = p_best({m.entry.label: m.values for m in done}, mode=space.experiment.mode) if len(seeds) >= 2 else {}
    return Decision(
        winner, runner_up, baseline, verdict,
        _diff(winner, runner_up, sign) if runner_up else None,
        _diff(winner, baseline, sign) if baseline is not None and baseline is not winner else None,
        pb,
    )


def _contains_zero(diff: dict[str, Any] | None) -> bool:
    return diff is None or diff["ci95"][0] <= 0.0 <= diff["ci95"][1]


def _summary(m: Measured, space: Space) -> dict[str, Any]:
    s = summarise_values(m.values) if m.values else None
    finite = s is not None and s.n > 1
    return {
        "label": m.entry.label,
        "role": m.entry.role,
        "search_trial": m.entry.search_trial,
        "search_score": m.entry.search_score,
        "config": m.entry.values,
        "changed": changed_tricks(space, m.entry.values),
        "mean": s.mean if s else None,
        "std": s.std if finite else None,
        "ci95": list(s.ci95) if finite else None,
        "seeds": m.seeds,
        "values": m.values,
        "status": m.status,
        "error": m.error,
    }


def _fmt(v: float, metric: str) -> str:
    return f"{100 * v:.2f}%" if metric.startswith("val_acc") else f"{v:.4f}"


def verdict_message(d: Decision | None, space: Space, best_search: TrialRow | None) -> str:
    """The answer in one or two sentences."""
    metric = space.experiment.metric
    if d is None:
        if best_search is None:
            return "No trial has finished all its epochs yet: no answer."
        return (f"Unconfirmed: the best search trial scored {metric} {_fmt(best_search.final, metric)} "
                "on one seed; without a confirmation on several seeds this is not an answer to rely on.")
    w = d.winner
    mean = sum(w.values) / len(w.values)
    tricks = ", ".join(changed_tricks(space, w.entry.values)) or "no trick changed"
    if d.verdict == UNCONFIRMED:
        return (f"Unconfirmed: {w.entry.label} ({tricks}) scored {metric} {_fmt(mean, metric)} on one seed; "
                "set experiment.confirm.seeds >= 2 for an answer with a confidence interval.")
    s = summarise_values(w.values)
    ci = f"{_fmt(mean, metric)} (95% CI {_fmt(s.ci95[0], metric)} to {_fmt(s.ci95[1], metric)}, {len(w.values)} seeds)"
    if d.verdict == NO_GAIN:
        return (f"No trick combination beat the baseline on this data: the baseline scores {metric} {ci}, "
                "and no confirmed config is better by more than seed noise.")
    gain = d.vs_baseline
    vs = (f"; {_fmt(gain['delta'], metric)} better than the baseline (95% CI {_fmt(gain['ci95'][0], metric)} "
          f"to {_fmt(gain['ci95'][1], metric)})") if gain else ""
    if d.verdict == TIE:
        return (f"Tie: {w.entry.label} ({tricks}) is statistically tied with the best confirmed config; as the "
                f"simpler of them it is the answer, {metric} {ci}{vs}.")
    return f"Winner: {w.entry.label} ({tricks}), {metric} {ci}{vs}."


def _rung_audit(rows: list[TrialRow], space: Space) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Kendall tau between each rung's score and the final score over the search trials that
    ran to the end (promoted and audited), and the audited trials that would have beaten a
    promoted one (late bloomers ASHA stopped)."""
    sign = _sign(space)
    full = [r for r in rows if r.status == "done" and r.final is not None]
    taus = []
    for rung in space.rung_epochs():
        pairs = [(dict(r.curve).get(rung), r.final) for r in full]
        pairs = [(a, b) for a, b in pairs if a is not None]
        tau = kendall_tau([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= 2 else math.nan
        taus.append({"rung": rung, "tau": None if math.isnan(tau) else tau, "n": len(pairs)})
    promoted = [r.final for r in full if not r.audited]
    bloomers = []
    if promoted:
        worst_promoted = min(promoted, key=lambda v: sign * v)
        for r in full:
            if r.audited and sign * r.final >= sign * worst_promoted:
                bloomers.append({"trial_id": r.trial_id, "rung": r.audited_at,
                                 "rung_score": dict(r.curve).get(r.audited_at), "final": r.final})
    return taus, bloomers


def _trials(rows: list[TrialRow], phases: dict[str, list[Measured]], space: Space) -> list[dict[str, Any]]:
    out = [{"trial_id": r.trial_id, "phase": "search", "label": None, "values": r.values, "status": r.status,
            "audited": r.audited, "score": r.final, "best": r.best, "epochs": r.epochs,
            "seed": space.train.run.seed, "curve": [list(p) for p in r.curve]} for r in rows]
    for phase, measured in phases.items():
        for m in measured:
            for seed, curve in sorted(m.curves.items()):
                vals = [v for _, v in curve]
                score = m.values[m.seeds.index(seed)] if seed in m.seeds else None
                best = (max(vals) if space.experiment.mode == "max" else min(vals)) if vals else None
                out.append({"trial_id": m.trial_id, "phase": phase, "label": m.entry.label,
                            "values": m.entry.values, "status": "done" if seed in m.seeds else m.status,
                            "audited": False, "score": score, "best": best,
                            "epochs": max((e for e, _ in curve), default=0), "seed": seed,
                            "curve": [list(p) for p in curve]})
    return out


def build_answer(exp: Experiment, space: Space | None = None, results: Any = None) -> dict[str, Any]:
    """Everything the experiment holds, as the answer dict (the report's `report.json`)."""
    from search.schedulers import read_audit

    if space is None:
        space, _ = recorded_space(exp)
    if results is None:
        try:
            results = read_results(exp.path)
        except ConfigError:
            results = []
    rows = summarise(results, space, audited=read_audit(exp))
    confirm = read_phase(exp, CONFIRM, space)
    ablate = read_phase(exp, ABLATE, space)
    decision = decide(confirm, space)
    sign = _sign(space)
    finished = [r for r in rows if r.status == "done" and r.final is not None]
    best_search = finished[0] if finished else None

    ablation = []
    if decision is not None:
        for m in ablate:
            d = _diff(decision.winner, m, sign) if m.status == "done" else None
            if d is not None:
                ablation.append({"trick": m.entry.trick, "reset": {k: v for k, v in m.entry.values.items()
                                                                  if v != decision.winner.entry.values.get(k)},
                                 "delta": d["delta"], "ci95": d["ci95"],
                                 "values": [sign * (a - b) for a, b in zip(decision.winner.values, m.values)]})

    importance, note = {}, "no search trial has finished all its epochs yet"
    if finished:
        try:
            from search.importance import importance as compute_importance

            importance, note = compute_importance(exp.study_db, exp.name, list(space.searched_paths))
        except Exception as err:  # importance is an extra: a missing or locked study never hides the answer
            importance, note = {}, f"importance not computed ({type(err).__name__}: {err})"

    taus, bloomers = _rung_audit(rows, space)
    unfinished = any(r.status == "unfinished" for r in rows)
    if unfinished or not rows:
        state = "searching"
    elif space.confirmed and (decision is None or any(m.status == "unfinished" for m in confirm)):
        state = "confirming"
    elif (space.confirmed and space.experiment.ablate and decision is not None
          and changed_tricks(space, decision.winner.entry.values)
          and (not ablate or any(m.status == "unfinished" for m in ablate))):
        state = "ablating"
    else:
        state = "finished"

    c = space.experiment.confirm
    confirm_epochs = sum(len(curve) for m in (*confirm, *ablate) for curve in m.curves.values())
    verdict = decision.verdict if decision is not None else UNCONFIRMED
    summaries = {m.entry.label: _summary(m, space) for m in confirm}
    return {
        "experiment": exp.path,
        "metric": space.experiment.metric,
        "mode": space.experiment.mode,
        "state": state,
        "verdict": verdict,
        "message": verdict_message(decision, space, best_search),
        "budget": {"trial_epochs_search": sum(r.epochs for r in rows), "trial_epochs_confirm": confirm_epochs,
                   "epochs_search": space.train.run.epochs,
                   "epochs_confirm": space.train.run.epochs if c else None},
        "winner": summaries.get(decision.winner.entry.label) if decision else
        ({"label": f"search trial {best_search.trial_id}", "role": "search", "config": full_values(space, best_search.values),
          "changed": changed_tricks(space, full_values(space, best_search.values)), "mean": best_search.final,
          "std": None, "ci95": None, "seeds": [space.train.run.seed], "values": [best_search.final],
          "search_trial": best_search.trial_id} if best_search else None),
        "baseline": summaries.get(BASELINE),
        "runner_up": summaries.get(decision.runner_up.entry.label) if decision and decision.runner_up else None,
        "vs_runner_up": decision.vs_runner_up if decision else None,
        "vs_baseline": decision.vs_baseline if decision else None,
        "p_best": decision.p_best if decision else {},
        "confirm": list(summaries.values()),
        "ablation": ablation,
        "importance": importance,
        "importance_note": note,
        "rung_tau": taus,
        "late_bloomers": bloomers,
        "trials": _trials(rows, {CONFIRM: confirm, ABLATE: ablate}, space),
        "searched_keys": list(space.searched_paths),
        "tricks": space.tricks,
    }
