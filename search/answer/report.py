"""An experiment's answer as a report: `report.md` (the answer first, then the evidence),
PNG plots and `report.json`, written into a folder (by default `<experiment>/report/`,
regenerated as the experiment runs; `python -m search.report` writes it on demand).

`write_report` takes the answer dict of `search.answer.build.build_answer`; the plots are
small functions of that dict (`search.answer.plots`), each skipped when it has no data.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from search.answer.stats import MIN_SEEDS_STRONG
from trainable.config import ConfigError
from trainable.config_io import write_atomic

__all__ = ["fmt_delta", "fmt_value", "publish_report", "render_markdown", "write_report"]

STAGES = ("searching", "confirming", "ablating", "finished")


# Numbers -------------------------------------------------------------------------------------------------
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_acc(metric: str) -> bool:
    return "acc" in metric


def _half(ci: Any) -> float | None:
    """Half the width of a 95% CI [lo, hi]; None when it is missing or unbounded."""
    if not ci or len(ci) != 2 or not (_finite(ci[0]) and _finite(ci[1])):
        return None
    return (ci[1] - ci[0]) / 2


def fmt_value(x: Any, metric: str) -> str:
    """A metric value: accuracies in %, losses as they are."""
    if not _finite(x):
        return "-"
    return f"{100 * x:.2f}%" if _is_acc(metric) else f"{x:.4g}"


def fmt_delta(delta: Any, ci: Any, metric: str) -> str:
    """A difference ± its CI half-width: accuracies in percentage points ("+0.8 ± 0.3 pp"),
    losses raw; "no CI" when the interval is missing or unbounded (one seed)."""
    if not _finite(delta):
        return "-"
    half = _half(ci)
    if _is_acc(metric):
        d = 1 if half is None or 100 * half >= 0.1 else 2
        text = f"{100 * delta:+.{d}f}"
        return f"{text} ± {100 * half:.{d}f} pp" if half is not None else f"{text} pp (no CI)"
    return f"{delta:+.4g} ± {half:.2g}" if half is not None else f"{delta:+.4g} (no CI)"


def _mean_ci(entry: dict[str, Any], metric: str) -> str:
    half = _half(entry.get("ci95"))
    mean = fmt_value(entry.get("mean"), metric)
    if half is None:
        return f"{mean} (one seed, no CI)" if len(entry.get("values") or []) <= 1 else f"{mean} (no CI)"
    return f"{mean} ± {100 * half:.2f} pp" if _is_acc(metric) else f"{mean} ± {half:.2g}"


INACTIVE = "–"
"""A key the config does not use (a `when` key whose condition does not hold)."""


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


# Markdown ------------------------------------------------------------------------------------------------
def _missing(answer: dict[str, Any], stage: str, off: str) -> str:
    """Why a section has no data: its stage has not run yet, or it is turned off."""
    state = answer.get("state") or "searching"
    now, at = (STAGES.index(state) if state in STAGES else 0), STAGES.index(stage)
    if now < at:
        return f"not started yet (the experiment is {state})"
    if now == at:
        return "still running"
    return f"not run ({off})"


def _no_difference(other: dict[str, Any] | None, ref: dict[str, Any] | None) -> str:
    """Why there is no paired difference between two configs, in words."""
    if other is None:
        return "no other config finished every seed, so there is no difference to show"
    if len(other.get("values") or []) < 2 or len((ref or {}).get("values") or []) < 2:
        return f"no paired difference: {other.get('label')} has fewer than two seeds"
    return f"no paired difference: {other.get('label')} ran on other seeds than the reference"


def _seeds(seeds: list[Any]) -> str:
    return f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}"


def _unstable(a: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """(label, seeds) of each confirmed config with a diverged or failed seed."""
    return [(str(c.get("label")), list(c["unstable_seeds"])) for c in a.get("confirm") or [] if c.get("unstable_seeds")]


def _over_baseline(vb: dict[str, Any] | None, metric: str) -> str | None:
    """The winner's gain over the baseline: the selection-adjusted figure first, then the raw
    paired mean with its CI; None without one."""
    if not vb or not _finite(vb.get("delta")):
        return None
    raw = fmt_delta(vb["delta"], vb.get("ci95"), metric)
    if not _finite(vb.get("adjusted")):
        return f"Over the baseline it gains {raw} (paired mean over the same seeds, 95% CI)."
    adjusted = fmt_delta(vb["adjusted"], None, metric).replace(" (no CI)", "")
    same = (" (unchanged: a gain this far above the bar is hardly inflated)"
            if raw.split(" ")[0] == adjusted.split(" ")[0] else "")
    return (f"Over the baseline it gains {adjusted}, adjusted for having been selected (a gain reported because "
            "its interval cleared 0 is biased upwards, so it is shrunk towards what such a selection leaves); "
            f"the raw paired mean over the same seeds is {raw} (95% CI){same}.")


def _unconfirmed(a: dict[str, Any], w: dict[str, Any]) -> str:
    reason = a.get("verdict_reason")
    if w.get("role") not in ("candidate", "baseline") or not a.get("confirm"):
        why = f" ({reason})" if reason else ""
        return (f"**Verdict: unconfirmed.** This answer rests on one seed of the search and is not confirmed{why}; "
                "it is no evidence that this config beats any other.")
    if reason == "one seed":
        reason = "the confirmation ran one seed, and nothing is claimed from one seed"
    return (f"**Verdict: unconfirmed**: {reason or 'no reason recorded'}. {w.get('label')} is only the best "
            "confirmed config so far; this is no evidence that it beats the baseline.")


def _answer(a: dict[str, Any]) -> list[str]:
    metric, verdict, w = a.get("metric", "metric"), a.get("verdict"), a.get("winner")
    out = [a.get("message") or "(no answer yet)"]
    if not w:
        failed = [f"**Failed trials:** {a['failed']['line']}", ""] if (a.get("failed") or {}).get("line") else []
        return [out[0], "", f"No winner yet: the experiment is {a.get('state') or 'searching'}.", "", *failed]
    changed = ", ".join(w.get("changed") or []) or "nothing (the baseline)"
    seeds = w.get("seeds") or []
    over = f"{len(seeds)} seeds ({', '.join(map(str, seeds))})" if len(seeds) != 1 else f"one seed ({seeds[0]})"
    out.append(f"**Winner: {w.get('label')}**: {metric} {_mean_ci(w, metric)} over {over}; "
               f"changed from the baseline: {changed}.")
    if (a.get("state") or "searching") != "finished":
        out.append(f"Not final: the experiment is {a.get('state') or 'searching'}, so this answer may still change.")
    ru, vr, vb, base = a.get("runner_up"), a.get("vs_runner_up"), a.get("vs_baseline"), a.get("baseline")
    ru_label = (ru or {}).get("label") or "the runner-up"
    if verdict == "tie":
        to_ru = (f"paired difference {fmt_delta(vr['delta'], vr.get('ci95'), metric)}, 95% CI contains 0"
                 if vr and _finite(vr.get("delta")) else _no_difference(ru, w))
        out.append(f"**Verdict: tie.** {ru_label}, the best by mean, is statistically tied with "
                   f"the winner ({to_ru}), so the simpler config (fewer tricks changed from the baseline) was preferred."
                   + (f" {gain}" if (gain := _over_baseline(vb, metric)) else ""))
    elif verdict == "no gain over baseline":
        if vr and _finite(vr.get("delta")):  # winner (the baseline) minus the best other config: turned round
            lo, hi = (vr.get("ci95") or [None, None])[:2]
            flipped = [-hi, -lo] if _finite(lo) and _finite(hi) else None
            best = (f"the best other config by mean, {ru_label}, differs from the baseline by "
                    f"{fmt_delta(-vr['delta'], flipped, metric)} (paired over the same seeds; its 95% CI does not "
                    "lie above 0)")
        else:
            best = _no_difference(ru, base)
        out.append(f"**Verdict: no gain over the baseline.** No trick combination beat the baseline on this data: {best}.")
    elif verdict == "unconfirmed":
        out.append(_unconfirmed(a, w))
    elif verdict == "winner":
        adjusted = vb is not None and _finite(vb.get("adjusted"))
        parts = [f"the {name}{f' ({lbl})' if lbl else ''} by {fmt_delta(d.get('delta'), d.get('ci95'), metric)}"
                 for name, lbl, d in (("runner-up", (ru or {}).get("label"), vr),
                                      ("baseline", None, None if adjusted else vb)) if d]
        out.append(" ".join(["**Verdict: winner.**",
                             *(["It beats " + " and ".join(parts) + " (paired over the same seeds, 95% CI)."]
                               if parts else []),
                             *([_over_baseline(vb, metric) or ""] if adjusted else [])]))
    if a.get("weak") and verdict != "unconfirmed":
        n = len(w.get("seeds") or [])
        out.append(f"**Weak verdict:** it rests on only {n} seeds (a firm one needs at least {MIN_SEEDS_STRONG}; "
                   f"with {n}, a 95% interval is wide); set experiment.confirm.seeds >= {MIN_SEEDS_STRONG}.")
    for label, seeds in _unstable(a):
        out.append(f"**Unstable:** {label} is unstable ({_seeds(seeds)} diverged or failed), so it is never "
                   "the answer.")
    if base and (verdict != "unconfirmed" or _finite(base.get("mean"))):
        out.append(f"Baseline: {metric} {_mean_ci(base, metric)}." if _finite(base.get("mean")) else
                   f"Baseline: no score ({base.get('status') or 'no seed finished'}).")
    if (a.get("failed") or {}).get("line"):
        out.append(f"**Failed trials:** {a['failed']['line']}")
    out += [f"Note: {str(n).rstrip('.')}." for n in a.get("notes") or []]
    b = a.get("budget") or {}
    if b:
        confirm = (f", confirmation runs {b['epochs_confirm']} epochs ({b.get('trial_epochs_confirm', '?')} "
                   "trial-epochs)" if b.get("epochs_confirm") else ", no confirmation runs")
        out.append(f"Budget: search trials up to {b.get('epochs_search', '?')} epochs "
                   f"({b.get('trial_epochs_search', '?')} trial-epochs){confirm}; "
                   "production needs its own epochs and the full data.")
    return [x for line in out for x in (line, "")]


def _confirm(a: dict[str, Any]) -> list[str]:
    metric, rows, pb = a.get("metric", "metric"), a.get("confirm") or [], a.get("p_best") or {}
    if not rows:
        return [f"Confirmation: {_missing(a, 'confirming', 'experiment.confirm is off')}.", ""]
    def name(c: dict[str, Any]) -> str:
        tag = c.get("role") == "baseline" and c.get("label") != "baseline"
        return _cell(c.get("label")) + (" (baseline)" if tag else "")

    base = next((c for c in rows if c.get("role") == "baseline"), None)
    body = [[name(c) + (f", unstable ({_seeds(c['unstable_seeds'])})" if c.get("unstable_seeds") else ""),
             _cell(_changed_values(c, base)), _mean_ci(c, metric), _vs_baseline(c, base, metric),
             f"{100 * c['std']:.2f} pp" if _is_acc(metric) and _finite(c.get("std")) else
             ("n/a (one seed)" if len(c.get("values") or []) <= 1 else _cell(c.get("std"))),
             ", ".join(fmt_value(v, metric) for v in c.get("values") or [])
             + (f"; {_seeds(c['unstable_seeds'])} diverged or failed" if c.get("unstable_seeds") else ""),
             f"{pb[c['label']]:.2f}" if _finite(pb.get(c.get("label"))) else
             ("n/a (unstable)" if c.get("unstable_seeds") else "n/a")] for c in rows]
    head = ["config", "changed from the baseline", f"{metric} mean ± 95% CI", "paired Δ to the baseline ± 95% CI",
            "std", "per seed", "P(best)"]
    seeds = ", ".join(map(str, rows[0].get("seeds") or []))
    why_pb = "" if pb else " P(best) needs at least two seeds per config."
    return [f"Each config trained on the same seeds ({seeds}) at the full budget. The paired Δ is the config "
            "minus the baseline seed by seed (positive: better), the comparison the verdict rests on and the "
            "figure shows; a config with a diverged or failed seed is unstable and never the answer." + why_pb, "",
            *_table(head, body), ""]


def _vs_baseline(c: dict[str, Any], base: dict[str, Any] | None, metric: str) -> str:
    """A config's paired difference to the baseline with its 95% CI (`vs_baseline`, the
    verdict's computation), or why there is none."""
    d = c.get("vs_baseline")
    if c.get("role") == "baseline":
        return "(the baseline)"
    if d and _finite(d.get("delta")):
        return fmt_delta(d["delta"], d.get("ci95"), metric)
    if c.get("unstable_seeds"):
        return f"none: unstable ({_seeds(c['unstable_seeds'])})"
    if "vs_baseline" not in c:
        return "not in this answer (built before the paired Δ was recorded)"
    if base is None:
        return "none: the confirmation has no baseline"
    if base.get("unstable_seeds") or base.get("status", "done") != "done" or not base.get("values"):
        return "none: the baseline has no stable result on every seed"
    if c.get("status", "done") != "done":
        return f"none: {c.get('status')}"
    if len(c.get("values") or []) < 2:
        return "none: one seed"
    return "none: ran on other seeds than the baseline"


def _changed_values(c: dict[str, Any], base: dict[str, Any] | None) -> str:
    """The keys a config uses whose values differ from the baseline's, as key=value."""
    if c.get("role") == "baseline":
        return "(the baseline)"
    config, active = c.get("config") or {}, c.get("active")
    keys = [k for k in config if active is None or k in active]
    ref = (base or {}).get("config") or {}
    changed = [f"{k}={_cell(config[k])}" for k in keys if k not in ref or ref[k] != config[k]]
    return ", ".join(changed) or ", ".join(c.get("changed") or []) or "nothing"


def _ablation(a: dict[str, Any]) -> list[str]:
    metric, rows, w = a.get("metric", "metric"), a.get("ablation") or [], a.get("winner") or {}
    if a.get("ablation_note"):  # a stale ablation, planned for another config: its deltas say nothing here
        return [f"Ablation: {str(a['ablation_note']).rstrip('.')}.", ""]
    if not rows:
        if w and not w.get("changed") and a.get("state") == "finished":
            return ["Ablation: nothing to take out (the winner changes no trick from the baseline).", ""]
        off = "no confirmed winner to ablate" if a.get("verdict") == "unconfirmed" else "experiment.ablate is off"
        return [f"Ablation: {_missing(a, 'ablating', off)}.", ""]
    unit = "pp" if _is_acc(metric) else "raw"
    body = []
    for r in rows:
        half = _half(r.get("ci95"))
        sure = "" if half is None or abs(r.get("delta") or 0.0) > half else " (CI contains 0)"
        body.append([f"{_cell(r.get('trick'))}: {fmt_delta(r.get('delta'), r.get('ci95'), metric)}{sure}",
                     _cell(", ".join(f"{k}={v}" for k, v in (r.get("reset") or {}).items()
                                     if r.get("active") is None or k in r["active"])),  # keys it uses
                     ", ".join(fmt_delta(v, None, metric).replace(" (no CI)", "").removesuffix(" pp")
                               for v in r.get("values") or [])])
    return [("The winner minus the winner with one trick reset to its base value, paired over the same "
             f"seeds ({unit}); positive: the trick helps."), "",
            *_table(["trick: Δ ± 95% CI", "reset to", "per seed"], body), ""]


def _importance(a: dict[str, Any]) -> list[str]:
    imp, note = a.get("importance") or {}, a.get("importance_note") or ""
    names = [n for n in imp if imp[n]]
    if not names:
        return [f"Importance: {note or 'not computed yet'}.", ""]
    keys = list(dict.fromkeys(k for n in names for k in imp[n]))
    body = [[_cell(k), *(f"{imp[n][k]:.3f}" if k in imp[n] else "-" for n in names)] for k in keys]
    short = [{"PedAnovaImportanceEvaluator": "PED-ANOVA", "FanovaImportanceEvaluator": "fANOVA"}.get(n, n)
             for n in names]
    return [f"Single-seed, unlike the ablation: {note}." if note else "Single-seed, unlike the ablation.", "",
            *_table(["key", *short], body), ""]


def _rungs(a: dict[str, Any]) -> list[str]:
    metric, taus, late = a.get("metric", "metric"), a.get("rung_tau") or [], a.get("late_bloomers") or []
    if not taus:
        why = ("no audited trial has finished yet" if a.get("state") in (None, "searching") else
               "not run (no audited trials: experiment.scheduler.audit is off, or ASHA stopped none)")
        return [f"Rung audit: {why}.", ""]
    out = [("Kendall τ between each rung's score and the final score of the trials that ran to the end "
            "(1: early stopping ranks as the end would)."), "",
           *_table(["rung (epoch)", "τ", "n"],
                   [[_cell(t.get("rung")), f"{t['tau']:.2f}" if _finite(t.get("tau")) else
                     _cell(t.get("note") or "not computed"), _cell(t.get("n"))] for t in taus]), ""]
    if late:
        out += ["Late bloomers (audited trials ASHA would have stopped):", ""]
        out += [f"- trial {b.get('trial_id')}: rung {b.get('rung')} score {fmt_value(b.get('rung_score'), metric)}, "
                f"final {fmt_value(b.get('final'), metric)}" for b in late]
    else:
        out.append("No late bloomers: none of the audited trials ASHA would have stopped caught up.")
    return [*out, ""]


def _trials(a: dict[str, Any]) -> list[str]:
    metric, rows, keys = a.get("metric", "metric"), a.get("trials") or [], a.get("searched_keys") or []
    if not rows:
        return ["Trials: none yet.", ""]
    extra = any(t.get("phase") != "search" for t in rows)
    head = ["trial", "phase", *(["label", "seed"] if extra else []), *keys,
            f"{metric} (last epoch)", "best over epochs", "epochs", "status", "audited"]
    body = [[_cell(t.get("trial_id")), _cell(t.get("phase")),
             *([_cell(t.get("label")), _cell(t.get("seed"))] if extra else []),
             *(_key_cell(t, k) for k in keys),
             fmt_value(t.get("score"), metric), fmt_value(t.get("best"), metric), _cell(t.get("epochs")),
             _cell(t.get("status")), "yes" if t.get("audited") else ""] for t in rows]
    return ["One score per trial: the metric at its last epoch (the best over epochs is shown for information). "
            f"{INACTIVE}: a key the trial's config does not use (e.g. cutmix_alpha when mixing is mixup).",
            "", *_table(head, body), ""]


def _key_cell(t: dict[str, Any], key: str) -> str:
    """A trial's value of a searched key, or `INACTIVE` when its config does not use the key
    (a search trial samples only the keys it uses; a phase's trial lists them in `active`)."""
    values, active = t.get("values") or {}, t.get("active")
    if key not in values or (active is not None and key not in active):
        return INACTIVE
    return _cell(values[key])


def _caption(a: dict[str, Any], plot: str) -> str:
    """The words under a figure: what it shows and how to read it."""
    if plot == "confirm":
        return ("Each config's gain over the baseline, paired by seed: the black square is the mean with its 95% CI "
                "(the interval the verdict rests on); a coloured line joins one seed across the configs. A config "
                "beats the baseline when its whole interval lies above the red line.")
    if plot == "curves":
        rungs = a.get("rungs") or {}
        text = ("The search trials' learning curves, one panel per trick, coloured by its value; dashed: audited "
                "trials (run to the end although ASHA would have stopped them).")
        if rungs.get("epochs"):
            text += (f" Dotted lines: the rungs (epoch {', '.join(map(str, rungs['epochs']))}), where ASHA compares "
                     "the trials and stops the worse ones.")
            if rungs.get("restarts"):
                text += (" The curves dip just after a rung because the rung schedule anneals the learning rate to "
                         "its floor at each rung (so a rung compares trained models) and re-warms it for the epochs "
                         "after; they climb again as it anneals towards the next rung.")
        return text
    return ""


def render_markdown(answer: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """The report's text; `plots`: {section: image file name relative to report.md}."""
    plots = plots or {}
    name = str(answer.get("experiment") or "").rstrip("/").rsplit("/", 1)[-1]
    state = answer.get("state") or "searching"
    lines = [f"# Trick search: {name}", "",
             f"Experiment `{answer.get('experiment')}`, {state}"
             + ("" if state == "finished" else " (this report is regenerated as it runs)") + ".", "",
             "## Answer", "", *_answer(answer)]
    sections: list[tuple[str, Callable[[dict[str, Any]], list[str]], str]] = [
        ("Confirmation", _confirm, "confirm"), ("What each trick contributed (ablation)", _ablation, "ablation"),
        ("Importance over the search trials", _importance, ""), ("Rung audit", _rungs, "rungs"),
        ("Trials", _trials, "curves")]
    for title, build, plot in sections:
        lines += [f"## {title}", "", *build(answer)]
        if plot in plots:
            lines += [f"![{title}]({plots[plot]})", ""]
            caption = _caption(answer, plot)
            lines += [f"*{caption}*", ""] if caption else []
    return "\n".join(lines).rstrip() + "\n"


# Files ---------------------------------------------------------------------------------------------------
def _json_safe(x: Any) -> Any:
    """Non-finite floats as null: report.json stays strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_report(answer: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write report.json, the plots that have data and report.md into `out_dir` (created;
    the report's own files there are replaced, nothing else is touched). Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    from search.answer import plots as report_plots

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: not a folder (the report is a folder of files)")
    out.mkdir(parents=True, exist_ok=True)
    written = [write_atomic(out / "report.json", json.dumps(_json_safe(answer), indent=2, allow_nan=False) + "\n",
                            overwrite=True)]
    plots: dict[str, str] = {}
    for section, (file, plot) in report_plots.PLOTS.items():
        path = out / file
        if plot(answer, path):
            plots[section] = file
            written.append(path)
    written.append(write_atomic(out / "report.md", render_markdown(answer, plots), overwrite=True))
    return written


def publish_report(exp: Any, answer: dict[str, Any], out: str | None = None) -> list[str]:
    """Write the report of `answer` into `out` (default `<experiment>/report`; on object
    storage it is written locally, then uploaded). Returns the paths written."""
    from trainable.storage import Storage, is_uri

    target = out or f"{exp.path}/report"
    if not is_uri(target):
        return [str(p) for p in write_report(answer, target)]
    store = Storage(target)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_report(answer, tmp)
        for f in files:
            store.upload(f, f.name)
    return [f"{store.root}/{f.name}" for f in files]
