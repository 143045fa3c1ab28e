"""The report's plots, one small function each: `plot(answer, path) -> bool` draws from the
answer dict of `search.answer.build.build_answer` and writes a PNG at `path`, or writes nothing and
returns False when there is no data to draw. The caller selects the Agg backend."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

__all__ = ["PLOTS", "paired_to_baseline", "plot_ablation", "plot_confirm", "plot_curves", "plot_rungs", "rung_points"]

MAX_CATEGORIES = 6  # a numeric trick with more distinct values is coloured on a scale


def _ok(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _scale(answer: dict[str, Any]) -> tuple[float, str]:
    """Accuracies are drawn in %, differences of accuracies in pp; losses as they are."""
    metric = answer.get("metric") or "metric"
    return (100.0, f"{metric} (%)") if "acc" in metric else (1.0, metric)


def _save(fig: Any, path: Path) -> None:
    """Write the figure through a temporary file and a rename (a reader never sees half a PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot_curves(answer: dict[str, Any], path: Path) -> bool:
    """Learning curves of the search trials, one panel per trick, coloured by its value;
    audited trials dashed; the rung epochs (where ASHA compares trials) as dotted lines."""
    trials = [t for t in answer.get("trials") or [] if t.get("phase") == "search" and t.get("curve")]
    tricks = list(answer.get("tricks") or {}) or list(answer.get("searched_keys") or [])
    if not trials or not tricks:
        return False
    k, (scale, ylabel) = len(tricks), _scale(answer)
    cols = min(3, k)
    rows = math.ceil(k / cols)
    rungs = [e for e in (answer.get("rungs") or {}).get("epochs") or [] if _ok(e)]
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows + 0.6), squeeze=False, layout="constrained")
    for ax, trick in zip(axes.flat, tricks):
        for i, e in enumerate(rungs):
            ax.axvline(e, color="grey", linestyle=":", linewidth=1.0, label="rung" if i == 0 else None)
        values = [(t.get("values") or {}).get(trick) for t in trials]
        numeric = [v for v in values if _ok(v)]
        scaled = len(numeric) == len(values) and len(set(numeric)) > MAX_CATEGORIES
        if scaled:
            lo, hi = min(numeric), max(numeric)
            cmap = plt.get_cmap("viridis")
            colour = {v: cmap((v - lo) / (hi - lo) if hi > lo else 0.5) for v in numeric}
        else:
            cats = list(dict.fromkeys("unset" if v is None else str(v) for v in values))
            colour = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(cats)}
        seen: set[str] = set()
        for t, v in zip(trials, values):
            key = v if scaled else ("unset" if v is None else str(v))
            xs = [p[0] for p in t["curve"] if _ok(p[1])]
            ys = [p[1] * scale for p in t["curve"] if _ok(p[1])]
            label = None if scaled or key in seen else str(key)
            seen.add(str(key))
            ax.plot(xs, ys, color=colour[key], linestyle="--" if t.get("audited") else "-",
                    marker="o", markersize=2.5, linewidth=1.2, alpha=0.85, label=label)
        if scaled:
            sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(min(numeric), max(numeric)))
            fig.colorbar(sm, ax=ax, label=trick)
        else:
            ax.legend(title=trick, fontsize=7, title_fontsize=8)
        if scaled and rungs:
            ax.legend(fontsize=7)  # the rung line
        ax.set(title=trick, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[k:]:
        ax.set_visible(False)
    fig.suptitle(curves_caption(answer), fontsize=9)
    _save(fig, path)
    return True


def plot_ablation(answer: dict[str, Any], path: Path) -> bool:
    """Forest plot: each trick's Δ (winner minus the winner without it) with its 95% CI."""
    rows = [r for r in answer.get("ablation") or [] if _ok(r.get("delta"))]
    if not rows:
        return False
    scale, _ = _scale(answer)
    unit = "pp" if scale == 100.0 else (answer.get("metric") or "")
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(rows) + 1.2))
    for y, r in enumerate(reversed(rows)):
        d, ci = r["delta"] * scale, r.get("ci95") or [None, None]
        err = [[d - ci[0] * scale], [ci[1] * scale - d]] if _ok(ci[0]) and _ok(ci[1]) else None
        ax.errorbar(d, y, xerr=err, fmt="o", color="tab:blue", capsize=4)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [str(r.get("trick")) for r in reversed(rows)])
    ax.set(xlabel=f"Δ {unit} (positive: the trick helps)", title="leave-one-trick-out ablation, 95% CI")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return True


def curves_caption(answer: dict[str, Any]) -> str:
    """What the learning-curve figure shows, and why its curves dip after a rung."""
    rungs = (answer.get("rungs") or {})
    text = "search trials; dashed: audited (run to the end although ASHA would have stopped them)"
    if rungs.get("epochs"):
        text += f"; dotted: the rungs (epoch {', '.join(map(str, rungs['epochs']))}), where ASHA compares trials"
        if rungs.get("restarts"):
            text += ("\nthe rung schedule anneals the learning rate to its floor at each rung and re-warms it after, "
                     "so a curve dips just after a rung before it climbs again")
    return text


def paired_to_baseline(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """Each confirmed config against the baseline on their shared seeds: per seed the
    difference (signed: positive is better than the baseline) and its mean with the 95% CI.
    The mean and CI are the config's `vs_baseline` in the answer (`search.answer.build`: the
    verdict's `search.answer.decide.paired_gain`, which the report's table shows too); an
    answer without that field (an older report.json) gets them from `paired_gain` here, with
    the verdict's floor (over the configs without an unstable seed). [] without a baseline."""
    from search.answer.decide import paired_gain
    from search.answer.stats import rounding_floor
    from search.experiment.phases import Entry, Measured

    rows = [c for c in answer.get("confirm") or [] if c.get("values")]
    base = next((c for c in rows if c.get("role") == "baseline"), None)
    if base is None:
        return []
    sign = -1.0 if answer.get("mode") == "min" else 1.0

    def stable(c: dict[str, Any]) -> bool:
        return c.get("status", "done") == "done" and not c.get("unstable_seeds")

    floor = (rounding_floor([v for c in rows if stable(c) for v in c["values"]])
             if str(answer.get("metric") or "").startswith("val_acc") else 0.0)

    def measured(c: dict[str, Any]) -> Measured:
        return Measured(Entry(str(c.get("label")), str(c.get("role")), c.get("config") or {}), "",
                        seeds=list(c.get("seeds") or []), values=list(c["values"]))

    by_seed = dict(zip(base.get("seeds") or [], base["values"]))
    out = []
    for c in rows:
        if c is base:
            continue
        seeds = [s for s in c.get("seeds") or [] if s in by_seed]
        own = dict(zip(c.get("seeds") or [], c["values"]))
        d = (c["vs_baseline"] if "vs_baseline" in c else
             paired_gain(measured(c), measured(base), sign, floor) if stable(c) and stable(base) else None)
        out.append({"label": c.get("label"), "seeds": seeds, "diffs": [sign * (own[s] - by_seed[s]) for s in seeds],
                    "delta": d["delta"] if d else None, "ci95": list(d["ci95"]) if d else None,
                    "unstable_seeds": list(c.get("unstable_seeds") or [])})
    return out


def plot_confirm(answer: dict[str, Any], path: Path) -> bool:
    """Each config's paired difference to the baseline (the comparison the verdict rests on):
    its mean with the 95% CI, and the per-seed differences, joined across configs by seed."""
    rows = paired_to_baseline(answer)
    if not rows:
        return False
    scale, _ = _scale(answer)
    unit = "pp" if scale == 100.0 else str(answer.get("metric") or "")
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 3.2, 3.8), layout="constrained")
    seeds = sorted({s for r in rows for s in r["seeds"]})
    for i, seed in enumerate(seeds):  # each seed a little apart, so equal differences stay visible
        xs = [x + 0.15 + 0.06 * i for x, r in enumerate(rows) if seed in r["seeds"]]
        ys = [r["diffs"][r["seeds"].index(seed)] * scale for r in rows if seed in r["seeds"]]
        ax.plot(xs, ys, color=plt.get_cmap("tab10")(i % 10), marker="o", markersize=4, linewidth=0.8, alpha=0.7,
                label=f"seed {seed}")
    labelled = False
    for x, r in enumerate(rows):
        ci = r["ci95"] or [None, None]
        if not (_ok(r["delta"]) and _ok(ci[0]) and _ok(ci[1])):
            continue
        d = r["delta"] * scale
        err = [[d - ci[0] * scale], [ci[1] * scale - d]]
        ax.errorbar(x, d, yerr=err, fmt="s", color="black", capsize=5, markersize=7,
                    label=None if labelled else "mean, 95% CI")
        labelled = True
    ax.axhline(0.0, color="tab:red", linewidth=1.0, label="the baseline")
    ax.set_xticks(range(len(rows)), [str(r["label"]) + (f"\nunstable (seed {', '.join(map(str, r['unstable_seeds']))})"
                                                         if r["unstable_seeds"] else "") for r in rows],
                  rotation=15, ha="right")
    ax.set_xlim(-0.5, len(rows) - 0.5 + 0.06 * len(seeds) + 0.2)
    ax.set(ylabel=f"gain over the baseline ({unit}), paired by seed",
           title="confirmation: paired difference to the baseline\n(above the red line: better than the baseline)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return True


def rung_points(answer: dict[str, Any], entry: dict[str, Any]) -> list[tuple[float, float]]:
    """(rung score, final score) pairs of one rung: the entry's `points` ([rung_score, final]
    or {rung_score, final}) when given, else read off the curves of the search trials that
    ran to the end, at the rung's `epoch` (or its `rung`, which is the epoch ASHA compares at)."""
    if entry.get("points"):
        pairs = [(p["rung_score"], p["final"]) if isinstance(p, dict) else (p[-2], p[-1]) for p in entry["points"]]
        return [(a, b) for a, b in pairs if _ok(a) and _ok(b)]
    epoch = entry.get("epoch", entry.get("rung"))
    if not _ok(epoch):
        return []
    out = []
    for t in answer.get("trials") or []:
        if t.get("phase") != "search" or t.get("status") != "done" or not _ok(t.get("score")):
            continue
        at = [p[1] for p in t.get("curve") or [] if p[0] == epoch and _ok(p[1])]
        if at:
            out.append((at[0], t["score"]))
    return out


def plot_rungs(answer: dict[str, Any], path: Path) -> bool:
    """Each rung's score against the final score of the same trials, one colour per rung,
    with Kendall's τ in the legend."""
    series = [(e, rung_points(answer, e)) for e in answer.get("rung_tau") or []]
    series = [(e, pts) for e, pts in series if pts]
    if not series:
        return False
    scale, label = _scale(answer)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    for i, (e, pts) in enumerate(series):
        tau = f"{e['tau']:.2f}" if _ok(e.get("tau")) else ("too few trials" if e.get("note") else "n/a")
        ax.scatter([a * scale for a, _ in pts], [b * scale for _, b in pts], color=plt.get_cmap("tab10")(i % 10),
                   label=f"rung {e.get('rung')}: τ = {tau} (n = {e.get('n', len(pts))})", alpha=0.8)
    ax.set(xlabel=f"score at the rung, {label}", ylabel=f"final score, {label}",
           title="rung audit: does the rung rank as the end does?")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


# section of report.md -> (file name, plot function)
PLOTS: dict[str, tuple[str, Callable[[dict[str, Any], Path], bool]]] = {
    "confirm": ("confirmation.png", plot_confirm),
    "ablation": ("ablation.png", plot_ablation),
    "rungs": ("rung_audit.png", plot_rungs),
    "curves": ("learning_curves.png", plot_curves),
}
