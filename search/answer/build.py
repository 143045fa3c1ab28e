"""The answer of a search: everything an experiment holds gathered into one dict, the
report's `report.json`, which `search.answer.report` writes and `search.export` reads: the
verdict (`search.answer.decide`), the confirmation and ablation with their statistics,
importance over the search trials, the rung audit and every trial's curve."""

from __future__ import annotations

import math
from typing import Any

from search.answer.decide import (UNCONFIRMED, decide, direction, paired_gain, spread_floor, unstable_seeds,
                                  value_bounds, verdict_message)
from search.answer.stats import summarise_values, weighted_tau
from search.experiment.audit import read_audit
from search.experiment.folder import Experiment, recorded_space
from search.experiment.phases import ABLATE, BASELINE, CONFIRM, Measured, ablation_matches, read_phase
from search.experiment.trials import TrialRow, read_results, summarise
from spaces import Space
from trainable.config import ConfigError
from trainable.status import FAILED

__all__ = ["MIN_IMPORTANCE_TRIALS", "MIN_TAU_TRIALS", "build_answer"]

MIN_TAU_TRIALS = 8
"""Trials ranked at a rung (and run to the end) below which its tau is "too few trials": with
fewer, a single swapped pair moves tau by more than 0.05 and its 95% interval spans most of [-1, 1]."""
MIN_IMPORTANCE_TRIALS = 10
"""Search trials that ran all their epochs below which importance is "too few trials"."""


def _summary(m: Measured, space: Space, floor: float = 0.0, baseline: Measured | None = None,
             gain_floor: float = 0.0) -> dict[str, Any]:
    """One confirmed config: its mean and CI over seeds (spread floored at `floor`), and
    `vs_baseline`, its paired difference to `baseline` (the verdict's stable baseline) with the
    95% CI, computed as the verdict computes it (`paired_gain` with the verdict's `gain_floor`);
    None for the baseline itself, an unstable or unfinished config, or without a stable baseline."""
    s = summarise_values(m.values, floor=floor, bounds=value_bounds(space)) if m.values else None
    finite = s is not None and s.n > 1
    stable = m.status == "done" and not unstable_seeds(m)
    gain = (paired_gain(m, baseline, direction(space), gain_floor)
            if baseline is not None and m is not baseline and stable else None)
    return {
        "label": m.entry.label,
        "role": m.entry.role,
        "search_trial": m.entry.search_trial,
        "search_score": m.entry.search_score,
        "config": m.entry.values,
        "changed": space.changed_tricks(m.entry.values),
        "active": list(space.active_values(m.entry.values)),
        "mean": s.mean if s else None,
        "std": s.std if finite else None,
        "ci95": list(s.ci95) if finite else None,
        "seeds": m.seeds,
        "values": m.values,
        "status": m.status,
        "error": m.error,
        "unstable_seeds": unstable_seeds(m),
        "vs_baseline": gain,
    }


def _rung_audit(rows: list[TrialRow], space: Space) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Kendall tau between each rung's score and the final score, and the audited trials that
    would have beaten a promoted one (late bloomers ASHA stopped).

    Tau at rung r is over the trials ASHA ranked at r that ran to the end: those it promoted
    on, and those it stopped at r or later that the audit ran on (a trial audited at an earlier
    rung left the rungs and was never ranked at r). An audited trial stands for the 1/audit
    stopped trials it was sampled from, so it weighs 1/audit in the tau (`weighted_tau`).
    With fewer than `MIN_TAU_TRIALS` such trials tau is None ("too few trials")."""
    sign = direction(space)
    full = [r for r in rows if r.finished]
    audit = space.experiment.scheduler.audit or 0.0
    taus = []
    for rung in space.rung_epochs():
        ranked = [r for r in full if not (r.audited and r.audited_at is not None and r.audited_at < rung)]
        pairs = [(dict(r.curve).get(rung), r.final, 1.0 / audit if r.audited and audit > 0 else 1.0) for r in ranked]
        pairs = [p for p in pairs if p[0] is not None]
        tau = weighted_tau(*zip(*pairs)) if len(pairs) >= MIN_TAU_TRIALS else math.nan
        taus.append({"rung": rung, "tau": None if math.isnan(tau) else tau, "n": len(pairs),
                     "note": None if len(pairs) >= MIN_TAU_TRIALS else
                     f"too few trials ({len(pairs)} ranked at this rung and run to the end; {MIN_TAU_TRIALS} needed)"})
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
                out.append({"trial_id": m.trial_ids.get(seed, m.trial_id), "phase": phase, "label": m.entry.label,
                            "values": m.entry.values, "active": list(space.active_values(m.entry.values)),
                            "status": "done" if seed in m.seeds else m.status,
                            "audited": False, "score": score, "best": best,
                            "epochs": max((e for e, _ in curve), default=0), "seed": seed,
                            "curve": [list(p) for p in curve]})
    return out


def failed_trials(rows: list[TrialRow]) -> dict[str, Any] | None:
    """The search trials that failed (`error`: still failing after their retries, a later
    `--resume` retries them; `failed`: an error no retry changes), each with its reason, and
    one line for people ("2 of 48 search trials failed: ..."); None when none failed."""
    failed = [r for r in rows if r.status in ("error", FAILED)]
    if not failed:
        return None
    trials = [{"trial_id": r.trial_id, "status": r.status, "error": r.error or "no reason recorded"} for r in failed]
    reasons = "; ".join(f"{t['trial_id']} ({t['status']}): {t['error']}" for t in trials)
    line = (f"{len(failed)} of {len(rows)} search trials failed: {reasons}. The answer rests on the others"
            + ("; --resume retries those with status error" if any(r.status == "error" for r in failed) else ""))
    return {"count": len(failed), "of": len(rows), "trials": trials, "line": line + "."}


def build_answer(exp: Experiment, space: Space | None = None, results: Any = None) -> dict[str, Any]:
    """Everything the experiment holds, as the answer dict (the report's `report.json`)."""
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
    sign = direction(space)
    finished = [r for r in rows if r.finished]
    best_search = finished[0] if finished else None

    ablation = []
    stale = decision is not None and not ablation_matches([m.entry for m in ablate], decision.winner.entry, space)
    ablation_note = (f"the recorded ablation was planned for another config than the winner "
                     f"({decision.winner.entry.label}); it is re-planned and its effects are not shown"
                     if stale and decision is not None else None)
    if decision is not None and not stale:
        for m in ablate:
            d = paired_gain(decision.winner, m, sign) if m.status == "done" else None
            if d is not None:
                ablation.append({"trick": m.entry.trick, "reset": {k: v for k, v in m.entry.values.items()
                                                                  if v != decision.winner.entry.values.get(k)},
                                 "delta": d["delta"], "ci95": d["ci95"],
                                 "active": list(space.active_values(m.entry.values)),
                                 "values": [sign * (a - b) for a, b in zip(decision.winner.values, m.values)]})

    importance, note = {}, "no search trial has finished all its epochs yet"
    if finished and len(finished) < MIN_IMPORTANCE_TRIALS:
        note = (f"too few trials: {len(finished)} search trials ran all their epochs, "
                f"importance needs {MIN_IMPORTANCE_TRIALS}")
    elif finished:
        try:
            from search.answer.importance import importance as compute_importance

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
          and space.changed_tricks(decision.winner.entry.values)
          and (not ablate or stale or any(m.status == "unfinished" for m in ablate))):
        state = "ablating"
    else:
        state = "finished"

    c = space.experiment.confirm
    confirm_epochs = sum(len(curve) for m in (*confirm, *ablate) for curve in m.curves.values())
    verdict = decision.verdict if decision is not None else UNCONFIRMED
    floor = spread_floor(confirm, space)
    stable = [m for m in confirm if m.status == "done" and m.values and not unstable_seeds(m)]
    gain_floor = spread_floor(stable, space)  # the verdict's floor: over the configs it compares
    summaries = {m.entry.label: _summary(m, space, floor, decision.baseline if decision else None, gain_floor)
                 for m in confirm}
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
        ({"label": f"search trial {best_search.trial_id}", "role": "search", "config": space.full_values(best_search.values),
          "changed": space.changed_tricks(space.full_values(best_search.values)), "mean": best_search.final,
          "std": None, "ci95": None, "seeds": [space.train.run.seed], "values": [best_search.final],
          "search_trial": best_search.trial_id} if best_search else None),
        "baseline": summaries.get(BASELINE),
        "runner_up": summaries.get(decision.runner_up.entry.label) if decision and decision.runner_up else None,
        "vs_runner_up": decision.vs_runner_up if decision else None,
        "vs_baseline": decision.vs_baseline if decision else None,
        "p_best": decision.p_best if decision else {},
        "confirm": list(summaries.values()),
        "ablation": ablation,
        "ablation_note": ablation_note,
        "final": state == "finished" and verdict != UNCONFIRMED,
        "verdict_reason": decision.reason if decision else "no config finished every confirmation seed",
        "weak": bool(decision and decision.weak),
        "notes": ["The confirmation scores the configs on the validation set the search selected them on: "
                  "the winner's score is optimistic; the gain over the baseline is adjusted for its selection."],
        "importance": importance,
        "importance_note": note,
        "rung_tau": taus,
        "late_bloomers": bloomers,
        "failed": failed_trials(rows),
        "trials": _trials(rows, {CONFIRM: confirm, ABLATE: ablate}, space),
        "searched_keys": list(space.searched_paths),
        "tricks": space.tricks,
        "rungs": {"epochs": space.rung_epochs(), "restarts": bool(space.trial_config({}).schedule.restarts)},
    }
